#!/usr/bin/env bash
# Security lint of terraform/ with checkov, in a venv of its own: checkov pins an
# HCL parser and other libraries that conflict with the service's requirements.
# Exits non-zero when any check fails. Extra arguments go to checkov.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-checkov"
version="3.3.30"
python="${PYTHON:-python3}"

if ! "$venv/bin/checkov" --version 2>/dev/null | grep -qx "$version"; then
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "checkov==$version"
fi

# Skips are inline (#checkov:skip=ID:reason) next to the resource they concern.
# --skip-download: no calls to the vendor's platform (offline machines, no token).
exec "$venv/bin/checkov" --directory "$root/terraform" --framework terraform \
    --quiet --compact --skip-download "$@"
