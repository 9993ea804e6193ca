"""`vmimg run` shows the workload's output only; `-v` shows the kernel and the agent too."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.boot.conftest import vmimg

pytestmark = [pytest.mark.boot, pytest.mark.timeout(900)]
MARKER = "@@vmimg@@"


def test_run_prints_the_workload_and_nothing_else(erofs_bundle: Path, cache_dir: Path) -> None:
    r = vmimg("run", str(erofs_bundle), "--cmd", "echo one; echo two; exit 3", cache=cache_dir,
              stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert r.stdout == "one\ntwo\n"  # (text mode reads the guest tty's \r\n as \n)


def test_run_verbose_shows_the_kernel_and_the_markers(erofs_bundle: Path, cache_dir: Path) -> None:
    r = vmimg("run", "--verbose", str(erofs_bundle), "--cmd", "echo one; exit 3", cache=cache_dir,
              stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert f"{MARKER} ready" in r.stdout and f"{MARKER} exit" in r.stdout
    kernel_lines = [ln for ln in r.stdout.splitlines() if MARKER not in ln and "one" not in ln]
    assert kernel_lines, r.stdout  # quiet still lets the kernel's warnings through
