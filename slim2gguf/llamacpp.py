"""Find, patch and build the pinned llama.cpp that reads SliM types.

The unpatched source (``ensure_source``) comes from ``$LLAMA_CPP_DIR``, else a git
clone of the pinned commit, else the llama.cpp tree vendored in the PyPI sdist of
llama-cpp-python (same commit). It is never modified: the upstream converter runs
from it. ``build`` copies it, applies ``patches/*.patch`` and builds the tools in a
cache folder keyed on the commit, the patches and the build options.

Run ``python -m slim2gguf.llamacpp build`` (or ``slim2gguf llama-cpp build``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from slim2gguf.atomic import file_locked, write_bytes_atomic
from slim2gguf.errors import reason
from slim2gguf.paths import cache_dir

PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
GIT_URL = "https://github.com/ggml-org/llama.cpp.git"
SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"  # vendors llama.cpp at PINNED_COMMIT
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}"


def _patch_dir() -> Path:
    """$SLIM2GGUF_PATCH_DIR, else the series an installed wheel carries, else the checkout's patches/."""
    if os.environ.get("SLIM2GGUF_PATCH_DIR"):
        return Path(os.environ["SLIM2GGUF_PATCH_DIR"])
    here = Path(__file__).resolve().parent
    packaged = here / "patches"
    return packaged if packaged.is_dir() else here.parent / "patches"


PATCH_DIR = _patch_dir()
DUMP_TOOL = "llama-slim-dump"
DEFAULT_TARGETS = (
    "llama-perplexity",
    "llama-completion",
    "llama-bench",
    "llama-quantize",
    "llama-imatrix",
    DUMP_TOOL,
)
STOCK_TARGETS = ("llama-perplexity", "llama-completion")  # what the tests run --format native files with
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=ON",  # only test-quantize-fns is built, by the end-to-end tests
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
)
_X86_SIMD = ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C")


def _x86_simd(state: str) -> tuple[str, ...]:
    """A portable build with the AVX2-era extensions all ON or all OFF (never AVX512/VNNI)."""
    return ("-DGGML_NATIVE=OFF", *(f"-DGGML_{x}={state}" for x in _X86_SIMD), "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF")


_AVX2 = _x86_simd("ON")
_SANITIZERS = tuple(f"-D{lib}_SANITIZE_{kind}=ON" for lib in ("LLAMA", "GGML") for kind in ("ADDRESS", "UNDEFINED"))
# CPU variants: "native" uses everything this CPU has; "avx2" is a portable x86-64 AVX2 build
# (no AVX512/VNNI: the plain AVX2 kernels run); "sanitize" is that build with AddressSanitizer
# and UBSan, where the tests run the AVX2 kernels and fuzz the loader (so they need no plain
# avx2 build); "generic" turns every x86 SIMD extension off, so the scalar kernels run.
CPU_VARIANTS = {
    "native": ("-DGGML_NATIVE=ON",),
    "avx2": _AVX2,
    "sanitize": (*_AVX2, *_SANITIZERS),
    "generic": _x86_simd("OFF"),
}
LOAD_TOOL = "llama-slim-load"  # the loader's fuzz driver (tests/e2e/test_fuzz_loader.py)


class LlamaCppError(RuntimeError):
    """Getting or building llama.cpp failed; the message says why and what to do."""


def _llama_root() -> Path:
    root = cache_dir() / "llama.cpp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _is_llama_tree(path: Path) -> bool:
    return (path / "CMakeLists.txt").is_file() and (path / "ggml" / "include" / "ggml.h").is_file()


def _git_head(path: Path) -> str | None:
    """HEAD of the git checkout at ``path`` (None when it is not one, or git is absent)."""
    if shutil.which("git") is None:
        return None
    r = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--show-toplevel", "HEAD"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return None
    top, head = r.stdout.split()
    if Path(top).resolve() != path.resolve():
        return None  # a plain folder inside some other repository
    return head


