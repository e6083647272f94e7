"""Perplexity in PyTorch, with llama-perplexity's method available so numbers compare.

``llama`` method (as llama.cpp's perplexity tool): tokenize the whole text (BOS first
when the tokenizer adds one), cut it into windows of ``ctx`` tokens, put BOS at the
start of each window when the tokenizer uses one, and score only the second half of
each window. ``full`` scores every position of each window. Given a ``reference``
model, the same scored positions also give the mean KL divergence from the
reference's next-token distribution to the model's (as llama-perplexity's --kl-divergence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from .calib import CalibrationError, dataset_texts
from .errors import reason
from .progress import Progress

METHODS = ("llama", "full")
BACKENDS = ("torch", "triton")  # a quantized linear: dequantized then matmul, or Triton kernels on the packed bytes
MIN_CTX = 8  # llama-perplexity's smallest window (its 2048-token batch runs as at most 256), so eval and validate agree


def check_windows(ctx: int, chunks: int | None, method: str = "llama") -> None:
    """A ValueError for windows no evaluation can score, before any model loads."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if ctx < MIN_CTX:
        raise ValueError(f"--ctx must be at least {MIN_CTX} tokens (llama-perplexity's smallest window), got {ctx}")
    if chunks is not None and chunks < 1:
        raise ValueError(f"--chunks must be ≥ 1, got {chunks}")


def use_backend(backend: str) -> None:
    """A ValueError for an unknown backend; for ``triton``, its kernels set up before anything
    imports Triton (loading a model or reading a GGUF does): on a CPU, importing triton_linear
    chooses Triton's interpreter, which must be chosen before Triton is first imported."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        from . import triton_linear  # noqa: F401


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens_scored: int
    chunks: int
    kld: float | None = None  # mean KL(reference || model) per scored token, when a reference ran
    reference_ppl: float | None = None


def read_eval_text(source: str) -> str:
    """A text file's contents as they are (no newline conversion), or ``wikitext2`` (test split)."""
    if source == "wikitext2":
        return "\n".join(dataset_texts("wikitext", "wikitext-2-raw-v1", split="test"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation text at {path}")
    try:
        data = path.read_bytes()
    except OSError as err:  # unreadable (permissions, an I/O error)
        raise CalibrationError(f"cannot read {path}: {reason(err)}") from None
    return data.decode("utf-8")  # as llama-perplexity reads it: CRLF stays CRLF


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    ctx: int = 512,
    chunks: int | None = None,
    method: str = "llama",
    batch: int = 4,
    device: torch.device | str = "cpu",
    reference: nn.Module | None = None,
) -> PerplexityResult:
    check_windows(ctx, chunks, method)
    bos = adds_bos(tokenizer)
    ids = torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=torch.long)
    n_chunks = ids.numel() // ctx
    if chunks is not None:
        n_chunks = min(n_chunks, chunks)
    if n_chunks < 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of --ctx {ctx}")
    windows = ids[: n_chunks * ctx].view(n_chunks, ctx).clone()
    if bos:
        windows[:, 0] = tokenizer.bos_token_id
    first = ctx // 2 if method == "llama" else 0
    model.to(device)
    if reference is not None:
        reference.to(device)
    total_nll, total_kld, ref_nll, scored = 0.0, 0.0, 0.0, 0
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("perplexity", total=n_chunks)
        for start in range(0, n_chunks, batch):
            x = windows[start : start + batch].to(device)
            logits = model(x, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, first : ctx - 1], dim=-1)
            target = x[:, first + 1 : ctx]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            total_nll += float(nll.double().sum())
            scored += nll.numel()
            if reference is not None:
                del logits, nll
                ref = torch.log_softmax(reference(x, use_cache=False).logits[:, first : ctx - 1].float(), dim=-1)
                total_kld += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
                ref_nll -= float(ref.gather(-1, target.unsqueeze(-1)).double().sum())
            progress.advance(task, x.shape[0])
    mean = total_nll / scored
    result = PerplexityResult(ppl=math.exp(mean), nll=mean, tokens_scored=scored, chunks=n_chunks)
    if reference is not None:
        result.kld, result.reference_ppl = total_kld / scored, math.exp(ref_nll / scored)
    return result
