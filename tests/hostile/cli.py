"""Running the real CLI confined: its own cwd and HOME, a memory limit, a time limit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

MEMORY_LIMIT = 1 << 30  # address space of the vmimg process (RLIMIT_AS)
TIME_LIMIT = 180.0
VMIMG = [sys.executable, "-m", "vmimg"]


def confined_command(*args: str) -> list[str]:
    """The vmimg command line under util-linux prlimit (no preexec_fn: tests run threads)."""
    prlimit = shutil.which("prlimit") or "/usr/bin/prlimit"
    return [prlimit, f"--as={MEMORY_LIMIT}", "--", *VMIMG, *args]


def confined_env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: HOME and the cache inside `work`, nothing else inherited."""
    for sub in ("home", "cwd"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work / "home"),
        "VMIMG_CACHE": str(work / "cache"),
        "LANG": "C.UTF-8",
    }
    return {**env, **(extra or {})}


def run_vmimg(
    work: Path, *args: str, env: dict[str, str] | None = None, timeout: float = TIME_LIMIT
) -> subprocess.CompletedProcess[str]:
    """`python -m vmimg ARGS` with cwd work/cwd, HOME work/home, cache work/cache, 1 GiB."""
    return subprocess.run(
        confined_command(*args),
        cwd=work / "cwd",
        env=confined_env(work, env),
        stdin=subprocess.DEVNULL,  # no terminal: nothing may wait for input
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=timeout,
    )
