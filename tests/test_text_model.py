"""The text decoder of a multimodal checkpoint (Gemma 3 with a vision tower): found under
either prefix its files use, loaded as the causal LM with the usual module names, and
computing exactly what the full image-text model computes on text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from export_helpers import tiny_model_dir
from permissions import run_bound_by_permissions
from safetensors.torch import load_file, save_file

from slim2gguf import text_model
from slim2gguf.models import block_linear_shapes, block_linears, load_model
from slim2gguf.named_models import demo_model_dir

LEGACY = "language_model.model."  # Google's releases, and transformers' save_pretrained
NEWER = "model.language_model."


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mm")
    return tiny_model_dir(root / "gemma3mm", "Gemma3ForConditionalGeneration", demo_model_dir(), sliding_window=16)


def test_plain_models_keep_their_names(tmp_path):
    model = tiny_model_dir(tmp_path / "llama", "LlamaForCausalLM", demo_model_dir())
    assert not text_model.is_multimodal(model) and text_model.weight_prefix(model) == "model."
    assert text_model.file_name("model.layers.1.mlp.up_proj", "model.") == "model.layers.1.mlp.up_proj"


def test_the_decoder_is_found_and_computes_as_the_full_model(multimodal):
    from transformers import Gemma3ForConditionalGeneration

    assert text_model.weight_prefix(multimodal) == LEGACY
    model = load_model(multimodal)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.lm_head.weight is model.model.embed_tokens.weight
    assert set(block_linear_shapes(multimodal)) == set(block_linears(model, 0)) | set(block_linears(model, 1))
    full = Gemma3ForConditionalGeneration.from_pretrained(multimodal, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(input_ids=ids).logits)
    files = load_file(str(multimodal / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(files[text_model.file_name(name, LEGACY) + ".weight"], block_linears(model, 1)[name].weight)


def with_weights(source: Path, target: Path, rename: Callable[[str], str | None]) -> Path:
    """A copy of ``source`` whose weights are renamed (None: left out)."""
    target.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    files = load_file(str(source / "model.safetensors"))
    save_file({rename(k): v for k, v in files.items() if rename(k) is not None}, str(target / "model.safetensors"))
    return target


def test_the_newer_layout_is_found_too(multimodal, tmp_path):
    moved = with_weights(multimodal, tmp_path / "newer", lambda k: NEWER + k[len(LEGACY) :] if k.startswith(LEGACY) else k)
    assert text_model.weight_prefix(moved) == NEWER
    a, b = load_model(multimodal), load_model(moved)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_checkpoint_without_a_text_decoder_is_refused(multimodal, tmp_path):
    broken = with_weights(multimodal, tmp_path / "broken", lambda k: None if k.startswith(LEGACY) else k)
    with pytest.raises(text_model.TextModelError, match="cannot tell the text decoder"):
        text_model.weight_prefix(broken)


def test_a_shard_that_may_not_be_read_says_so(tmp_path):
    """safetensors reported a file without read permission as "No such file or directory"."""
    shard = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, shard)
    shard.chmod(0)
    result = run_bound_by_permissions("import sys; from slim2gguf.text_model import open_shard\nwith open_shard(sys.argv[1]): pass", str(shard))
    assert result.returncode != 0 and result.stderr.strip().endswith(f"TextModelError: cannot read {shard}: Permission denied"), result.stderr
