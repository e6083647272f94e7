"""What the end-to-end tests need to know about llama.cpp's CPU build variants: which ones this
CPU runs, and how to run the "sanitize" build (AddressSanitizer + UBSan) and read its reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path

AVX2_FLAGS = {"avx2", "fma", "f16c", "bmi2"}  # what the avx2 and sanitize builds are compiled for

# any UBSan finding stops the process (by default it prints and goes on), but for the upstream
# ones ubsan.supp names; leaks are reported
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:allocator_may_return_null=1",
    "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:suppressions={Path(__file__).with_name('ubsan.supp')}",
}
_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: UndefinedBehaviorSanitizer")


def x86_flags() -> set[str]:
    """This CPU's feature flags (empty when it is not x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def skip_reason(variant: str) -> str | None:
    """Why this CPU cannot run a build variant (None: it can)."""
    flags = x86_flags()
    if variant == "native":
        return None
    if not flags:
        return f"the {variant} build is an x86-64 variant"
    if variant in ("avx2", "sanitize") and not AVX2_FLAGS <= flags:
        return "this CPU has no AVX2"
    return None


def sanitizer_env() -> dict[str, str]:
    return dict(os.environ, **SANITIZER_ENV)


def sanitizer_report(stderr: str) -> str | None:
    """The first sanitizer finding a process printed, None when there is none."""
    return next((line for line in stderr.splitlines() if any(mark in line for mark in _MARKS)), None)
