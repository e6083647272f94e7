"""The quantized checkpoint: one safetensors file per decoder block plus a JSON manifest.

A run writes into ``DIR.partial`` and renames it to ``DIR`` when every block is done,
so ``DIR`` is never half written. Each finished block is saved (file, then manifest)
before the next starts, which is what lets an interrupted run resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_bytes_atomic
from .errors import check_readable, reason
from .qtensor import StoredTensor, stored_tensor
from .storage import NATIVE_TYPES

FORMAT_NAME = "slim2gguf-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"  # in the work folder, held by the run writing it


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or was made with other settings."""


class CheckpointWarning(UserWarning):
    """The run goes on, with something the user should know (its work folder is unlocked)."""


def partial_dir(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def block_file(index: int) -> str:
    return f"blocks/block_{index:04d}.safetensors"


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_bytes_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


def _holds_work(manifest: dict[str, Any]) -> bool:
    """Whether a work folder's manifest records finished blocks or a --bpw budget (minutes to hours)."""
    return manifest["blocks_done"] > 0 or manifest.get("budget") is not None


def _unrecorded(work: Path, manifest_ok: bool = False) -> bool:
    """Whether a work folder without a manifest holds only what a run leaves before recording
    its first block (a block file or temporaries: the disk filled up, or the run was killed);
    with ``manifest_ok``, whether a folder holds only a run's files."""
    for path in work.rglob("*"):
        name = path.relative_to(work).as_posix()
        if path.is_dir():
            if name != "blocks":
                return False
        elif not (name == LOCK or fnmatchcase(name, "blocks/block_*.safetensors") or fnmatchcase(path.name, ".*.tmp") or (manifest_ok and name == MANIFEST)):
            return False
    return True


def replaceable(target: Path) -> bool:
    """Whether a new checkpoint may take ``target``'s place: nothing there, an empty folder, or
    a checkpoint (a manifest of this format, and only a run's files). Anything else (a model
    folder, the user's files) is never renamed away or deleted."""
    if not target.exists():
        return True
    if not target.is_dir():
        return False
    if not any(target.iterdir()):
        return True
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME and _unrecorded(target, manifest_ok=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{directory} is not a slim2gguf checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has version {manifest.get('version')}, this slim2gguf reads {FORMAT_VERSION}")
    for key in ("settings", "tensors", "blocks_done", "num_blocks"):
        if key not in manifest:
            raise CheckpointError(f"{path} is corrupt: no '{key}'")
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{path} is corrupt: {problem}")
    return manifest


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def is_decision(budget: Any) -> bool:
    """Whether ``budget`` has what budget.Decision reads: the target, the bpw reached, a choice per tensor."""
    return (
        isinstance(budget, dict)
        and all(isinstance(budget.get(k), (int, float)) for k in ("target_bpw", "bpw"))
        and isinstance(budget.get("choices"), dict)
        and all(isinstance(c, str) for c in budget["choices"].values())
    )


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's structure (None: what readers index is there and typed)."""
    settings, tensors = manifest["settings"], manifest["tensors"]
    if not isinstance(settings, dict) or not isinstance(tensors, dict):
        return "'settings' and 'tensors' must be objects"
    num = manifest["num_blocks"]
    if not _is_int(num, 1, 1 << 16) or not _is_int(manifest["blocks_done"], 0, num):
        return "'num_blocks'/'blocks_done' are not block counts"
    if "group_size" in settings and settings["group_size"] not in (32, 64, 128):
        return "settings.group_size is not 32, 64 or 128"
    if not isinstance(manifest.get("blocks", []), list):
        return "'blocks' must be a list"
    budget = manifest.get("budget")
    if budget is not None and not is_decision(budget):
        return "'budget' is not a --bpw decision"
    for name, meta in tensors.items():
        if not isinstance(meta, dict):
            return f"the entry of {name} is not an object"
        shape, widths = meta.get("shape"), meta.get("widths")
        if not _is_int(meta.get("block"), 0, num - 1):
            return f"{name} has no valid block index"
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(n, 1, 1 << 24) for n in shape)):
            return f"{name} has no valid shape"
        if "type" not in meta and "group_size" not in meta and "group_size" not in settings:
            return f"{name} names no group size and settings.group_size is missing"
        if "type" in meta:
            if meta["type"] not in NATIVE_TYPES:
                return f"{name} has an unknown stock type"
            continue
        if not (isinstance(widths, list) and widths and all(_is_int(w, 1, 5) for w in widths)):
            return f"{name} has no valid widths"
        if meta.get("group_size", settings.get("group_size")) not in (32, 64, 128):
            return f"{name} has no valid group size"
    return None


