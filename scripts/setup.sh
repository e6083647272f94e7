#!/usr/bin/env bash
# One setup command: a virtual environment in .venv with everything slim2gguf needs.
# torch is installed first and pinned, so no dependency range pulls a multi-GB CUDA
# build on a CPU machine; set TORCH_SPEC to choose another build (e.g. on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "slim2gguf installed in $(pwd)/.venv — activate with: source .venv/bin/activate"
