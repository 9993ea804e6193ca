"""Running one VM: start QEMU, read its console, collect agent markers, never leak it.

QEMU runs in its own process group with PR_SET_PDEATHSIG, so it dies with
vmimg even when vmimg itself is killed; a timeout or Ctrl-C kills the group.
The console is read on a thread; every marker line is stamped with the host
time it arrived, which gives the wall-clock timings of a boot.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmimg.arch import Arch
from vmimg.errors import BootError
from vmimg.guest.protocol import Marker, parse_markers

PR_SET_PDEATHSIG = 1
READ_CHUNK = 65536
KILL_GRACE_SECONDS = 2.0
QMP_TIMEOUT = 5.0


def qemu_missing(program: str) -> BootError:
    """The error for a QEMU program that is not installed, naming the package to install."""
    name = os.path.basename(program)
    package = next((a.qemu_package for a in Arch if a.qemu == name), "QEMU")
    return BootError(f"{program} not found: install {package}")


@dataclass
class TimedMarker:
    marker: Marker
    at: float  # seconds since QEMU was started (host wall clock)


@dataclass
class BootResult:
    console: str
    markers: list[TimedMarker]
    returncode: int | None
    timed_out: bool
    wall: float
    stderr: str = ""
    started_at: float = 0.0

    def last(self, event: str) -> TimedMarker | None:
        for m in reversed(self.markers):
            if m.marker.event == event:
                return m
        return None

    def all(self, event: str) -> list[TimedMarker]:
        return [m for m in self.markers if m.marker.event == event]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when vmimg goes away, whatever the reason."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class VM:
    """One QEMU process and its console."""

    argv: list[str]
    console_log: str | None = None
    env: dict[str, str] | None = None
    on_marker: Callable[[TimedMarker], None] | None = None
    echo: Callable[[bytes], None] | None = None  # live console output, for `vmimg run`
    _chunks: list[bytes] = field(default_factory=list)
    _markers: list[TimedMarker] = field(default_factory=list)
    _partial: bytes = b""
    _proc: subprocess.Popen[bytes] | None = None
    _t0: float = 0.0

    def start(self, stdin: int | None = subprocess.DEVNULL) -> None:
        self._t0 = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError:
            raise qemu_missing(self.argv[0]) from None
        self._stderr: list[bytes] = []
        self._threads = [
            threading.Thread(target=self._read_console, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_console(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        log = open(self.console_log, "ab") if self.console_log else None  # noqa: SIM115
        try:
            while chunk := os.read(self._proc.stdout.fileno(), READ_CHUNK):
                now = time.monotonic() - self._t0
                self._chunks.append(chunk)
                if log:
                    log.write(chunk)
                    log.flush()
                if self.echo:
                    self.echo(chunk)
                self._scan(chunk, now)
        finally:
            if log:
                log.close()

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := os.read(self._proc.stderr.fileno(), READ_CHUNK):
            self._stderr.append(chunk)

    def _scan(self, chunk: bytes, now: float) -> None:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            for m in parse_markers(line):
                tm = TimedMarker(m, now)
                self._markers.append(tm)
                if self.on_marker:
                    self.on_marker(tm)

    @property
    def markers(self) -> list[TimedMarker]:
        return list(self._markers)

    @property
    def console(self) -> str:
        """What the console printed so far."""
        return b"".join(self._chunks).decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def stdin_fd(self) -> int:
        """QEMU's stdin (the guest console's input), when started with stdin=PIPE."""
        assert self._proc is not None and self._proc.stdin is not None
        return self._proc.stdin.fileno()

    def wait(self, timeout: float | None) -> BootResult:
        """Wait for QEMU to exit by itself; kill it after `timeout` seconds (None: never)."""
        assert self._proc is not None
        timed_out = False
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - self._t0))
        try:
            self._proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        except BaseException:
            self.kill()
            raise
        for t in self._threads:
            t.join(timeout=KILL_GRACE_SECONDS)
        if self._partial:
            self._scan(b"\n", time.monotonic() - self._t0)
        return BootResult(
            console=b"".join(self._chunks).decode("utf-8", "replace"),
            markers=self.markers,
            returncode=self._proc.returncode,
            timed_out=timed_out,
            wall=time.monotonic() - self._t0,
            stderr=b"".join(self._stderr).decode("utf-8", "replace"),
        )

    def kill(self) -> None:
        """Kill QEMU's whole process group, and reap it."""
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=KILL_GRACE_SECONDS)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def qmp_command(
    socket_path: str, command: str, arguments: dict[str, object] | None = None
) -> dict[str, object]:
    """Send one QMP command (after the capabilities handshake); return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(QMP_TIMEOUT)
        s.connect(socket_path)
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd, args in (("qmp_capabilities", None), (command, arguments)):
            request: dict[str, object] = {"execute": cmd}
            if args is not None:
                request["arguments"] = args
            f.write(json.dumps(request).encode() + b"\n")
            f.flush()
            while True:
                reply: dict[str, object] = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply
