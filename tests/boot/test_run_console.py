"""`vmimg run` shows the workload's output only; `-v` shows the kernel and the agent too."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.boot.conftest import build, vmimg

pytestmark = [pytest.mark.boot, pytest.mark.timeout(900)]
MARKER = "@@vmimg@@"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bundle(
    sample_ref: str, kernel_file: str, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return build(sample_ref, tmp_path_factory.mktemp("b") / "erofs", cache_dir, kernel_file)


def test_run_prints_the_workload_and_nothing_else(bundle: Path, cache_dir: Path) -> None:
    r = vmimg("run", str(bundle), "--cmd", "echo one; echo two; exit 3", cache=cache_dir,
              stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert r.stdout == "one\ntwo\n"  # (text mode reads the guest tty's \r\n as \n)


def test_run_verbose_shows_the_kernel_and_the_markers(bundle: Path, cache_dir: Path) -> None:
    r = vmimg("run", "--verbose", str(bundle), "--cmd", "echo one; exit 3", cache=cache_dir,
              stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert f"{MARKER} ready" in r.stdout and f"{MARKER} exit" in r.stdout
    kernel_lines = [ln for ln in r.stdout.splitlines() if MARKER not in ln and "one" not in ln]
    assert kernel_lines, r.stdout  # quiet still lets the kernel's warnings through
