"""Shared fixtures: a tiny randomly initialized LLaMA model with its own small tokenizer,
and the WikiText-2 files beside the project when present."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

# Triton kernels run through the interpreter unless a GPU is present; this must be
# set before anything imports triton.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "wikitext-2" / "valid.txt"

WORDS = (
    "the model reads a token and writes the next one while the weights stay small "
    "quantization keeps most of the accuracy at two three or four bits per weight "
    "salient columns get more bits and the rest get fewer so the average is exact"
).split()


def _corpus(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines)


@pytest.fixture(scope="session", autouse=True)
def scores_apart(tmp_path_factory) -> Iterator[None]:
    """--bpw's saved sensitivity scores (slim2gguf.score_cache) go to a folder of this
    session, not the user's cache: each test sees only what this session measured."""
    from slim2gguf import score_cache

    folder = tmp_path_factory.mktemp("scores")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(score_cache, "root", lambda: folder)
        yield


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    """A failed run ends with the free disk space where the tests write: a CI run once failed
    hundreds of tests at once, from one test on, with nothing on record to say why (a full
    disk, most likely)."""
    if exitstatus == 0:
        return
    import shutil
    import tempfile

    from slim2gguf import paths

    folders = {"temporary files": Path(tempfile.gettempdir())}
    with contextlib.suppress(OSError):
        folders["slim2gguf's cache"] = paths.cache_dir()
    free = [f"{label} ({folder}) {shutil.disk_usage(folder).free / 2**30:.1f} GiB" for label, folder in folders.items()]
    terminalreporter.write_line("free at the end: " + ", ".join(free))


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(_corpus(6000, seed=1))
    return path


def make_tiny_model(directory: Path, architecture: str = "llama", hidden: int = 128, layers: int = 2) -> Path:
    """A randomly initialized causal LM with a BPE tokenizer trained on a toy corpus."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(3000, seed=2).splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    common = dict(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if architecture == "llama" else Qwen2Config(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@contextlib.contextmanager
def imported_script(name: str) -> Iterator[ModuleType]:
    """scripts/NAME.py imported by path (the scripts are no package), registered in
    sys.modules while in use: dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(sys.modules, name, module)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        monkeypatch.undo()


def tensor_row(name: str, type_name: str, shape: tuple[int, ...], bpw: float) -> dict:
    """One tensor as ``inspect_gguf.inspect_rows`` reports it, at ``bpw`` bits per weight."""
    import math

    params = math.prod(shape)
    return {"name": name, "type": type_name, "shape": list(shape), "params": params, "bytes": int(params * bpw / 8)}
