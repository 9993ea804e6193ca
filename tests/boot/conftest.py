"""Boot fixtures: vmimg's tuned kernel (built once per machine, then cached) and bundles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmimg.guest.kernel import KernelInfo, find_or_build_kernel

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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vmimg cache for one test module's builds and boots."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where one test module's bundles are built."""
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="module")
def erofs_bundle(sample_ref: str, kernel_file: str, cache_dir: Path, bundle_dir: Path) -> Path:
    """The busybox sample built with the defaults (an erofs root under dm-verity)."""
    return build(sample_ref, bundle_dir / "erofs", cache_dir, kernel_file)


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


def run_then_stop(
    bundle: Path, cache: Path, *args: str, ready: str = "WAITING", timeout: float = 300
) -> tuple[int, str]:
    """`vmimg run BUNDLE ARGS...` until the console shows `ready`, then SIGTERM to vmimg (what
    a CI runner's cancel does): returns its exit code and everything the console printed."""
    env = {**os.environ, "VMIMG_CACHE": str(cache)}
    proc = subprocess.Popen([*VMIMG, "run", str(bundle), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if ready in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + out


TRAP_TERM = "trap 'echo GOT-TERM; exit 42' TERM; echo WAITING; while true; do sleep 1; done"
