"""Run Python in a child that file permissions bind, as they bind a user: root's override of
them (CAP_DAC_OVERRIDE) dropped by capsh, so an unreadable file's error can be tested as root."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest


def run_bound_by_permissions(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` without the capabilities that read any file (skips where that cannot be)."""
    cmd = [sys.executable, "-c", code, *args]
    if os.geteuid() == 0:
        if shutil.which("capsh") is None:
            pytest.skip("running as root without capsh to drop the permission override")
        cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(cmd)]
    return subprocess.run(cmd, capture_output=True, text=True)
