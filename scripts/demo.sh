#!/usr/bin/env bash
# The demo: convert SmolLM2-135M-Instruct (from PyPI) to 4-bit SliM, generate text with
# patched llama.cpp, and compare the file's perplexity in PyTorch and in llama.cpp on a
# text that needs no download (llama.cpp's own documentation, from its source tree).
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
OUT="${SLIM2GGUF_DEMO_DIR:-${SLIM2GGUF_CACHE:-$HOME/.cache/slim2gguf}/demo}"
mkdir -p "$OUT"
MODEL="$OUT/smollm2-135m-slim4.gguf"

slim2gguf llama-cpp build
slim2gguf convert smollm2-135m -o "$MODEL" --bits 4 --group-size 64 --nsamples 32 --seqlen 256
slim2gguf run "$MODEL" -p "The capital of France is" -n 48
python - "$OUT/eval.txt" <<'PY'
import sys
from pathlib import Path

from slim2gguf.llamacpp import ensure_source

src = ensure_source()
docs = [src / "README.md", *sorted((src / "docs").rglob("*.md"))]
Path(sys.argv[1]).write_text("\n\n".join(p.read_text(encoding="utf-8") for p in docs), encoding="utf-8")
PY
slim2gguf validate "$MODEL" --model smollm2-135m --text "$OUT/eval.txt" --chunks 8
