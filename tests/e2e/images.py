"""The container side of the end-to-end workflow: a local base image, podman, and the examples.

Shared by the e2e tests and `bench/e2e.py`:

- `base_tar()`: Debian bookworm minbase from debootstrap (bench/fixtures.py's tree) as a tar,
  with the apt settings Debian's container images carry, cached per machine. Imported into
  podman it stands in for `debian:bookworm-slim`, so Dockerfile builds need no registry.
- `Podman`: the podman CLI on one storage (vfs driver, its own --root/--runroot), building
  without a network pull and without `podman run` (chroot isolation).
- `VmimgRun`: `vmimg run BUNDLE --publish ...` in the background, with its console in a file,
  stopped by SIGTERM as a service manager would.
- `wait_for_http()` / `http_get()`: the host's view of the service inside the VM.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLES = REPO / "examples"
VMIMG = [sys.executable, "-m", "vmimg"]

BASE_TAGS = ("docker.io/library/debian:bookworm-slim", "localhost/debian:bookworm-slim")
BASE_TAR_NAME = "debian-bookworm-slim.tar"
# What `podman import` records in the image config, as Debian's own images have them.
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD ["bash"]',
)
# Pseudo file systems: the directories stay in the image, their contents never do.
EMPTY_DIRS = ("dev", "proc", "sys")

# Debian's container images tell apt to keep no caches and dpkg to skip documentation, so
# that `RUN apt-get install` layers hold only what was installed. Our base does the same.
_APT_CLEAN = (
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
    'Dir::Cache::pkgcache "";\n'
    'Dir::Cache::srcpkgcache "";\n'
)
_DPKG_NODOC = (
    "path-exclude /usr/share/doc/*\n"
    "path-include /usr/share/doc/*/copyright\n"
    "path-exclude /usr/share/man/*\n"
    "path-exclude /usr/share/info/*\n"
)
BASE_EXTRA_FILES = {
    "etc/apt/apt.conf.d/docker-clean": _APT_CLEAN,
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
    "etc/dpkg/dpkg.cfg.d/docker-nodoc": _DPKG_NODOC,
}

PODMAN_BUILD_TIMEOUT = 1800.0
SERVICE_START_TIMEOUT = 30.0
HTTP_POLL_SECONDS = 0.05
HTTP_TIMEOUT = 10.0
STOP_TIMEOUT = 120.0


# -- the base image ------------------------------------------------------------------------


def _debootstrap_tree() -> str:
    """bench/fixtures.py's debootstrap minbase tree (made there once per machine)."""
    from bench import fixtures

    tree = os.path.join(fixtures.bench_dir(), "debootstrap-minbase")
    if not os.path.exists(tree):
        fixtures._debootstrap(tree)
    return tree


