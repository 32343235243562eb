#!/usr/bin/env bash
# Runs `terraform init` and then `terraform <command> [args]` in terraform/.
# Used by make plan / deploy / destroy:  scripts/terraform.sh plan|apply|destroy
# BACKEND_CONFIG (optional) is passed to init as -backend-config (remote state).
#
# The CLI configuration is set here (TF_CLI_CONFIG_FILE) unless yours names a
# file that exists and TF_PROVIDER_MIRROR is unset: it installs providers from
# the mirror that scripts/tf_mirror.sh finds (TF_PROVIDER_MIRROR, or a local
# one), else from the registry. With neither, init fails with one line that
# says what to set.
#
# plan, apply and destroy need the variables (terraform/terraform.tfvars, or
# TF_VAR_auth0_domain and TF_VAR_auth0_audience) and, for plan and apply,
# lambda.zip: without them, one line says what to do, instead of Terraform's
# prompts or errors. Without AWS credentials, the provider's error ends with
# one line of ours saying where to set them.
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
init_log="$(mktemp "${TMPDIR:-/tmp}/terraform-init.XXXXXX")"
trap 'rm -f "${config:-}" "$init_log"' EXIT
if ! terraform init "${init_args[@]}" >"$init_log" 2>&1; then
    if [[ ! -s "${TF_CLI_CONFIG_FILE:-/nonexistent}" ]] &&
        grep -q "registry.terraform.io" "$init_log"; then
        echo "terraform init: no provider mirror found and the Terraform registry is unreachable;" \
            "set TF_PROVIDER_MIRROR to a folder holding registry.terraform.io/ (docs/deploy.md: Prerequisites)" >&2
    else
        cat "$init_log" >&2
    fi
    exit 1
fi
cat "$init_log"

command="$1"
if [[ "$command" =~ ^(plan|apply|destroy)$ ]]; then
    if [[ ! -f terraform.tfvars && "$*" != *-var-file* &&
        (-z "${TF_VAR_auth0_domain:-}" || -z "${TF_VAR_auth0_audience:-}") ]]; then
        echo "terraform/terraform.tfvars not found: cp terraform/terraform.tfvars.example" \
            "terraform/terraform.tfvars and fill in auth0_domain and auth0_audience" >&2
        exit 2
    fi
    if [[ "$command" != destroy && ! -f "${TF_VAR_lambda_zip_path:-../lambda.zip}" ]] &&
        ! grep -qs '^[[:space:]]*lambda_zip_path' terraform.tfvars; then
        echo "lambda.zip not found: run make build first (make deploy builds it itself)" >&2
        exit 2
    fi
fi
if [[ "$command" == plan ]]; then
    set -- "$@" -input=false # never Terraform's interactive prompts
fi

# Terraform's errors pass through unchanged (and are kept to read afterwards).
errors="$(mktemp "${TMPDIR:-/tmp}/terraform-errors.XXXXXX")"
trap 'rm -f "${config:-}" "$init_log" "$errors"' EXIT
status=0
{ terraform "$@" 2>&1 1>&3 3>&- | tee "$errors" >&2; } 3>&1 || status=$?
if ((status != 0)) && grep -q "No valid credential sources found" "$errors"; then
    echo "no AWS credentials found: set AWS_PROFILE (after aws configure or aws sso login)," \
        "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, for the account to deploy to" >&2
fi
exit "$status"
