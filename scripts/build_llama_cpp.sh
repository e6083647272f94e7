#!/usr/bin/env sh
# Patch and build the pinned llama.cpp with the SliM types (cached under ~/.cache/slim2gguf).
# Arguments go to `python -m slim2gguf.llamacpp build`, e.g. --cpu generic, -t llama-slim-dump.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ -x "$here/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then
    python="$here/.venv/bin/python"
fi
cd "$here"
exec "$python" -m slim2gguf.llamacpp build "$@"
