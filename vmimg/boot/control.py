"""Working with VMs `vmimg run` started: `vmimg exec` (the host end of the exec channel,
guest/channel.py), `vmimg logs`, `vmimg stop` and `vmimg rm`.

`exec` connects to the VM's exec socket (a virtio-serial port in QEMU), one session at a
time per VM (a lock file orders them), sends the command and relays stdin, stdout, stderr,
signals and the terminal size until the exit frame. `stop` presses the ACPI power button
over QMP, as `vmimg run` does on SIGTERM: the agent sends the workload its stop signal; the
VM is killed if it has not ended after the timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from vmimg.boot.state import (
    CONSOLE_LOG,
    EXEC_LOCK,
    EXEC_SOCKET,
    QMP_SOCKET,
    VmState,
    process_start,
    wait_gone,
)
from vmimg.boot.vm import qmp_command
from vmimg.errors import AgentError, BootError, UsageError
from vmimg.guest import channel
from vmimg.guest.runconfig import RunConfig

READ_CHUNK = 65536
STDIN_CHUNK = 16384
FOLLOW_POLL_SECONDS = 0.2
DEFAULT_STOP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 30.0  # QEMU's socket takes one client; another waits in its backlog


@dataclass(frozen=True)
class ExecOptions:
    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    user: str | None = None
    workdir: str | None = None
    interactive: bool = False
    tty: bool = False


def _running(state: VmState) -> None:
    if not state.running():
        raise BootError(f"VM {state.name} is not running")


@contextlib.contextmanager
def _session_lock(state: VmState) -> Iterator[None]:
    fd = os.open(state.path(EXEC_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _raw(fd: int, wanted: bool) -> Iterator[None]:
    if not wanted:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _terminal_size() -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        size = os.get_terminal_size(sys.stdin.fileno())
        if size.lines and size.columns:
            return size.lines, size.columns
    return None


def _send_stdin(sock: socket.socket, stop: threading.Event) -> None:
    """stdin to the guest in frames; an empty frame at its end."""
    fd = sys.stdin.fileno()
    with contextlib.suppress(OSError):
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], FOLLOW_POLL_SECONDS)
            if not ready:
                continue
            data = os.read(fd, STDIN_CHUNK)
            sock.sendall(channel.frame(channel.STDIN, data))
            if not data:
                return


def exec_in_vm(state: VmState, opts: ExecOptions,
               out: BinaryIO | None = None, err: BinaryIO | None = None) -> int:  # fmt: skip
    """Run a process in the VM; returns its exit code."""
    record = state.load()
    _running(state)
    if not record.exec_channel:
        raise BootError(f"VM {state.name} has no exec channel: its bundle was built by an older "
                        "vmimg")  # fmt: skip
    is_tty = os.isatty(sys.stdin.fileno())
    if opts.tty and opts.interactive and not is_tty:
        raise UsageError("-it needs a terminal on stdin (without one, use -i alone)")
    size = _terminal_size() if opts.tty else None
    try:
        request = RunConfig(
            argv=opts.argv, env=opts.env, cwd=opts.workdir, user=opts.user, tty=opts.tty,
            stdin=opts.interactive, rows=size[0] if size else None,
            cols=size[1] if size else None,
        ).to_bytes()  # fmt: skip
    except AgentError as e:
        raise UsageError(str(e)) from None
    stdout = out or sys.stdout.buffer
    stderr = err or sys.stderr.buffer
    with _session_lock(state), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(state.socket(EXEC_SOCKET))
        except OSError as e:
            raise BootError(f"cannot reach VM {state.name}'s exec channel: {e}") from None
        sock.settimeout(None)
        sock.sendall(channel.HELLO + channel.frame(channel.EXEC, request))
        return _session(sock, opts, stdout, stderr, state)


def _session(sock: socket.socket, opts: ExecOptions, stdout: BinaryIO, stderr: BinaryIO,
             state: VmState) -> int:  # fmt: skip
    stop = threading.Event()
    raw = opts.tty and opts.interactive
    handlers: dict[signal.Signals, Any] = {}

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(channel.signal_frame(signum))

    def resize(_signum: int, _frame: object) -> None:
        size = _terminal_size()
        if size:
            with contextlib.suppress(OSError):
                sock.sendall(channel.winsize_frame(*size))

    if not raw:  # with a raw terminal, ^C reaches the guest as a key
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            handlers[s] = signal.signal(s, forward)
    if opts.tty:
        handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
    try:
        with _raw(sys.stdin.fileno(), raw):
            if opts.interactive:
                threading.Thread(target=_send_stdin, args=(sock, stop), daemon=True).start()
            return _receive(sock, stdout, stderr, state)
    finally:
        stop.set()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _receive(sock: socket.socket, stdout: BinaryIO, stderr: BinaryIO, state: VmState) -> int:
    reader = channel.FrameReader()
    while True:
        data = sock.recv(READ_CHUNK)
        if not data:
            raise BootError(f"VM {state.name} went away during exec")
        for f in reader.feed(data):
            if f.kind == channel.EXIT:
                return f.exit_code
            if f.kind == channel.ERROR:
                msg = f.payload.decode("utf-8", "replace")
                raise BootError(f"the agent refused the exec request: {msg}")
            stream = stdout if f.kind == channel.STDOUT else stderr
            stream.write(f.payload)
            stream.flush()


def stop_vm(state: VmState, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """Press the power button, wait up to `timeout` seconds, then kill. Returns whether the
    VM was running."""
    record = state.load()
    if not state.running(record):
        return False
    with contextlib.suppress(OSError, ValueError):
        qmp_command(state.socket(QMP_SOCKET), "system_powerdown")
    if not wait_gone(state, record, timeout):
        if process_start(record.pid) == record.pid_start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
        wait_gone(state, record, DEFAULT_STOP_TIMEOUT)
    return True


def copy_logs(state: VmState, out: BinaryIO, follow: bool = False) -> None:
    """The console log to `out`; with `follow`, on until the VM has ended."""
    try:
        f = open(state.path(CONSOLE_LOG), "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        while True:
            chunk = f.read(READ_CHUNK)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow or not state.running():
                if follow:  # what QEMU wrote just before it ended
                    out.write(f.read())
                    out.flush()
                return
            time.sleep(FOLLOW_POLL_SECONDS)


def remove_vm(state: VmState, force: bool = False) -> None:
    if state.running():
        if not force:
            raise BootError(f"VM {state.name} is running: stop it first, or use --force")
        stop_vm(state, 0)
    state.remove()
