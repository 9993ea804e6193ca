"""Fixtures that start real services: a registry and a Docker-API engine (podman)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from vmimg.image.cache import Cache
from vmimg.image.sample import write_sample

SERVICE_START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + SERVICE_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start listening on {port}")


def need(tool: str) -> str:
    """Path of a required tool: the README set-up installs them all, so absence is a failure."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{tool} is not installed: run the README set-up")
    return path


REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{extra}
"""


def start_registry(root: str, port: int, extra: str = "") -> subprocess.Popen[bytes]:
    config = os.path.join(root, "config.yml")
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    with open(config, "w") as f:
        f.write(REGISTRY_CONFIG.format(root=os.path.join(root, "data"), port=port, extra=extra))
    proc = subprocess.Popen(
        [need("docker-registry"), "serve", config],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(root, "registry.log"), "wb"),  # noqa: SIM115
    )
    wait_for_port(port, proc, "docker-registry")
    return proc


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Debian docker-registry on a free loopback port: yields HOST:PORT."""
    root = str(tmp_path_factory.mktemp("registry"))
    port = free_port()
    proc = start_registry(root, port)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def podman_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman's Docker-API service on a unix socket, with its own storage: yields DOCKER_HOST."""
    root = tmp_path_factory.mktemp("podman")
    sock = root / "podman.sock"
    # podman refuses a runroot over 50 characters; pytest's temporary paths grow past that.
    runroot = tempfile.mkdtemp(prefix="vmimg-podman-", dir="/tmp")
    base = [
        need("podman"),
        "--storage-driver",
        "vfs",
        "--root",
        str(root / "storage"),
        "--runroot",
        runroot,
    ]
    proc = subprocess.Popen(
        [*base, "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "service.log", "wb"),  # noqa: SIM115
    )
    deadline = time.monotonic() + SERVICE_START_TIMEOUT
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"podman service did not start: {(root / 'service.log').read_text()}"
            )
        time.sleep(0.1)
    os.environ["VMIMG_TEST_PODMAN"] = " ".join(base)
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(20)
    shutil.rmtree(runroot, ignore_errors=True)


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    """Run podman against the test service's storage."""
    base = os.environ["VMIMG_TEST_PODMAN"].split()
    return subprocess.run([*base, *args], capture_output=True, text=True, check=True)


@pytest.fixture(scope="session", autouse=True)
def vm_state_root() -> Iterator[str]:
    """VMs that `vmimg run` starts in tests keep their state (console logs, sockets) in a
    short private directory of the session's, not in the user's $XDG_RUNTIME_DIR."""
    root = tempfile.mkdtemp(prefix="vmimg-rt-", dir="/tmp")
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = root
    yield root
    if old is None:
        os.environ.pop("XDG_RUNTIME_DIR", None)
    else:
        os.environ["XDG_RUNTIME_DIR"] = old
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cache(tmp_path: object) -> Cache:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    return Cache.open(str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def sample_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built-in busybox sample as an OCI layout: yields oci:DIR:latest."""
    return write_sample(str(tmp_path_factory.mktemp("sample") / "layout"))


def skopeo_copy(src: str, dest: str) -> None:
    subprocess.run(
        [
            need("skopeo"),
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--src-tls-verify=false",
            src,
            dest,
        ],
        check=True,
        capture_output=True,
    )


# Fixtures that need the guest kernel vmimg builds (minutes, once per machine): tests using
# them are marked `kernel`, so the default fast tier (pyproject's addopts) leaves them out.
KERNEL_FIXTURES = frozenset({"guest_kernel", "kernel_file"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kernel)
