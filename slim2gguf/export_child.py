"""The conversion half of ``export_gguf``, run as ``python -m slim2gguf.export_child JOB``.

It runs in its own process with the llama.cpp tree's gguf-py first on the path (see
slim2gguf.export for why). The upstream converter (``conversion`` package) runs on
the original float model exactly as ``convert_hf_to_gguf.py --outtype f32`` would;
a subclass of its model class intercepts the tensor stream in three places:

* ``modify_tensors``: for a SliM-quantized linear, the converter's own
  ``modify_tensors`` gets a probe holding each element's flat index instead of the
  weight (``Probe``); what comes out names the GGUF tensor and shows which rows of
  which weights it holds: the converter's row permutation (LLaMA's q/k head order) or
  its stacking of a block's experts into one 3-D tensor, applied to whole packed rows.
  Anything else is refused. The float weight is never loaded.
* ``tensor_force_quant``: token embedding and LM head get the requested type.
* ``set_gguf_parameters``: ``general.file_type`` and the ``slim2gguf.*`` keys.

A job of kind ``mapping`` (slim2gguf.export.converter_mapping) runs only the probe,
to tell readers of a file which linear each SliM tensor holds and in which row order.

The last stdout line is a JSON answer: ``{"report", "notes"}``, ``{"mapping"}`` or ``{"error"}``.

Ctrl-C reaches the parent too (the whole process group gets it), and the parent handles it:
it kills this process, removes the partial file and says what to rerun. So this process
ignores SIGINT from its first statements on, before the seconds its imports take, and never
prints a KeyboardInterrupt's traceback.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # run as the child, not imported: Ctrl-C is the parent's (above)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

import json
import logging
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from . import __version__
from . import format as fmt
from .architectures import UnsupportedArchitectureError, model_family
from .budget import STORAGE_EMBED_TYPES
from .checkpoint import Checkpoint, CheckpointError
from .export import KV_PREFIX, ExportError
from .methods import QuantSettings, quantize_native
from .progress import Progress
from .storage import stored_type
from .text_model import TextModelError, file_name, file_renames, weight_prefix


@dataclass
class _Packed:
    """One quantized linear, packed, waiting for the converter to reach it."""

    rows: np.ndarray
    type_id: int  # a SliM type's or a stock ggml type's
    shape: tuple[int, int]


class PlainRope(logging.Filter):
    """Drops the converter's "Unknown RoPE type: default": transformers 5 names plain RoPE
    "default" in a config's ``rope_parameters``, and the converter then rightly writes no
    RoPE scaling; every conversion would otherwise print the false alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Unknown RoPE type: default"


def load_converter(src: Path) -> ModuleType:
    """llama.cpp's ``conversion`` package, on the same (the tree's) gguf-py as this process."""
    gguf_home = (src / "gguf-py").resolve()
    if gguf_home not in Path(gguf.__file__).resolve().parents:
        raise ExportError(f"the export process imported gguf from {gguf.__file__}, not from {gguf_home}")
    sys.path.insert(0, str(src))  # as when convert_hf_to_gguf.py runs from the tree
    import conversion

    if conversion.base.gguf is not gguf:
        raise ExportError("llama.cpp's converter imported another gguf package than the export process")
    conversion.base.logger.addFilter(PlainRope())
    return conversion


