#!/usr/bin/env bash
# The test command (README, and what .ci/run calls): the fast unit layer, then the
# end-to-end layer, which builds the patched llama.cpp (cached in ~/.cache/slim2gguf,
# keyed on the patches) and runs the demo model through it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -rfEs tests "$@"