def _source_from_env(value: str) -> Path:
    path = Path(value).expanduser().resolve()
    if not _is_llama_tree(path):
        raise LlamaCppError(f"LLAMA_CPP_DIR={value} is not a llama.cpp source tree (no ggml/include/ggml.h)")
    head = _git_head(path)
    if head is not None and head != PINNED_COMMIT:
        raise LlamaCppError(
            f"LLAMA_CPP_DIR={value} is checked out at {head}, but slim2gguf's patches are made for "
            f"{PINNED_COMMIT}. Run `git -C {path} checkout {PINNED_COMMIT}` or unset LLAMA_CPP_DIR."
        )
    return path


def _git_host_reachable(host: str = "github.com", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _run_quiet(cmd: list[str], cwd: Path | None = None, timeout: float | None = None) -> None:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise LlamaCppError(f"`{' '.join(cmd)}` failed:\n{r.stderr.strip()[-2000:]}")


def _clone_into(tmp: Path) -> None:
    """Fetch only the pinned commit (GitHub serves single commits by id)."""
    tmp.mkdir()
    _run_quiet(["git", "init", "-q"], cwd=tmp)
    _run_quiet(["git", "remote", "add", "origin", GIT_URL], cwd=tmp)
    _run_quiet(["git", "fetch", "-q", "--depth", "1", "origin", PINNED_COMMIT], cwd=tmp, timeout=900)
    _run_quiet(["git", "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"], cwd=tmp)


def sdist_path() -> Path:
    """The llama-cpp-python sdist, downloaded with pip unless it is already cached."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    tarball = downloads / f"{SDIST_NAME}.tar.gz"
    if tarball.is_file():
        return tarball
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"{SDIST_PACKAGE}=={SDIST_VERSION}", "--dest", str(downloads),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not tarball.is_file():
        raise LlamaCppError(
            f"could not download the {SDIST_PACKAGE}=={SDIST_VERSION} sdist (it vendors llama.cpp "
            f"{PINNED_COMMIT[:10]}), and git could not fetch that commit. Set LLAMA_CPP_DIR to a llama.cpp "
            f"checkout at that commit, or place {tarball.name} in {downloads}.\n{r.stderr.strip()[-1500:]}"
        )
    return tarball


def _extract_sdist_into(tmp: Path) -> None:
    prefix = f"{SDIST_NAME}/vendor/llama.cpp/"
    tmp.mkdir()
    with tarfile.open(sdist_path()) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and len(member.name) > len(prefix):
                member.name = member.name[len(prefix) :]
                members.append(member)
        if not members:
            raise LlamaCppError(f"{sdist_path()} holds no vendor/llama.cpp tree")
        # the sdist's vendor/llama.cpp/.git is a submodule link into a repository it lacks
        members = [m for m in members if m.name != ".git"]
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **kwargs)


def ensure_source() -> Path:
    """The unpatched llama.cpp source at PINNED_COMMIT (never modified; do not write into it)."""
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        return _source_from_env(env)
    target = _llama_root() / f"src-{PINNED_COMMIT}"
    if _is_llama_tree(target):
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=target.parent))
    tmp.rmdir()
    try:
        fetched = False
        if shutil.which("git") and _git_host_reachable():
            try:
                _clone_into(tmp)
                fetched = _git_head(tmp) == PINNED_COMMIT
            except (LlamaCppError, subprocess.TimeoutExpired):
                fetched = False
            if not fetched:
                shutil.rmtree(tmp, ignore_errors=True)
        if not fetched:
            _extract_sdist_into(tmp)
        if not _is_llama_tree(tmp):
            raise LlamaCppError(f"the fetched llama.cpp tree at {tmp} is incomplete")
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_llama_tree(target):  # a concurrent run may have won the race
                raise
    except OSError as err:  # the cache's file system: full, read-only
        raise LlamaCppError(f"cannot write llama.cpp's source in {target.parent}: {reason(err)}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- patched build -------------------------------------------------------------------------


def patch_files() -> list[Path]:
    """The patch series, applied in name order."""
    return sorted(PATCH_DIR.glob("*.patch"))


NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


BUILD_ENV = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")  # what cmake takes from the environment when it configures


COMPILERS: dict[str, tuple[str, ...]] = {"CC": ("cc", "gcc", "clang"), "CXX": ("c++", "g++", "clang++")}  # looked for where the variable is unset


def _compiler(variable: str) -> list[str] | None:
    """The compiler's command line: ``$CC`` may carry a launcher or flags ("ccache gcc"), as cmake allows."""
    given = os.environ.get(variable)
    if given:
        return shlex.split(given) or None
    return next(([c] for c in COMPILERS[variable] if shutil.which(c)), None)


@functools.lru_cache(maxsize=1)
def native_defines() -> str:
    """The C compiler's predefined macros under ``-march=native``: the CPU features (and the
    compiler's version) a native build targets; "" where no compiler answers (the build then
    says so, `_check_toolchain`)."""
    cc = _compiler("CC")
    if cc is None:
        return ""
    try:
        defines = subprocess.run([*cc, "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True)
    except OSError:  # CC names no program
        return ""
    return defines.stdout if defines.returncode == 0 else ""


def native_targets_amx() -> bool:
    """Whether ``-march=native`` makes the compiler target AMX (Intel Sapphire Rapids and
    later). llama.cpp's AMX matmuls (Q4_0, Q8_0, K-quants, IQ4_XS) at the pinned commit die
    with SIGILL at a tile instruction in `tinygemm_kernel_amx` on such a virtual machine
    (a standalone AMX program runs there), so the native build leaves AMX out; SliM kernels
    never use it."""
    return "__AMX_TILE__" in native_defines()


def cmake_options(cpu: str = "native") -> list[str]:
    if cpu not in CPU_VARIANTS:
        raise LlamaCppError(f"unknown CPU variant {cpu!r}; choose one of {', '.join(CPU_VARIANTS)}")
    options = list(CMAKE_OPTIONS) + list(CPU_VARIANTS[cpu])
    if cpu == "native" and native_targets_amx():
        options += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    if shutil.which("ninja"):
        options += ["-G", "Ninja"]
    return options


def _hash_patches(h: Any) -> Any:
    for patch in patch_files():
        h.update(patch.name.encode() + b"\0" + patch.read_bytes() + b"\0")
    return h


def _series_hash(patched: bool) -> Any:
    """SHA-256 over the pinned commit and every patch's bytes (none for the unpatched build)."""
    h = hashlib.sha256(PINNED_COMMIT.encode())
    return _hash_patches(h) if patched else h


def build_key(cpu: str = "native", patched: bool = True) -> str:
    """Names the build folder: the pinned commit, every patch's bytes (none for the
    unpatched build), the build options, the compiler and flags the environment sets, and
    for the native build the CPU features it targets: a cache shared between machines (or
    used with other flags) gets a build of its own, not one that dies with SIGILL."""
    h = _series_hash(patched)
    h.update(json.dumps(cmake_options(cpu)).encode())
    env = {name: os.environ[name] for name in BUILD_ENV if os.environ.get(name)}
    if env:
        h.update(json.dumps(env, sort_keys=True).encode())
    if cpu == "native":
        h.update("".join(sorted(native_defines().splitlines(keepends=True))).encode())
    return h.hexdigest()[:16] if patched else f"stock-{h.hexdigest()[:10]}"


def build_dir(cpu: str = "native", patched: bool = True) -> Path:
    return _llama_root() / f"build-{build_key(cpu, patched)}"


def drains_its_log(tool: Path) -> bool:
    """Whether ``tool`` is of a patched build this version made, whose log is printed whole
    at exit (patches/0007); a build of the user's may lack the patch."""
    return any(Path(tool).parent == build_dir(cpu) / "build" / "bin" for cpu in CPU_VARIANTS)


def _check_toolchain() -> None:
    if shutil.which("cmake") is None:
        raise LlamaCppError("cmake is not installed: install it (e.g. `apt install cmake` or `pip install cmake`)")
    cc = _compiler("CC")
    cxx = _compiler("CXX")
    if cc is None or cxx is None:
        raise LlamaCppError(
            "no C/C++ compiler found: install one (e.g. `apt install build-essential`) or set CC and CXX"
        )
    for variable, command in (("CC", cc), ("CXX", cxx)):
        if shutil.which(command[0]) is None:
            raise LlamaCppError(f"{variable}={shlex.join(command)} names no program found: install it, or set {variable} to a compiler you have")


def _git(args: list[str], cwd: Path, index: Path | None = None) -> subprocess.CompletedProcess:
    """git in ``cwd``; with ``index``, on that index file in place of the tree's own."""
    cmd = ["git", "-c", "user.name=slim2gguf", "-c", "user.email=slim2gguf@localhost", *args]
    env = None if index is None else dict(os.environ, GIT_INDEX_FILE=str(index))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)


def _apply_patches(tree: Path) -> None:
    """Apply patches/ to a copy of the source, as commits when git is available.

    With git the tree becomes a repository whose first commit is the pristine source, so
    `git diff <first commit>` in it shows the patches plus any local edits (see export_patches).
    """
    use_git = shutil.which("git") is not None
    if use_git:
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", f"llama.cpp {PINNED_COMMIT}"]):
            r = _git(args, tree)
            if r.returncode != 0:
                raise LlamaCppError(f"git {' '.join(args)} failed in {tree}:\n{r.stderr.strip()}")
    elif shutil.which("patch") is None:
        raise LlamaCppError("neither git nor patch is installed: one is needed to apply patches/")
    for patch in patch_files():
        if use_git:
            check = _git(["apply", "--check", str(patch)], tree)
            apply = ["apply", str(patch)]
        else:
            check = subprocess.run(
                ["patch", "-p1", "--dry-run", "--batch", "--forward", "-i", str(patch)],
                cwd=tree, capture_output=True, text=True,
            )  # fmt: skip
        if check.returncode != 0:
            raise LlamaCppError(
                f"patch {patch.name} does not apply to llama.cpp {PINNED_COMMIT[:10]}:\n"
                f"{(check.stderr or check.stdout).strip()[-3000:]}"
            )
        if use_git:
            for args in (apply, ["add", "-A"], ["commit", "-q", "-m", patch.name]):
                r = _git(args, tree)
                if r.returncode != 0:
                    raise LlamaCppError(f"git {' '.join(args)} failed in {tree}:\n{r.stderr.strip()}")
        else:
            _run_quiet(["patch", "-p1", "--batch", "--forward", "-i", str(patch)], cwd=tree)


def _os_reason(err: OSError) -> str:
    """Why a file operation failed; for copytree's Error (source, copy, "[Errno N] why: 'path'"
    for each file that failed) the first file's why."""
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
        first = str(err.args[0][0][-1])
        found = re.match(r"\[Errno \d+\] ([^:]+)", first)
        return found[1] if found else first
    return reason(err)


def _prepare_tree(src: Path, patched: bool = True) -> None:
    """Copy the pristine source next to `src`, patch it (unless it is the unpatched
    build's), then rename it into place."""
    pristine = ensure_source()
    tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=src.parent))
    try:
        shutil.rmtree(tmp)
        shutil.copytree(pristine, tmp, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        if patched:
            _apply_patches(tmp)
        os.rename(tmp, src)
    except OSError as err:  # the cache's file system: full, read-only
        raise LlamaCppError(f"cannot copy llama.cpp's source into {src.parent}: {_os_reason(err)}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _BuildLog:
    """Runs build commands, appending their output to a log file and showing progress."""

    def __init__(self, log: Path, console) -> None:
        self.log = log
        self.console = console

    def run(self, cmd: list[str], what: str, env: dict | None = None) -> None:
        with open(self.log, "a") as out, self.console.status(f"{what}…") as status:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
            )
            tail: deque[str] = deque(maxlen=40)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()  # the log can be followed while the build runs
                tail.append(line.rstrip())
                if line.startswith("["):  # ninja/make progress: "[12/119] Building C object …"
                    status.update(f"{what} {line.split(' ', 1)[0]} {line.rsplit('/', 1)[-1].strip()[:60]}")
            if proc.wait() != 0:
                shown = "\n".join(tail)
                raise LlamaCppError(f"{what} failed (exit {proc.returncode}); full log: {self.log}\n{shown}")


def build(
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    cpu: str = "native",
    jobs: int | None = None,
    console=None,
    force: bool = False,
    patched: bool = True,
) -> Path:
    """Build the patched llama.cpp tools (cached, incremental) and return their bin folder;
    ``patched=False``: llama.cpp as upstream ships it, which runs ``--format native`` files.

    ``force`` runs the (incremental) build even when the targets are stamped as built, e.g.
    after editing the build's src/ folder by hand."""
    targets = list(dict.fromkeys(targets))
    if patched and not patch_files():
        raise LlamaCppError(
            f"no patches in {PATCH_DIR}: run from a slim2gguf source checkout or set SLIM2GGUF_PATCH_DIR"
        )
    root = build_dir(cpu, patched)
    src, bdir, stamp = root / "src", root / "build", root / "stamp.json"
    bin_dir = bdir / "bin"

    def built() -> set[str]:
        try:
            done = set(json.loads(stamp.read_text())["targets"])
        except (OSError, ValueError, KeyError):
            return set()
        return {t for t in done if (bin_dir / t).is_file()}

    if not force and set(targets) <= built():
        return bin_dir

    if console is None:
        from rich.console import Console

        console = Console(stderr=True, markup=False)
    _check_toolchain()
    root.mkdir(parents=True, exist_ok=True)
    with file_locked(root / ".lock", on_wait=lambda: console.print(f"waiting for another run's build in {root}…")):
        if not force and set(targets) <= built():  # another process built them while we waited
            return bin_dir
        if not src.is_dir():
            with console.status("copying and patching llama.cpp…" if patched else "copying llama.cpp…"):
                _prepare_tree(src, patched)
        runner = _BuildLog(root / "build.log", console)
        if not (bdir / "CMakeCache.txt").is_file():
            runner.run(["cmake", "-S", str(src), "-B", str(bdir), *cmake_options(cpu)], "configuring llama.cpp")
        env = dict(os.environ)
        env.setdefault("CCACHE_BASEDIR", str(root))  # lets ccache share results between build folders
        env.setdefault("CCACHE_NOHASHDIR", "1")
        jobs = jobs or os.cpu_count() or 2
        runner.run(
            ["cmake", "--build", str(bdir), "-j", str(jobs), "--target", *targets],
            f"building {', '.join(targets)}",
            env=env,
        )
        missing = [t for t in targets if not (bin_dir / t).is_file()]
        if missing:
            raise LlamaCppError(f"the build finished but {', '.join(missing)} is not in {bin_dir}")
        stamp.write_text(json.dumps({"targets": sorted(built() | set(targets)), "commit": PINNED_COMMIT, "series": series_digest(patched)}))
    return bin_dir


def patch_series_hash() -> str:
    """Names the patch series a build carries (``slim2gguf --version``)."""
    return _hash_patches(hashlib.sha256()).hexdigest()[:12]


BIN_ENV = "SLIM2GGUF_LLAMA_CPP_BIN"  # a patched build of the user's own (run, validate, tests)
_PROBE_TENSOR = "probe.weight"


def _write_probe(path: Path) -> None:
    """A GGUF file with one small SliM tensor: only a build that knows the types reads it."""
    import gguf
    import numpy as np

    from . import format as fmt

    fmt.register_gguf_types()
    stype = fmt.slim_type(3, 64)
    rows, cols = 8, 128
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scales = np.full((rows, cols // 64), 0.5, dtype=np.float16)
    packed = fmt.pack(codes, scales, -scales, np.full(cols // 64, 3, dtype=np.uint8), stype)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tensor(_PROBE_TENSOR, packed, raw_shape=(rows, packed.shape[1]), raw_dtype=gguf.GGMLQuantizationType(stype.type_id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@functools.lru_cache(maxsize=4)
def checked_user_build(directory: str) -> Path:
    """The user's build folder (its bin/), once its dump tool has read a SliM tensor."""
    bin_dir = Path(directory).expanduser().resolve()
    if not bin_dir.is_dir():
        raise LlamaCppError(f"llama.cpp build folder {bin_dir} does not exist")
    dump = bin_dir / DUMP_TOOL
    if not dump.is_file():
        raise LlamaCppError(
            f"{bin_dir} has no {DUMP_TOOL}: not a llama.cpp built with slim2gguf's patches (apply "
            f"patches/*.patch to commit {PINNED_COMMIT[:10]} and build every tool), or not its bin/ folder"
        )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "probe.gguf"
            _write_probe(probe)
            result = subprocess.run([dump, probe, "validate", _PROBE_TENSOR], capture_output=True, text=True)
    except OSError as err:  # a dump tool that cannot run, or no temporary folder to write the probe in
        what = f"{dump} cannot run" if err.filename in (str(dump), dump) else f"no probe file can be written in {tempfile.gettempdir()} (set TMPDIR)"
        raise LlamaCppError(f"{what}: {reason(err)}") from None
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise LlamaCppError(f"{dump} cannot read a SliM tensor ({said}): rebuild it with this slim2gguf's patches")
    return bin_dir


def user_build(stock_ok: Callable[[], bool] | None = None) -> Path | None:
    """The user's bin/ folder ($SLIM2GGUF_LLAMA_CPP_BIN; None when unset), checked once: it
    must carry the patches, unless ``stock_ok()`` says the file to run holds stock types only."""
    user = os.environ.get(BIN_ENV)
    if not user:
        return None
    bin_dir = Path(user).expanduser().resolve()
    if bin_dir.is_dir() and not (bin_dir / DUMP_TOOL).is_file() and stock_ok is not None and stock_ok():
        return bin_dir
    return checked_user_build(user)


def binary(name: str, cpu: str = "native", stock_ok: Callable[[], bool] | None = None) -> Path:
    """Path to one llama.cpp tool: from the user's build when $SLIM2GGUF_LLAMA_CPP_BIN names
    one (see user_build), else from ours, built first when needed."""
    user = user_build(stock_ok) if cpu == "native" else None
    if user is not None:
        tool = user / name
        if not tool.is_file():
            raise LlamaCppError(f"{tool.parent} has no {name}: build that target too")
        return tool
    return build((name,), cpu=cpu) / name


def series_digest(patched: bool = True) -> str:
    """The pinned commit and every patch's bytes (none for the unpatched build): what a build
    folder's stamp records, so ``clean`` keeps builds of this series made for another CPU,
    compiler or flags (a cache shared by machines)."""
    return _series_hash(patched).hexdigest()[:16]


def stale_build_dirs() -> list[Path]:
    """Build folders for patches or a llama.cpp commit that are no longer the current ones
    (left by earlier versions); builds of the current series for other machines stay."""
    current = {build_dir(cpu).name for cpu in CPU_VARIANTS} | {build_dir(patched=False).name}
    series = {series_digest(True), series_digest(False)}

    def of_this_series(folder: Path) -> bool:
        try:
            return json.loads((folder / "stamp.json").read_text()).get("series") in series
        except (OSError, ValueError, AttributeError):
            return False

    return sorted(p for p in _llama_root().glob("build-*") if p.is_dir() and p.name not in current and not of_this_series(p))


# --- maintaining the patch series --------------------------------------------------------

# which patch file each changed path belongs to (first match wins)
PATCH_SERIES = (
    ("0002-ggml-cpu-slim-kernels.patch", ("ggml/src/ggml-cpu/",)),
    ("0001-ggml-slim-types.patch", ("ggml/",)),
    ("0003-llama-slim-types.patch", ("src/", "include/")),
    ("0004-gguf-py-slim-types.patch", ("gguf-py/",)),
    ("0005-llama-slim-dump-tool.patch", ("tools/",)),
    ("0006-tests-slim-types.patch", ("tests/",)),
    ("0007-common-log-drain-at-exit.patch", ("common/",)),
)


def export_patches(tree: Path, dest: Path = PATCH_DIR) -> list[Path]:
    """Rewrite patches/ from a tree made by `build` (a git repository over the pristine source)
    after editing it: every change since its first commit, split by PATCH_SERIES."""
    tree, dest = Path(tree), Path(dest)
    if not tree.is_dir():
        raise LlamaCppError(f"{tree} is not a folder")
    root = _git(["rev-list", "--max-parents=0", "HEAD"], tree)
    if root.returncode != 0:
        raise LlamaCppError(f"{tree} is not a git tree made by slim2gguf's build: {root.stderr.strip()}")
    base = root.stdout.split()[0]
    with tempfile.TemporaryDirectory() as scratch:  # new files staged on a scratch index: the tree's own stays as it was
        index = Path(scratch) / "index"
        _git(["read-tree", "HEAD"], tree, index)
        _git(["add", "-A"], tree, index)
        names = _git(["diff", "--cached", "--name-only", base], tree, index).stdout.split()
        if not names:  # the pristine source (or another repository): the series would be deleted
            raise LlamaCppError(f"{tree} has no changes since its first commit: nothing to export, the patches in {dest} are kept")
        groups: dict[str, list[str]] = {}
        for name in names:
            patch = next((p for p, prefixes in PATCH_SERIES if name.startswith(prefixes)), None)
            if patch is None:
                raise LlamaCppError(f"{name} matches no entry of PATCH_SERIES; add one")
            groups.setdefault(patch, []).append(name)
        diffs = {}
        for patch, paths in groups.items():  # every diff made before the old series is touched
            diff = _git(["diff", "--cached", "--no-color", "--no-ext-diff", base, "--", *paths], tree, index)
            if diff.returncode != 0:
                raise LlamaCppError(diff.stderr)
            diffs[dest / patch] = diff.stdout
    for old in dest.glob("*.patch"):
        if old not in diffs:
            old.unlink()
    for path, text in diffs.items():
        write_bytes_atomic(path, text.encode())
    return sorted(diffs)


# --- command line -------------------------------------------------------------------------

app = typer.Typer(help="Get and build the llama.cpp that reads SliM types.", no_args_is_help=True)


@app.command("build")
def build_command(
    target: list[str] = typer.Option(None, "--target", "-t", help="Tool to build (repeatable); default: all."),
    cpu: str = typer.Option("native", help=f"CPU variant: {', '.join(CPU_VARIANTS)}."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Parallel compile jobs (default: CPU count).", min=1),
    force: bool = typer.Option(False, help="Run the build even if it is stamped done (after editing src/)."),
    stock: bool = typer.Option(False, "--stock", help="Build llama.cpp without the patches (runs --format native files)."),
) -> None:
    """Patch and build llama.cpp (cached; re-running only rebuilds what changed)."""
    from rich.console import Console

    from slim2gguf.messages import ERROR, say

    console = Console(markup=False)
    targets = tuple(target) if target else (STOCK_TARGETS if stock else DEFAULT_TARGETS)
    try:
        bin_dir = build(targets, cpu=cpu, jobs=jobs, console=console, force=force, patched=not stock)
    except LlamaCppError as err:
        say(Console(stderr=True, markup=False), ERROR, str(err))
        raise typer.Exit(1) from None
    patches = "no patches" if stock else f"{len(patch_files())} patches"
    console.print(f"llama.cpp {PINNED_COMMIT[:10]} + {patches}, built in {bin_dir}:", soft_wrap=True)
    for name in targets:
        console.print(f"  {bin_dir / name}", highlight=False, soft_wrap=True)


@app.command("source")
def source_command() -> None:
    """Print where the unpatched llama.cpp source is (fetching it if needed)."""
    try:
        print(ensure_source())
    except LlamaCppError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(1) from None


@app.command("clean")
def clean_command() -> None:
    """Delete build folders made for other patches or llama.cpp commits than the current ones."""
    for path in stale_build_dirs():
        shutil.rmtree(path)
        print(f"removed {path}")


@app.command("export-patches")
def export_command(tree: Path = typer.Argument(..., help="A build's src/ folder, edited.")) -> None:
    """Regenerate patches/ from an edited build tree (for maintainers)."""
    try:
        written = export_patches(tree)
    except LlamaCppError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(1) from None
    for patch in written:
        print(patch)


if __name__ == "__main__":
    app()
