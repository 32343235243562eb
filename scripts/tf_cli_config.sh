#!/usr/bin/env bash
# Writes a Terraform CLI configuration to the file named by $1, for
# scripts/terraform.sh and tests/test_terraform.py alike.
#
# With TF_PROVIDER_MIRROR set (a folder holding registry.terraform.io/...,
# for air-gapped machines and CI), providers are installed from that folder
# only. Without it the file is empty and providers come from the registry.
set -euo pipefail

out="${1:?usage: tf_cli_config.sh OUTPUT_FILE}"
mirror="${TF_PROVIDER_MIRROR:-}"

if [[ -z "$mirror" ]]; then
    : >"$out"
    exit 0
fi
if [[ ! -d "$mirror/registry.terraform.io" ]]; then
    echo "TF_PROVIDER_MIRROR=$mirror has no registry.terraform.io folder" >&2
    exit 2
fi
mirror="$(cd "$mirror" && pwd)"
cat >"$out" <<CONFIG
provider_installation {
  filesystem_mirror {
    path = "$mirror"
  }
}
CONFIG
