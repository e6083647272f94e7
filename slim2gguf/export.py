"""Export a SliM checkpoint to a GGUF file through llama.cpp's own converter.

The converter at the pinned llama.cpp commit needs the gguf-py of its own tree
(PyPI ``gguf`` 0.19.0 lacks ``LazyChunkedTensor``, newer tensor names and metadata
rules), while the rest of slim2gguf reads files with PyPI ``gguf``. Two versions of
one package cannot share a process, so the conversion runs in a child process
(``slim2gguf.export_child``) whose ``gguf`` is the tree's, with our type ids
registered into it. This module checks what it can up front, owns the output file
(written under a temporary name and renamed only when the child succeeded, so an
error or Ctrl-C leaves nothing behind) and turns the child's answer into a report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import UnsupportedArchitectureError, model_family
from .atomic import atomic_path
from .budget import STANDARD_BPW, STORAGE_EMBED_TYPES
from .checkpoint import Checkpoint
from .llamacpp import ensure_source
from .paths import model_fingerprint

STANDARD_TYPES = tuple(STANDARD_BPW) + STORAGE_EMBED_TYPES  # gguf-py writes the first, slim2gguf.storage the K-quants
KV_PREFIX = "slim2gguf."
CHILD_MODULE = "slim2gguf.export_child"


class ExportError(ValueError):
    """The checkpoint cannot be written as GGUF; the message says why."""


class ExportWarning(UserWarning):
    """A tensor was stored differently from what the checkpoint implies."""


@dataclass
class ExportReport:
    """What was written. ``width_groups`` counts (row, column-group) quantizer groups per width."""

    path: Path
    n_tensors: int
    slim_tensors: int
    slim_params: int
    slim_bytes: int
    total_params: int
    total_bytes: int
    file_type: int
    width_groups: dict[int, int]

    @property
    def slim_bpw(self) -> float:
        return 8 * self.slim_bytes / self.slim_params

    @property
    def file_bpw(self) -> float:
        """Bits per parameter over every tensor in the file (tensor data only, no header)."""
        return 8 * self.total_bytes / self.total_params


def check_standard_type(choice: str, what: str) -> str:
    """The lower-case name of a type gguf-py or slim2gguf.storage writes, or an ExportError
    (convert asks before quantizing, so a typo does not wait for the export)."""
    if choice.lower() not in STANDARD_TYPES:
        raise ExportError(f"{what} type must be one of {', '.join(STANDARD_TYPES)}, got {choice!r}")
    return choice.lower()


def child_command(job: dict[str, Any], src: Path) -> tuple[list[str], dict[str, str]]:
    """The child's command line and environment: the tree's gguf-py first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src / "gguf-py"), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", CHILD_MODULE, json.dumps(job)], env


def _run_child(job: dict[str, Any], src: Path) -> dict[str, Any]:
    """Run the conversion in the child; its last stdout line is JSON. On Ctrl-C (which the child
    ignores) ``subprocess.run`` kills it before the KeyboardInterrupt goes on to the caller."""
    cmd, env = child_command(job, src)
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = result.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise ExportError(f"the GGUF conversion process died (exit code {result.returncode})")
    if "error" in answer:
        raise ExportError(answer["error"])
    return answer


def export_gguf(
    checkpoint: Checkpoint | str | os.PathLike,
    out_path: str | os.PathLike,
    embed_type: str | None = None,
    output_type: str | None = None,
    *,
    progress: bool = True,
) -> ExportReport:
    """Write ``checkpoint`` as a GGUF file at ``out_path`` (atomically: all or nothing).

    Metadata, tokenizer, tensor names and order are exactly what
    ``convert_hf_to_gguf.py --outtype f32`` writes for the checkpoint's float model.
    Quantized linears are stored in their SliM types (docs/FORMAT.md) or, from a
    ``--format native`` run, their stock ggml types (slim2gguf.storage), with whole
    packed rows permuted where the converter permutes rows. The token embedding gets
    ``embed_type`` (it is also the LM head when the model ties them), an untied LM
    head ``output_type``: each one of STANDARD_TYPES; by default what a --bpw run
    decided, else q8_0. (Where a row is not a
    multiple of 32, the converter stores f16 instead of q8_0 and logs a warning; a
    SliM model never has such rows, its hidden size being a multiple of the group
    size.) Norms and other 1-D tensors stay F32. Block weights a ``tensors`` selection
    left float are stored as F16 (as llama-quantize stores tensors it is told to keep);
    other block weights missing from the checkpoint stay F32, with an ExportWarning.

    ``general.file_type`` is the type id of the SliM type holding most of the
    quantized weights (1000-1008, e.g. 1004 for SLIM3_G64), following llama.cpp's
    convention that the file type names the dominant weight type. The values lie
    clear of upstream's file types and of its GUESSED flag (1024): stock llama.cpp
    shows "unknown" (it cannot load the file anyway), a patched one can name them.
    ``slim2gguf.{version,method,bits,group_size}`` (and ``slim2gguf.tensors`` for a
    selection) record how the weights were made; bits and group size are the
    dominant type's (a --bpw file mixes several). A native file gets llama-quantize's
    file type for its dominant stock type (e.g. MOSTLY_Q4_K_S), ``slim2gguf.bits`` the
    whole bits of that type's bits per weight and ``slim2gguf.native_type`` its name,
    no group size.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    settings = ckpt.settings
    for key in ("architecture", "model_path"):  # an edited manifest was a KeyError or TypeError traceback
        if not isinstance(settings.get(key), str):
            raise ExportError(f"{ckpt.directory / 'manifest.json'} is corrupt: settings.{key} is not a string")
    try:
        model_family(settings["architecture"])
    except UnsupportedArchitectureError as err:
        raise ExportError(f"{ckpt.directory}: {err}") from None
    decided = (ckpt.budget or {}).get("choices", {})
    job = {
        "checkpoint": str(ckpt.directory.resolve()),
        "embed_type": check_standard_type(embed_type or decided.get("token_embd", "q8_0"), "embedding"),
        "output_type": check_standard_type(output_type or decided.get("output", "q8_0"), "output"),
        "progress": progress,
    }
    model_dir = Path(settings["model_path"])
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"the checkpoint's float model {model_dir} is gone (no config.json there)")
    recorded = settings.get("model_files")  # absent from older checkpoints
    if recorded is not None and recorded != model_fingerprint(model_dir):  # its embedding, norms and tokenizer would join linears of the old weights
        raise ExportError(f"the checkpoint's float model {model_dir} changed since it was quantized (its files' sizes or times, or the import that made it from a GGUF file): quantize again")
    src = ensure_source()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        answer = _run_child({**job, "out": str(tmp), "src": str(src)}, src)
    for note in answer["notes"]:
        warnings.warn(note, ExportWarning, stacklevel=2)
    report = answer["report"]
    report["width_groups"] = {int(k): v for k, v in report["width_groups"].items()}
    return ExportReport(path=out_path, **report)


def converter_mapping(model_dir: str | os.PathLike, linears: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """GGUF tensor name -> ``{"modules", "rows"}`` for the float model's ``linears`` (module -> shape).

    The export's own probe, run alone: ``modules`` are the linears the tensor holds (a
    block's experts, stacked, or one), ``rows`` the row of their rows put end to end that
    each GGUF row is (None: that order), so a reader can undo what export_gguf did to
    packed rows.
    """
    src = ensure_source()
    job = {"kind": "mapping", "model_dir": str(Path(model_dir).resolve()), "linears": linears, "src": str(src)}
    return _run_child(job, src)["mapping"]
