"""Running the real CLI confined: its own cwd and HOME, a memory limit, a time limit; and
stopped at a named point (the test hook), to kill or interrupt it exactly there."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmimg.testhook import PAUSE_AT_ENV, PAUSE_FILE_ENV

# The checkout under test: its vmimg runs, as pytest imports it (pythonpath = ["."]), even
# where another copy is installed (a git worktree beside an editable install).
CHECKOUT = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 1 << 30  # address space of the vmimg process (RLIMIT_AS)
TIME_LIMIT = 180.0
VMIMG = [sys.executable, "-m", "vmimg"]


def confined_command(*args: str) -> list[str]:
    """The vmimg command line under util-linux prlimit (no preexec_fn: tests run threads)."""
    prlimit = shutil.which("prlimit") or "/usr/bin/prlimit"
    return [prlimit, f"--as={MEMORY_LIMIT}", "--", *VMIMG, *args]


def confined_env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: HOME and the cache inside `work`, this checkout's vmimg,
    nothing else inherited."""
    for sub in ("home", "cwd"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work / "home"),
        "VMIMG_CACHE": str(work / "cache"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(CHECKOUT),
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


PAUSE_TIMEOUT = 120.0  # seconds a run may take to reach its pause point
PAUSE_POLL = 0.01


@dataclass
class Paused:
    """A vmimg process waiting at a test-hook pause point (vmimg/testhook.py)."""

    proc: subprocess.Popen[str]
    marker: Path  # exists while the process waits; removing it lets the process go on
    result: tuple[int, str, str] | None = None

    def release(self) -> None:
        self.marker.unlink(missing_ok=True)

    def finish(self, timeout: float = TIME_LIMIT) -> tuple[int, str, str]:
        """Wait for the process to end: (exit code, stdout, stderr)."""
        if self.result is None:
            out, err = self.proc.communicate(timeout=timeout)
            self.result = (self.proc.returncode, out, err)
        return self.result


@contextlib.contextmanager
def paused_vmimg(
    work: Path, point: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[Paused]:
    """`vmimg ARGS`, confined as by run_vmimg, stopped at `point`: the block starts once
    it waits there (not after a guess of how long it takes to get there). A process still
    running when the block ends is killed."""
    marker = work / f"paused-at-{point}"
    marker.unlink(missing_ok=True)
    hook = {PAUSE_AT_ENV: point, PAUSE_FILE_ENV: str(marker)}
    proc = subprocess.Popen(
        confined_command(*args),
        cwd=work / "cwd",
        env=confined_env(work, {**(env or {}), **hook}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    paused = Paused(proc, marker)
    try:
        deadline = time.monotonic() + PAUSE_TIMEOUT
        while not marker.exists():
            if proc.poll() is not None:
                code, _out, err = paused.finish()
                raise AssertionError(f"vmimg exited with {code} before {point}: {err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"vmimg did not reach {point} in {PAUSE_TIMEOUT}s")
            time.sleep(PAUSE_POLL)
        yield paused
    finally:
        if proc.poll() is None:
            proc.kill()
        paused.finish()
        marker.unlink(missing_ok=True)
