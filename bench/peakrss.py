"""Run a command and measure its own peak RSS.

Linux carries a process's high-water RSS across fork and exec: a child forked from a big
process (pytest after hundreds of tests, a bench harness holding results) reports that
parent's peak as its own ``ru_maxrss``. So the command is started from a fresh, small Python
(``-S``, a few MiB) that waits for it and reports the child's ``ru_maxrss`` on a spare pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

# Runs in the small intermediate: argv is REPORT_FD COMMAND...; fork/exec the command, wait,
# write "exit-code maxrss-KiB wall-seconds" to the report pipe. Timing here leaves out the
# launcher's own start-up.
_LAUNCHER = """
import os, sys, time
report = int(sys.argv[1])
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(report)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
took = time.perf_counter() - start
os.write(report, b"%d %d %.6f" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss, took))
"""


@dataclass(frozen=True)
class Measured:
    result: subprocess.CompletedProcess[Any]  # stdout/stderr filled in if they were piped
    peak_rss_kib: int
    seconds: float  # wall time of the command alone


def run_with_peak_rss(cmd: list[str], **popen: Any) -> Measured:
    """Run ``cmd`` to completion (``popen`` as for subprocess.Popen, without pass_fds)."""
    read_end, write_end = os.pipe()
    try:
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(write_end), *cmd]
        proc = subprocess.Popen(launcher, pass_fds=(write_end,), **popen)
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        out, err = proc.communicate()
        text = report.read().decode()
    if not text:
        raise RuntimeError(f"peak-RSS launcher failed for {cmd[0]} (exit {proc.returncode})")
    code, kib, seconds = text.split()
    result = subprocess.CompletedProcess(cmd, int(code), out, err)
    return Measured(result, int(kib), float(seconds))
