"""Families beyond LLaMA and Qwen (Gemma 2 and 3, Phi-3): the pipeline runs each decoder layer
with the mask and rotary embeddings of its kind (Gemma's sliding-window and global layers),
and quantizes every linear, Phi-3's fused ones whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_helpers import linear_shapes, sentencepiece_tokenizer_dir, tiny_model_dir

from slim2gguf.architectures import tensor_class
from slim2gguf.checkpoint import Checkpoint
from slim2gguf.methods import QuantSettings
from slim2gguf.models import decoder_layers, load_model, load_tokenizer, set_linear_weights
from slim2gguf.named_models import demo_model_dir
from slim2gguf.perplexity import perplexity
from slim2gguf.pipeline import CalibSettings, capture_block_inputs, layer_types, quantize_model

GEMMA_KINDS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    demo = demo_model_dir()
    return {
        "gemma2": tiny_model_dir(root / "gemma2", "Gemma2ForCausalLM", sentencepiece_tokenizer_dir(root / "spm", tiny_text),
                                 num_hidden_layers=4, layer_types=GEMMA_KINDS, sliding_window=8),  # fmt: skip
        "gemma3": tiny_model_dir(root / "gemma3", "Gemma3ForCausalLM", demo, num_hidden_layers=4,
                                 layer_types=GEMMA_KINDS, sliding_window=8),  # fmt: skip
        "phi3": tiny_model_dir(root / "phi3", "Phi3ForCausalLM", demo, tie_word_embeddings=False),
    }


def _run_layers(model: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[list[dict]]) -> torch.Tensor:
    """The decoder layers one by one, layer i with kwargs[i][batch], then the final norm."""
    for layer, layer_kwargs in zip(decoder_layers(model), kwargs):
        hidden = [layer(h, **kw) for h, kw in zip(hidden, layer_kwargs)]
        hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
    return model.model.norm(torch.cat(hidden))


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_each_layer_kind_gets_its_own_mask_and_rotary_embeddings(models, family):
    model = load_model(models[family])
    assert layer_types(model) == GEMMA_KINDS
    windows = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    hidden, kwargs_of = capture_block_inputs(model, windows, torch.device("cpu"))
    assert set(kwargs_of) == {"sliding_attention", "full_attention"}
    expected = model.model(windows, use_cache=False).last_hidden_state
    blockwise = _run_layers(model, hidden, [kwargs_of[kind] for kind in GEMMA_KINDS])
    assert torch.allclose(blockwise, expected, atol=1e-5)
    every_layer_like_the_first = _run_layers(model, hidden, [kwargs_of[GEMMA_KINDS[0]]] * len(GEMMA_KINDS))
    assert not torch.allclose(every_layer_like_the_first, expected, atol=1e-3)  # the kinds differ in this test


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_quantize_every_linear_of_the_family(models, family, tiny_text, tmp_path):
    path = models[family]
    settings = QuantSettings("slim", 3, 32, sba_tokens=256)
    out = tmp_path / "ckpt"
    quantize_model(str(path), out, settings, CalibSettings(str(tiny_text), nsamples=4, seqlen=64, seed=1))
    tensors = dict(Checkpoint(out).tensors())
    model = load_model(path)
    shapes = linear_shapes(model.config.to_dict())
    assert set(tensors) == {f"model.layers.{b}.{lin}" for b in range(model.config.num_hidden_layers) for lin in shapes}
    assert all(tensor_class(name) is not None for name in tensors)
    for name, qt in tensors.items():
        assert qt.shape == shapes[name.split(".", 3)[3]] and set(qt.widths.tolist()) <= {2, 3, 4}
    tok = load_tokenizer(path)
    text = tiny_text.read_text()
    base = perplexity(model, tok, text, ctx=64, chunks=2)
    set_linear_weights(model, {n: qt.dequantize() for n, qt in tensors.items()})
    quant = perplexity(model, tok, text, ctx=64, chunks=2)
    assert torch.isfinite(torch.tensor(quant.ppl)) and quant.ppl != base.ppl
