#!/usr/bin/env sh
# Build lambda.zip for LAMBDA_PYTHON (default 3.11) and LAMBDA_ARCH (x86_64 or arm64).
# The packaging itself is scripts/build_lambda.py; this picks the interpreter that
# runs it. Bytecode can only be shipped when that interpreter's version equals
# LAMBDA_PYTHON, so prefer such an interpreter: BUILD_PYTHON if set, else the
# project's venv, else pythonX.Y on PATH, else python3 (the build then warns).
set -eu
cd "$(dirname "$0")/.."
LAMBDA_PYTHON="${LAMBDA_PYTHON:-3.11}"
LAMBDA_ARCH="${LAMBDA_ARCH:-x86_64}"
export LAMBDA_PYTHON LAMBDA_ARCH

version_matches() {
    "$1" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$LAMBDA_PYTHON')" 2>/dev/null
}

pick_python() {
    if [ -n "${BUILD_PYTHON:-}" ]; then
        echo "$BUILD_PYTHON"
        return
    fi
    for candidate in .venv/bin/python "python$LAMBDA_PYTHON"; do
        if command -v "$candidate" >/dev/null 2>&1 && version_matches "$candidate"; then
            echo "$candidate"
            return
        fi
    done
    if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

exec "$(pick_python)" scripts/build_lambda.py "$@"