def _skip_pseudo_fs(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = info.name.split("/")
    # "./dev/null" -> [".", "dev", "null"]: keep "./dev" itself, drop what is inside.
    if len(parts) > 2 and parts[1] in EMPTY_DIRS:
        return None
    return info


def base_tar() -> str:
    """The base image's root as a tar, cached beside the bench fixtures; made on first use."""
    from bench import fixtures

    path = os.path.join(fixtures.bench_dir(), BASE_TAR_NAME)
    if os.path.exists(path):
        return path
    tree = _debootstrap_tree()
    tmp = path + ".partial"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(tree, arcname=".", filter=_skip_pseudo_fs)
        for name, text in sorted(BASE_EXTRA_FILES.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(os.stat(tree).st_mtime)
            tf.addfile(info, io.BytesIO(data))
    os.rename(tmp, path)
    return path


# -- podman --------------------------------------------------------------------------------


class PodmanError(RuntimeError):
    pass


@dataclass(frozen=True)
class Podman:
    """The podman CLI on one storage: `base` is podman plus its global storage options."""

    base: tuple[str, ...]

    def __call__(self, *args: str, timeout: float = 600.0) -> str:
        r = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if r.returncode != 0:
            lines = r.stderr.strip().splitlines()
            # The last lines, and any error lines of the build's own tools (pip, apt) above.
            errors = [ln for ln in lines[:-5] if ln.lstrip().startswith(("ERROR", "E: "))]
            tail = " | ".join([*errors[-3:], *lines[-5:]])
            raise PodmanError(f"podman {args[0]} failed ({r.returncode}): {tail}")
        return r.stdout

    def has_image(self, ref: str) -> bool:
        return (
            subprocess.run(
                [*self.base, "image", "exists", ref], capture_output=True, check=False
            ).returncode
            == 0
        )

    def import_base(self) -> str:
        """Import the base tar as debian:bookworm-slim unless it is there; returns its ID."""
        if not self.has_image(BASE_TAGS[0]):
            changes = [a for c in BASE_CHANGES for a in ("--change", c)]
            self("import", "--quiet", *changes, base_tar(), BASE_TAGS[0])
        for tag in BASE_TAGS[1:]:
            self("tag", BASE_TAGS[0], tag)
        return self("image", "inspect", "--format", "{{.Id}}", BASE_TAGS[0]).strip()

    def build(self, context: Path, tag: str, *extra: str, layers: bool = True) -> str:
        """`podman build` the way it works without a registry or `podman run`; returns the ID.

        With `layers`, each step is cached in the storage, so building again after a change is
        quick. vfs stores every step as a whole copy of the file system, so a big image is
        built without them (`layers=False`): one working copy per stage instead of one per step.
        """
        self(
            "build",
            "--isolation", "chroot", "--network", "host", "--pull=never",
            f"--layers={str(layers).lower()}",
            "--quiet", "-t", tag, *extra, str(context),
            timeout=PODMAN_BUILD_TIMEOUT,
        )  # fmt: skip
        return self("image", "inspect", "--format", "{{.Id}}", tag).strip()

    def build_example(self, name: str) -> str:
        """Build examples/NAME as localhost/NAME:latest; returns that reference."""
        ref = f"localhost/{name}:latest"
        self.build(EXAMPLES / name, ref)
        return ref

    def image_size(self, ref: str) -> int:
        """The image's size as podman reports it (its layers, uncompressed)."""
        return int(self("image", "inspect", "--format", "{{.Size}}", ref).strip())

    def save(self, ref: str, path: Path, fmt: str = "docker-archive") -> Path:
        self("save", "--quiet", "--format", fmt, "-o", str(path), ref)
        return path


def podman_base(root: Path, runroot: Path) -> tuple[str, ...]:
    return (
        "podman", "--storage-driver", "vfs", "--root", str(root), "--runroot", str(runroot),
    )  # fmt: skip


@contextlib.contextmanager
def podman_service(podman: Podman, sock: Path) -> Iterator[str]:
    """`podman system service` on a unix socket while the context lasts: yields DOCKER_HOST."""
    log = sock.with_suffix(".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*podman.base, "system", "service", "--time=0", f"unix://{sock}"],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PodmanError(f"podman service did not start: {log.read_text()[-2000:]}")
            time.sleep(HTTP_POLL_SECONDS)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(SERVICE_START_TIMEOUT)


# -- the service in the VM -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HttpReply:
    status: int
    body: str
    seconds: float  # how long the request took


def http_get(port: int, path: str = "/", timeout: float = HTTP_TIMEOUT) -> HttpReply:
    """One GET on a new connection, as curl makes it."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    return HttpReply(resp.status, body, time.perf_counter() - t0)


class VmimgRun:
    """`vmimg run BUNDLE --publish HOST:GUEST` in the background; a context manager.

    The console goes to `log`. `stop()` sends SIGTERM, which `vmimg run` turns into an ACPI
    power-button press: the agent forwards SIGTERM to the workload and powers off after it.
    Leaving the context kills whatever is still running.
    """

    def __init__(
        self,
        bundle: Path,
        host_port: int,
        guest_port: int,
        log: Path,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.argv = [*VMIMG, "run", str(bundle), "--publish", f"{host_port}:{guest_port}", *extra]
        self.port = host_port
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def __enter__(self) -> VmimgRun:
        with open(self.log, "wb") as out:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env,
            )  # fmt: skip
        return self

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_http(self, path: str = "/", timeout: float = 300.0) -> HttpReply:
        """Poll until the service answers 200; `seconds` is the time since `vmimg run` started.

        QEMU's user network accepts a forwarded connection before anything in the guest
        listens and then drops it, so only a whole HTTP answer counts.
        """
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"vmimg run ended before serving:\n{self.console()[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                reply = http_get(self.port, path, timeout=2.0)
                if reply.status == 200:
                    reply.seconds = time.monotonic() - self.started
                    return reply
            time.sleep(HTTP_POLL_SECONDS)
        raise TimeoutError(f"no HTTP 200 within {timeout:.0f}s:\n{self.console()[-3000:]}")

    def wait_for_console(self, text: str, timeout: float = 120.0) -> str:
        """Wait until the console shows `text`; returns the line that holds it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = not self.running()  # checked first: a last line may still be in flight
            for line in self.console().splitlines():
                if text in line:
                    return line
            if ended:
                break
            time.sleep(HTTP_POLL_SECONDS)
        raise TimeoutError(f"{text!r} not on the console:\n{self.console()[-3000:]}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM to `vmimg run`, then its exit code (the workload's, as the agent reports it)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # QEMU dies with it (PR_SET_PDEATHSIG)
            self.proc.wait()


def qemu_processes(bundle: Path) -> list[str]:
    """Command lines of QEMU processes still running this bundle."""
    out = subprocess.run(
        ["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in out.splitlines() if str(bundle) in line]
