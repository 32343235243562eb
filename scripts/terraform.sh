#!/usr/bin/env bash
# Runs `terraform init` and then `terraform <command> [args]` in terraform/.
# Used by make plan / deploy / destroy:  scripts/terraform.sh plan|apply|destroy
# BACKEND_CONFIG (optional) is passed to init as -backend-config (remote state).
#
# The CLI configuration is always set here (TF_CLI_CONFIG_FILE), from
# TF_PROVIDER_MIRROR when given (see scripts/tf_cli_config.sh): an inherited
# value may point at a file that does not exist.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 plan|apply|destroy|<terraform command> [args...]" >&2
    exit 2
fi

scripts="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module="$scripts/../terraform"

if [[ -n "${TF_PROVIDER_MIRROR:-}" || ! -f "${TF_CLI_CONFIG_FILE:-/nonexistent}" ]]; then
    config="$(mktemp "${TMPDIR:-/tmp}/terraform-cli.XXXXXX")"
    trap 'rm -f "$config"' EXIT
    "$scripts/tf_cli_config.sh" "$config"
    export TF_CLI_CONFIG_FILE="$config"
fi

# BACKEND_CONFIG: a file (or key=value) for the backend in backend.tf, e.g.
#   make plan BACKEND_CONFIG=terraform/backend.hcl   (see backend.tf.example)
init_args=(-input=false)
if [[ -n "${BACKEND_CONFIG:-}" ]]; then
    backend_config="$BACKEND_CONFIG"
    if [[ -f "$backend_config" ]]; then
        backend_config="$(cd "$(dirname "$backend_config")" && pwd)/$(basename "$backend_config")"
    fi
    init_args+=("-backend-config=$backend_config")
fi

cd "$module"
terraform init "${init_args[@]}"
terraform "$@"