class CheckpointWriter:
    """Writes blocks as they finish; resumes a ``DIR.partial`` made with equal settings."""

    def __init__(self, target: str | os.PathLike, settings: dict[str, Any], num_blocks: int):
        self.target = Path(target)
        self.work = partial_dir(self.target)
        self.manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "settings": settings,
            "num_blocks": num_blocks,
            "blocks_done": 0,
            "tensors": {},
            "blocks": [],
        }
        self._lock: IO[str] | None = None
        if self.work.exists():
            self._lock_work()
            try:
                self._take_over(settings, num_blocks)
            except BaseException:
                self._unlock()
                raise

    def _take_over(self, settings: dict[str, Any], num_blocks: int) -> None:
        """Resume the work folder a run left, or clear it if it recorded nothing."""
        if not (self.work / MANIFEST).exists():
            if not _unrecorded(self.work):
                raise CheckpointError(f"{self.work} is in the way: it holds no {MANIFEST} and files a run does not write; move it")
            self._remove_work()  # nothing recorded: a run stopped while writing its first block
            return
        previous = read_manifest(self.work)
        if previous["settings"] == settings and previous["num_blocks"] == num_blocks:
            self.manifest = previous
            return
        if _holds_work(previous):
            raise CheckpointError(
                f"{self.work} holds an interrupted run with other settings; "
                "delete it or rerun with the same settings to resume"
            )
        self._remove_work()  # a run stopped before its first block or budget: nothing to resume

    def _lock_work(self) -> None:
        """Hold the work folder's lock, made with the folder: two runs writing one folder at once
        (the same output, other settings) would mix their blocks and manifests."""
        if self._lock is not None:
            return
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            handle = open(self.work / LOCK, "w")
        except OSError as err:
            raise CheckpointError(f"cannot write in {self.work}: {reason(err)}") from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise CheckpointError(f"another slim2gguf run is writing {self.work}: let it finish, or write to another place") from None
        except OSError as err:  # a file system without locks (NFS without its lock daemon: ENOLCK)
            warnings.warn(
                f"cannot lock {self.work} ({reason(err)}): going on unlocked; do not start a second run of this output",
                CheckpointWarning,
                stacklevel=2,
            )
        self._lock = handle

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._unlock()

    def _remove_work(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self._unlock()

    def _save(self) -> None:
        """The manifest into the work folder, made with the first budget or block: a run that
        fails before either (an empty calibration text, say) leaves nothing on disk."""
        (self.work / "blocks").mkdir(parents=True, exist_ok=True)
        _write_manifest(self.work, self.manifest)

    @property
    def blocks_done(self) -> int:
        return self.manifest["blocks_done"]

    @property
    def budget(self) -> dict[str, Any] | None:
        """The --bpw decision this run quantizes by (budget.Decision.to_dict()), once made."""
        return self.manifest.get("budget")

    def _write(self, what: str, write: Callable[[], None]) -> None:
        """``write`` under the work folder's lock. A work folder that recorded nothing is removed
        if it fails (Ctrl-C too); the file system's failure (disk full, read-only) becomes one
        CheckpointError that says what stays on disk."""
        done, budget = self.blocks_done, self.budget is not None
        self._lock_work()
        try:
            write()
        except BaseException as err:
            if not (done or budget):
                self._remove_work()
            if not isinstance(err, (OSError, SafetensorError)):
                raise
            if done:
                kept = f"its {done} finished block{'s are' if done > 1 else ' is'} kept: rerun the same command to resume"
            elif budget:
                kept = "its --bpw budget is kept: rerun the same command to resume"
            else:
                kept = "nothing was kept"
            raise CheckpointError(f"cannot write {what} in {self.work}: {reason(err)}; {kept}") from err

    def set_budget(self, decision: dict[str, Any]) -> None:
        """Saved before the first block, so a resumed run quantizes by the same decision."""

        def save() -> None:
            self.manifest["budget"] = decision
            self._save()

        self._write("the --bpw budget", save)

    def finished_tensors(self) -> Iterator[tuple[str, StoredTensor]]:
        """Tensors of the blocks already saved (for a resumed run to replay)."""
        yield from _iter_tensors(self.work, self.manifest)

    def write_block(self, index: int, tensors: dict[str, StoredTensor], info: dict[str, Any]) -> None:
        if index != self.blocks_done:
            raise CheckpointError(f"block {index} written out of order (expected {self.blocks_done})")
        flat: dict[str, Any] = {}
        for name, qt in tensors.items():
            flat.update(qt.tensors(name))

        def save() -> None:  # the block's file, then the manifest that records it
            with atomic_path(self.work / block_file(index)) as tmp:
                save_file(flat, str(tmp))
            for name, qt in tensors.items():
                self.manifest["tensors"][name] = {"block": index, "shape": list(qt.shape), **qt.meta()}
            self.manifest["blocks"].append(info)
            self.manifest["blocks_done"] = index + 1
            self._save()

        self._write(f"block {index}", save)

    def finish(self, extra: dict[str, Any]) -> Path:
        """Rename the finished work folder to the target (replacing an older one)."""

        def save() -> None:
            self.manifest.update(extra)
            self._save()

        if not replaceable(self.target):
            raise CheckpointError(f"{self.target} is not a slim2gguf checkpoint: it is not replaced; the finished work is in {self.work}")
        self._write("the manifest", save)
        (self.work / LOCK).unlink(missing_ok=True)  # held until the folder has its final name
        old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")  # a name of this run's own
        if self.target.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
        self.work.rename(self.target)
        self._unlock()
        shutil.rmtree(old, ignore_errors=True)
        return self.target


def _iter_tensors(directory: Path, manifest: dict[str, Any]) -> Iterator[tuple[str, StoredTensor]]:
    default_group = manifest["settings"].get("group_size", 0)  # read only by SliM entries naming none (_manifest_problem)
    by_block: dict[int, list[str]] = {}
    for name, meta in manifest["tensors"].items():
        by_block.setdefault(meta["block"], []).append(name)
    for index in sorted(by_block):
        path = directory / block_file(index)
        try:
            check_readable(path)
            data = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is missing or corrupt: {reason(err)}") from err
        for name in by_block[index]:
            meta = manifest["tensors"][name]
            try:
                qt = stored_tensor(data, name, meta, default_group)
            except KeyError as err:
                raise CheckpointError(f"{path} lacks {err.args[0]}") from err
            except ValueError as err:
                raise CheckpointError(f"{err} in {path}") from err
            if list(qt.shape) != meta["shape"]:
                raise CheckpointError(f"{name} in {path} does not have the manifest's shape")
            yield name, qt


def finished_with(directory: str | os.PathLike, settings: dict[str, Any]) -> Checkpoint | None:
    """The finished checkpoint at ``directory`` if it was made with exactly ``settings``."""
    try:
        done = Checkpoint(directory)
    except CheckpointError:
        return None
    return done if done.settings == settings else None


class Checkpoint:
    """A finished checkpoint, read lazily block by block."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            hint = " (an interrupted run is in .partial: rerun quantize to resume)" if partial_dir(
                self.directory
            ).exists() else ""
            raise CheckpointError(f"no checkpoint at {self.directory}{hint}")
        self.manifest = read_manifest(self.directory)
        if self.manifest["blocks_done"] != self.manifest["num_blocks"]:
            raise CheckpointError(f"{self.directory} is incomplete")

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    def tensors(self) -> Iterator[tuple[str, StoredTensor]]:
        """(module name, quantized weight) for every quantized linear, e.g. ``model.layers.0.mlp.up_proj``."""
        yield from _iter_tensors(self.directory, self.manifest)

    @property
    def budget(self) -> dict[str, Any] | None:
        """The --bpw decision the checkpoint was made by (None for a uniform run)."""
        return self.manifest.get("budget")

    def allocation(self) -> dict[str, list[int]]:
        """SliM widths per tensor (stock-typed tensors have none)."""
        return {name: meta["widths"] for name, meta in self.manifest["tensors"].items() if "widths" in meta}
