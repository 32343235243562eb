#!/usr/bin/env bash
# Writes a Terraform CLI configuration to the file named by $1, for
# scripts/terraform.sh and tests/test_terraform.py alike.
#
# With a provider mirror (TF_PROVIDER_MIRROR, or one scripts/tf_mirror.sh finds
# on this machine: for air-gapped machines and CI), providers are installed
# from that folder only. Without one the file is empty and providers come from
# the registry.
set -euo pipefail

out="${1:?usage: tf_cli_config.sh OUTPUT_FILE}"
mirror="$("$(dirname "${BASH_SOURCE[0]}")/tf_mirror.sh")"

if [[ -z "$mirror" ]]; then
    : >"$out"
    exit 0
fi
cat >"$out" <<CONFIG
provider_installation {
  filesystem_mirror {
    path = "$mirror"
  }
}
CONFIG