class Probe:
    """Index probes standing in for quantized weights while llama.cpp's converter runs them,
    and what its outputs say: which weight and row each output row is.

    Each probe holds the flat index of each element, counted on from the probes not yet
    consumed (a block's experts wait in the converter until it stacks them), so an output
    names its sources. An output may permute rows (LLaMA's q/k) and stack whole weights
    (experts, into one 3-D tensor); anything else is refused.
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, tuple[int, int]]] = {}  # weight -> (first index, shape)
        self.next = 0

    def make(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        if not self.pending:
            self.next = 0
        rows, cols = shape
        start, self.next = self.next, self.next + rows * cols
        self.pending[name] = (start, shape)
        dtype = torch.int32 if self.next < 2**31 else torch.int64  # int32 halves the work
        return torch.arange(start, self.next, dtype=dtype).reshape(rows, cols)

    @staticmethod
    def holds(out: Any) -> bool:
        """Whether a converter output is made of probes (real weights are floating point)."""
        return getattr(out, "dtype", None) in (torch.int32, torch.int64)

    def sources(self, out: Any, new_name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """For each row of output ``new_name``: the weight it comes from (an index into the
        returned names, in order of first appearance) and that weight's row. The weights
        are consumed."""
        out = torch.as_tensor(out)
        refused = f"llama.cpp's converter reshapes or converts the weights of {new_name}; SliM rows can only be permuted or stacked"
        if not self.holds(out) or out.dim() < 2:
            raise ExportError(refused)
        names = sorted(self.pending, key=lambda n: self.pending[n][0])
        starts = torch.tensor([self.pending[n][0] for n in names], dtype=torch.int64)
        cols = out.shape[-1]
        flat = out.reshape(-1, cols).to(torch.int64)
        which = torch.searchsorted(starts, flat[:, 0].contiguous(), right=True) - 1
        if bool((which < 0).any()):
            raise ExportError(refused)
        offset = flat[:, 0] - starts[which]
        widths = torch.tensor([self.pending[n][1][1] for n in names])[which]
        if not (bool((widths == cols).all()) and bool((offset % cols == 0).all())):
            raise ExportError(refused)
        if not torch.equal(flat, flat[:, :1] + torch.arange(cols)):
            raise ExportError(f"llama.cpp's converter transforms the columns of {new_name}; SliM rows can only be permuted")
        rows = offset // cols
        order = list(dict.fromkeys(which.tolist()))
        for k in order:
            if not torch.equal(torch.sort(rows[which == k]).values, torch.arange(self.pending[names[k]][1][0])):
                raise ExportError(f"llama.cpp's converter duplicates or drops rows of {names[k]}")
        for k in order:
            del self.pending[names[k]]
        position = torch.full((len(names),), -1, dtype=torch.int64)
        position[order] = torch.arange(len(order))
        return [names[k] for k in order], position[which].numpy(), rows.numpy()


def _slim_model_class(base: type) -> type:
    """The converter's model class for this architecture, with SliM tensors spliced in."""

    class SlimModel(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch

        def __init__(
            self,
            *args: Any,
            packed: dict[str, _Packed],
            standard: tuple[QT, QT],
            kvs: dict[str, Any],
            advance: Callable[[], None],
            **kwargs: Any,
        ):
            self.packed = packed
            self.standard = standard
            self.kvs = kvs
            self.advance = advance
            self.notes: list[str] = []
            self.quantized: set[str] = set()  # GGUF names of the checkpoint's tensors
            self.probe = Probe()
            super().__init__(*args, **kwargs)

        def set_gguf_parameters(self) -> None:
            super().set_gguf_parameters()
            # Replaced in place, so the key keeps the converter's position.
            self.gguf_writer.kv_data[0][gguf.Keys.General.FILE_TYPE] = gguf.GGUFValue(
                self.kvs["file_type"], gguf.GGUFValueType.UINT32
            )
            self.gguf_writer.add_string(KV_PREFIX + "version", __version__)
            self.gguf_writer.add_string(KV_PREFIX + "method", str(self.kvs["method"]))
            self.gguf_writer.add_uint32(KV_PREFIX + "bits", int(self.kvs["bits"]))
            if self.kvs["group_size"] is not None:
                self.gguf_writer.add_uint32(KV_PREFIX + "group_size", int(self.kvs["group_size"]))
            if self.kvs["native"] is not None:
                self.gguf_writer.add_string(KV_PREFIX + "native_type", str(self.kvs["native"]))
            if self.kvs["tensors"] is not None:
                self.gguf_writer.add_string(KV_PREFIX + "tensors", ",".join(self.kvs["tensors"]))

        def modify_tensors(self, data_torch: torch.Tensor, name: str, bid: int | None) -> Iterable[tuple[str, Any]]:
            self.advance()
            entry = self.packed.get(name)
            if entry is not None:
                if tuple(data_torch.shape) != entry.shape:
                    raise ExportError(
                        f"{name} is {tuple(data_torch.shape)} in the model but {entry.shape} in the checkpoint"
                    )
                data_torch = self.probe.make(name, entry.shape)
            for new_name, out in super().modify_tensors(data_torch, name, bid):
                if not self.probe.holds(out):
                    rounded = self._storage_rows(new_name, out)
                    if rounded is None:
                        yield new_name, out
                    else:
                        self.gguf_writer.add_tensor(new_name, rounded[0], raw_dtype=rounded[1])
                    continue
                names, which, rows = self.probe.sources(out, new_name)
                entries = [self.packed.pop(n) for n in names]
                if len({e.type_id for e in entries}) != 1:
                    kinds = sorted({stored_type(e.type_id).name for e in entries})
                    raise ExportError(
                        f"llama.cpp's converter stacks weights of types {kinds} into {new_name}; they need one type"
                    )
                data = np.empty((len(rows), entries[0].rows.shape[1]), dtype=np.uint8)
                for k, e in enumerate(entries):
                    data[which == k] = e.rows[rows[which == k]]
                shape = tuple(torch.as_tensor(out).shape[:-1]) + (data.shape[1],)
                self.gguf_writer.add_tensor(new_name, data.reshape(shape), raw_dtype=QT(entries[0].type_id))
                self.quantized.add(new_name)

        def _standard_type(self, new_name: str) -> QT | None:
            """The type asked for the token embedding or the output; None for other tensors."""
            embed, output = self.standard
            if self.match_model_tensor_name(new_name, gguf.MODEL_TENSOR.TOKEN_EMBD, None):
                return embed
            if self.match_model_tensor_name(new_name, gguf.MODEL_TENSOR.OUTPUT, None):
                return output
            return None

        def _storage_rows(self, new_name: str, out: Any) -> tuple[np.ndarray, QT] | None:
            """The embedding's or output's rows in a type gguf-py cannot write (a K-quant),
            rounded by slim2gguf.storage as the sensitivity pass scored it; None for the rest."""
            qtype = self._standard_type(new_name)
            if qtype is None or qtype.name.lower() not in STORAGE_EMBED_TYPES:
                return None
            weight = type(out).to_eager(out) if isinstance(out, gguf.LazyBase) else out
            stored = quantize_native(torch.as_tensor(weight).float(), None, QuantSettings("rtn", native=qtype.name.lower()))
            if stored.stype.ggml_type != qtype:
                self.notes.append(f"{new_name}: {qtype.name} blocks do not divide its rows; stored as {stored.stype.name}")
            return stored.pack(), QT(stored.stype.ggml_type)

        def tensor_force_quant(self, name: str, new_name: str, bid: int | None, n_dims: int) -> Any:
            # Where a row does not fit Q8_0's blocks, the converter stores F16 and logs a warning.
            standard = self._standard_type(new_name)
            if standard is not None:
                return standard
            routers = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)
            if any(self.match_model_tensor_name(new_name, key, bid) for key in routers):
                return False  # the converter's own choice: F32, as llama.cpp keeps routers always
            if bid is not None and n_dims >= 2 and new_name.endswith(".weight"):
                if self.kvs["tensors"] is not None:  # left float on purpose (--tensors): F16, as llama.cpp would
                    return QT.F16
                self.notes.append(f"{new_name} is not in the checkpoint; stored as F32")
            return super().tensor_force_quant(name, new_name, bid, n_dims)

    return SlimModel


