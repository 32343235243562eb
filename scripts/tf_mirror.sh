#!/usr/bin/env bash
# Prints the Terraform provider mirror to use: a folder that holds
# registry.terraform.io/, or nothing when there is none (providers then come
# from the registry). The one discovery used by `make test`
# (tests/terraform_helpers.py), `make plan/deploy/destroy`
# (scripts/terraform.sh) and .ci/run, through scripts/tf_cli_config.sh.
#
#   TF_PROVIDER_MIRROR          use this folder (it must hold registry.terraform.io/)
#   TF_PROVIDER_MIRROR_SEARCH   colon-separated folders searched (4 levels deep) when
#                               TF_PROVIDER_MIRROR is unset; default: Terraform's
#                               implicit local mirror folders, then /
set -euo pipefail

if [[ -n "${TF_PROVIDER_MIRROR:-}" ]]; then
    if [[ ! -d "$TF_PROVIDER_MIRROR/registry.terraform.io" ]]; then
        echo "TF_PROVIDER_MIRROR=$TF_PROVIDER_MIRROR has no registry.terraform.io folder" >&2
        exit 2
    fi
    cd "$TF_PROVIDER_MIRROR" && pwd
    exit 0
fi

default_search="${HOME:-/root}/.terraform.d/plugins:${HOME:-/root}/.local/share/terraform/plugins"
default_search+=":/usr/local/share/terraform/plugins:/usr/share/terraform/plugins:/"
IFS=: read -r -a roots <<<"${TF_PROVIDER_MIRROR_SEARCH-$default_search}"
for root in "${roots[@]}"; do
    [[ -n "$root" && -d "$root" ]] || continue
    found="$(find "$root" -maxdepth 4 \( -path /proc -o -path /sys -o -path /dev \) -prune \
        -o -type d -name registry.terraform.io -print -quit 2>/dev/null || true)"
    if [[ -n "$found" ]]; then
        dirname "$found"
        exit 0
    fi
done
