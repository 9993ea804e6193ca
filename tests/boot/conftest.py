"""Boot fixtures: vmimg's tuned kernel (built once per machine, then cached) and bundles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmimg.kernel import KernelInfo, find_or_build_kernel

KERNEL_BUILD_TIMEOUT = 3600
VMIMG = [sys.executable, "-m", "vmimg"]


@pytest.fixture(scope="session")
def guest_kernel() -> KernelInfo:
    """The tuned guest kernel from the user's cache (built there the first time)."""
    return find_or_build_kernel("x86_64")


@pytest.fixture(scope="session")
def kernel_file(guest_kernel: KernelInfo) -> str:
    assert guest_kernel.vmlinux is not None
    return str(guest_kernel.vmlinux)


def vmimg(
    *args: str, cache: Path, timeout: float = 600, **kw: object
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "VMIMG_CACHE": str(cache),
        "VMIMG_ACCEL": os.environ.get("VMIMG_ACCEL", ""),
    }
    env = {k: v for k, v in env.items() if v != ""}
    return subprocess.run(
        [*VMIMG, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        **kw,  # type: ignore[call-overload]
    )


def build(source: str, out: Path, cache: Path, kernel: str, *extra: str) -> Path:
    r = vmimg("build", source, "-o", str(out), "--kernel", kernel, *extra, cache=cache)
    assert r.returncode == 0, r.stderr
    return out
