"""The peak-RSS measurement the hostile tests and the benchmarks rely on."""

from __future__ import annotations

import subprocess
import sys

from bench.peakrss import run_with_peak_rss

BIG = 300 * 1024 * 1024


def test_peak_rss_is_the_commands_own_not_its_big_parents() -> None:
    """A parent that has touched 300 MiB starts a tiny command: the command's peak is small
    (a plain fork/exec + wait4 would report the parent's 300 MiB)."""
    parent = f"""
import subprocess, sys
from bench.peakrss import run_with_peak_rss
ballast = bytearray({BIG})
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
run = run_with_peak_rss(["true"])
print(run.result.returncode, run.peak_rss_kib)
"""
    out = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, check=True
    ).stdout
    code, kib = (int(v) for v in out.split())
    assert code == 0
    assert kib < 32 * 1024, f"true reported {kib} KiB"


def test_peak_rss_sees_the_commands_own_allocation() -> None:
    run = run_with_peak_rss(
        [sys.executable, "-c", f"b = bytearray({BIG}); b[::4096] = b'\\x01' * len(b[::4096])"]
    )
    assert run.result.returncode == 0
    assert run.peak_rss_kib > BIG // 1024
    assert run.seconds > 0


def test_exit_code_and_output_come_through() -> None:
    run = run_with_peak_rss(
        ["sh", "-c", "echo out; echo err >&2; exit 7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert (run.result.returncode, run.result.stdout, run.result.stderr) == (7, "out\n", "err\n")
