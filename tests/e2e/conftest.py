"""End-to-end fixtures: example images built with podman, bundles built from them with vmimg.

Images are built once per session in the podman_socket fixture's storage (layers cached
there), from a local stand-in for debian:bookworm-slim; bundles reuse the cached guest kernel.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.boot.conftest import guest_kernel, kernel_file  # noqa: F401 (fixtures used here)
from tests.e2e.images import VMIMG, Podman

VMIMG_TIMEOUT = 900.0


class Examples:
    """The examples as images (built on first use) and bundles, within one test session."""

    def __init__(self, podman: Podman, docker_host: str, cache: Path, kernel: str, root: Path):
        self.podman = podman
        self.cache = cache
        self.kernel = kernel
        self.root = root
        self.env = {**os.environ, "DOCKER_HOST": docker_host, "VMIMG_CACHE": str(cache)}
        self._images: dict[str, str] = {}
        self._bundles: dict[tuple[str, ...], Path] = {}

    def image(self, name: str) -> str:
        """examples/NAME built as localhost/NAME:latest."""
        if name not in self._images:
            self._images[name] = self.podman.build_example(name)
        return self._images[name]

    def vmimg(self, *args: str, timeout: float = VMIMG_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*VMIMG, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    def bundle(self, source: str, *options: str) -> Path:
        """`vmimg build SOURCE OPTIONS` with the cached kernel; one bundle per distinct call."""
        key = (source, *options)
        if key not in self._bundles:
            out = self.root / f"bundle-{len(self._bundles)}"
            r = self.vmimg("build", source, "-o", str(out), "--kernel", self.kernel, *options)
            assert r.returncode == 0, r.stderr
            self._bundles[key] = out
        return self._bundles[key]


@pytest.fixture(scope="session")
def e2e_podman(podman_socket: str) -> Podman:
    """podman on the service's storage, with debian:bookworm-slim imported."""
    podman = Podman(tuple(os.environ["VMIMG_TEST_PODMAN"].split()))
    podman.import_base()
    return podman


@pytest.fixture(scope="session")
def examples(
    e2e_podman: Podman,
    podman_socket: str,
    kernel_file: str,  # noqa: F811 (the fixture imported above)
    tmp_path_factory: pytest.TempPathFactory,
) -> Examples:
    root = tmp_path_factory.mktemp("e2e")
    return Examples(e2e_podman, podman_socket, root / "cache", kernel_file, root)