def _pack(checkpoint: Checkpoint, model_class: type, model_dir: Path, progress: Progress) -> tuple[dict[str, _Packed], Counter]:
    """Pack every quantized linear, keyed by the converter's name for its weight (its name
    in the model's files: text_model.file_name)."""
    prefix, renames = weight_prefix(model_dir), file_renames(model_dir)
    packed: dict[str, _Packed] = {}
    widths: Counter = Counter()
    task = progress.add_task("packing", total=len(checkpoint.manifest["tensors"]))
    for module_name, qt in checkpoint.tensors():
        item = model_class.filter_tensors((file_name(module_name, prefix, renames) + ".weight", lambda: None))
        if item is None:
            raise ExportError(f"llama.cpp's converter drops {module_name}.weight")
        for width in qt.group_widths():
            widths[width] += qt.shape[0]
        packed[item[0]] = _Packed(qt.pack(), qt.stype.ggml_type, qt.shape)
        progress.advance(task)
    if not packed:
        raise ExportError(f"{checkpoint.directory} holds no quantized tensors")
    return packed, widths


def _dominant_type(packed: dict[str, _Packed]) -> int:
    """The type id holding the most parameters (the only one in a one-setting run)."""
    params: Counter = Counter()
    for entry in packed.values():
        params[entry.type_id] += prod(entry.shape)
    return params.most_common(1)[0][0]


def _file_kvs(dominant: int, settings: dict[str, Any]) -> dict[str, Any]:
    """general.file_type and the slim2gguf.* keys, as the dominant type gives them
    (StoredType.file_kvs: a SliM type's id, bits and group size; for a stock type
    llama-quantize's file type, the whole bits of its bpw and its name)."""
    return {"tensors": settings.get("tensors"), "method": settings["method"], **stored_type(dominant).file_kvs()}


def _write(writer: gguf.GGUFWriter, path: Path, progress: Progress) -> None:
    """ModelBase.write's file steps, one tensor at a time so the bar can follow."""
    if len(writer.tensors) != 1:
        raise ExportError("split GGUF output is not supported")
    infos = writer.tensors[0]
    task = progress.add_task("writing", total=len(infos))
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    while infos:
        writer.write_tensor_data(next(iter(infos.values())).tensor)  # pops that tensor's info
        progress.advance(task)


def _report(writer: gguf.GGUFWriter, quantized: set[str], file_type: int, widths: Counter) -> dict[str, Any]:
    infos = writer.tensors[0]
    slim = [ti for name, ti in infos.items() if name in quantized]
    infos = infos.values()
    return {
        "n_tensors": len(infos),
        "slim_tensors": len(slim),
        "slim_params": sum(prod(ti.shape) for ti in slim),
        "slim_bytes": sum(ti.nbytes for ti in slim),
        "total_params": sum(prod(ti.shape) for ti in infos),
        "total_bytes": sum(ti.nbytes for ti in infos),
        "file_type": file_type,
        "width_groups": dict(sorted(widths.items())),
    }


def convert(job: dict[str, Any]) -> dict[str, Any]:
    """Write the GGUF file ``job["out"]``; the caller owns (and removes on failure) that path."""
    ckpt = Checkpoint(job["checkpoint"])
    settings = ckpt.settings
    architecture = settings["architecture"]
    model_dir = Path(settings["model_path"])
    standard = (QT[job["embed_type"].upper()], QT[job["output_type"].upper()])
    fmt.register_gguf_types()
    conversion = load_converter(Path(job["src"]))
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    found = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    if found != architecture:
        raise ExportError(f"the checkpoint was made for {architecture}, but {model_dir} holds a {found}")
    model_class = _slim_model_class(conversion.get_model_class(architecture))
    out = Path(job["out"])
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not job["progress"]) as bar:
        packed, widths = _pack(ckpt, model_class, model_dir, bar)
        kvs = _file_kvs(_dominant_type(packed), settings)
        converting = bar.add_task("converting")
        with torch.inference_mode():
            model = model_class(
                model_dir,
                gguf.LlamaFileType.ALL_F32,
                out.parent,  # only used to make up a file name; we write to `out` ourselves
                packed=packed,
                standard=standard,
                kvs=kvs,
                advance=lambda: bar.advance(converting),
            )
            bar.update(converting, total=len(model.model_tensors))
            try:
                model.prepare_tensors()
                if model.probe.pending:
                    name = sorted(model.probe.pending)[0]
                    raise ExportError(
                        f"llama.cpp's converter turns {name} into something other than its rows, permuted or stacked"
                    )
                if packed:
                    missing = ", ".join(sorted(packed)[:3])
                    raise ExportError(f"{len(packed)} checkpoint tensors are not in {model_dir}, e.g. {missing}")
                model.prepare_metadata(vocab_only=False)
                report = _report(model.gguf_writer, model.quantized, kvs["file_type"], widths)
                _write(model.gguf_writer, out, bar)
            finally:
                model.gguf_writer.close()
    return {"report": report, "notes": model.notes}


# --- mapping job: where each linear of a float model lands in a GGUF file ----------------


def linear_mapping(job: dict[str, Any]) -> dict[str, Any]:
    """GGUF name -> {"modules", "rows"} for the linears in ``job["linears"]`` (module -> [rows, cols]).

    Runs the same probe as an export, so readers of a file undo exactly the row
    permutation and stacking the export applied. ``modules`` are the linears a tensor
    holds (several: a block's experts, stacked), ``rows`` the row of their rows put end
    to end that each GGUF row is, or None where that is the order. Linears the converter
    drops are left out.
    """
    model_dir = Path(job["model_dir"])
    conversion = load_converter(Path(job["src"]))
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    model_family(architecture)
    model_class = conversion.get_model_class(architecture)
    mapping: dict[str, Any] = {}
    prefix, renames = weight_prefix(model_dir), file_renames(model_dir)
    probe = Probe()
    module_of: dict[str, str] = {}
    with torch.inference_mode():
        model = model_class(model_dir, gguf.LlamaFileType.ALL_F32, model_dir)  # the path only names a file
        for module, shape in job["linears"].items():
            item = model_class.filter_tensors((file_name(module, prefix, renames) + ".weight", lambda: None))
            if item is None:
                continue
            name = item[0]
            module_of[name] = module
            bid = next((int(part) for part in name.split(".") if part.isdecimal()), None)  # as prepare_tensors
            for gguf_name, out in model.modify_tensors(probe.make(name, tuple(shape)), name, bid):
                names, which, rows = probe.sources(out, gguf_name)
                offsets = np.cumsum([0] + [job["linears"][module_of[n]][0] for n in names])
                source = offsets[which] + rows
                identity = np.array_equal(source, np.arange(len(source)))
                mapping[gguf_name] = {"modules": [module_of[n] for n in names], "rows": None if identity else source.tolist()}
    if probe.pending:
        raise ExportError(f"llama.cpp's converter never writes {sorted(probe.pending)[0]}")
    return {"mapping": mapping}


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"convert": convert, "mapping": linear_mapping}


def main() -> None:
    try:
        job = json.loads(sys.argv[1])
        answer = JOBS[job.get("kind", "convert")](job)
    except (ExportError, CheckpointError, fmt.FormatError, UnsupportedArchitectureError, TextModelError) as err:
        answer = {"error": str(err)}
    except OSError as err:  # the file system's (disk full, no permission), not the converter's: no traceback
        answer = {"error": f"export failed on the file system: {err}"}
    except Exception as err:  # the converter's own failure: keep its traceback for a bug report
        traceback.print_exc()
        answer = {"error": f"llama.cpp's converter failed: {type(err).__name__}: {err}"}
    print(json.dumps(answer))
    sys.exit(1 if "error" in answer else 0)


if __name__ == "__main__":
    main()
