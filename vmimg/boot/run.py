"""`vmimg run`: boot a bundle with the console attached.

The console is relayed through vmimg rather than handed to QEMU, so that
vmimg can watch the agent's markers (the workload's exit code becomes ours)
and keep an escape key: Ctrl-] asks the guest to shut down (ACPI power
button -> agent -> SIGTERM to the workload); pressed twice, it kills the VM.
Ctrl-C goes to the workload, as `docker run -it` does. When stdin is not a
terminal, SIGINT and SIGTERM to vmimg ask the guest to shut down instead.

The console carries more than the workload's output: the kernel's messages and the
agent's marker lines. Unless asked for all of it (`vmimg run -v`), the guest boots with
`loglevel=0` (the kernel prints nothing on the console but a panic, whatever vm.json's
command line says) and marker lines are dropped on the way through.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vmimg.boot.accel import choose_accel
from vmimg.boot.launch import LaunchOptions, qemu_command
from vmimg.boot.vm import VM, BootResult, qmp_command
from vmimg.bundle.format import load_bundle, record_rootfs_change
from vmimg.errors import BootError
from vmimg.guest.protocol import MARKER_PREFIX, BootOptions, kernel_args
from vmimg.image.cache import Cache

ESCAPE_KEY = b"\x1d"  # Ctrl-]
DOUBLE_ESCAPE_SECONDS = 2.0
STDIN_POLL_SECONDS = 0.2
EXIT_NO_REPORT = 125  # the VM ended without the agent's exit report
# The last loglevel= on the command line wins: no kernel message reaches the console but
# a panic's (a panic raises the level itself).
SILENT_KERNEL_ARGS = ("loglevel=0",)
MARKER_START = (MARKER_PREFIX + " ").encode()


@dataclass(frozen=True)
class RunOptions:
    accel: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    publish: tuple[tuple[int, int], ...] = ()
    cmd: str | None = None
    persist: bool = False  # let the guest write to the bundle's ext4 image
    timeout: float | None = None
    console_all: bool = False  # kernel messages and the agent's marker lines too


@dataclass
class RunResult:
    exit_code: int
    accel: str
    accel_reason: str
    reported: bool  # the agent reported an exit code


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[bool]:
    """Put the terminal in raw mode for the session; yields whether it is a terminal."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _Shutdown:
    """Asks the guest to shut down once; kills the VM when asked again."""

    def __init__(self, vm: VM, qmp: str) -> None:
        self.vm = vm
        self.qmp = qmp
        self.asked_at: float | None = None

    def request(self) -> None:
        now = time.monotonic()
        if self.asked_at is not None and now - self.asked_at < DOUBLE_ESCAPE_SECONDS * 5:
            self.vm.kill()
            return
        self.asked_at = now
        with contextlib.suppress(OSError, ValueError):
            qmp_command(self.qmp, "system_powerdown")


class ConsoleFilter:
    """The guest console without the agent's marker lines. The agent writes each marker as
    "\\n@@vmimg@@ ...\\n" (its own newline first, so that it starts a line): that newline
    goes with the marker, so what is left is the workload's output as it wrote it. Bytes
    are held back only while they could still belong to a marker: the start of a line, and
    a line's newline until the next line shows it is no marker's; so a prompt that ends
    without a newline shows at once."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write
        self.held = b""  # the start of the current line, not yet known to be a marker or not
        self.eol = b""  # the last line's newline: dropped if the next line is a marker
        self.cr = b""  # a "\\r" that ended a chunk: the start of a "\\r\\n", perhaps
        self.mode = _START

    def __call__(self, chunk: bytes) -> None:
        out = bytearray()
        while chunk:
            nl = chunk.find(b"\n")
            end = len(chunk) if nl < 0 else nl + 1
            piece, chunk = chunk[:end], chunk[end:]
            complete = nl >= 0
            if self.mode == _DROP:
                self.mode = _START if complete else _DROP
            elif self.mode == _PASS:
                out += self._rest_of_line(piece, complete)
            else:
                out += self._start_of_line(piece, complete)
        if out:
            self.write(bytes(out))

    def _start_of_line(self, piece: bytes, complete: bool) -> bytes:
        self.held += piece
        probe = self.held.lstrip(b"\r")
        if probe.startswith(MARKER_START):  # a marker: it goes, with the newline before it
            self.held = self.eol = b""
            self.mode = _START if complete else _DROP
            return b""
        if complete:  # a whole line that is no marker (an empty one, say)
            text, eol = _split_eol(self.held)
            shown, self.held, self.eol = self.eol + text, b"", eol
            return shown
        if MARKER_START.startswith(probe):
            return b""  # could still be a marker: wait for more
        shown, held, self.held, self.eol = self.eol, self.held, b"", b""
        self.mode = _PASS
        return shown + self._rest_of_line(held, False)

    def _rest_of_line(self, piece: bytes, complete: bool) -> bytes:
        """Text of a line known to be no marker; its newline is kept back (`eol`)."""
        data, self.cr = self.cr + piece, b""
        if complete:
            text, self.eol = _split_eol(data)
            self.mode = _START
            return text
        if data.endswith(b"\r"):
            data, self.cr = data[:-1], b"\r"
        return data

    def flush(self) -> None:
        rest, self.held, self.eol, self.cr = self.eol + self.held + self.cr, b"", b"", b""
        if rest:
            self.write(rest)


_START, _PASS, _DROP = "start", "pass", "drop"  # where ConsoleFilter is in a line


def _split_eol(line: bytes) -> tuple[bytes, bytes]:
    """A complete line's text and its newline (\\r\\n from a serial console, or \\n)."""
    if line.endswith(b"\r\n"):
        return line[:-2], b"\r\n"
    return line[:-1], b"\n"


def _relay_stdin(vm: VM, proc_stdin: int, shutdown: _Shutdown, is_tty: bool) -> None:
    last_escape = 0.0
    while vm.running:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], STDIN_POLL_SECONDS)
        if not ready:
            continue
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            return
        if is_tty and ESCAPE_KEY in data:
            now = time.monotonic()
            if now - last_escape < DOUBLE_ESCAPE_SECONDS:
                vm.kill()
                return
            last_escape = now
            shutdown.request()
            data = data.replace(ESCAPE_KEY, b"")
        with contextlib.suppress(OSError):
            os.write(proc_stdin, data)


def _explain_no_report(result: BootResult) -> None:
    """The VM ended without the agent's exit report: say what QEMU said about it.

    QEMU failing before the guest ran (a published port already in use, a missing device)
    is a VM that could not be started; anything QEMU printed later goes to stderr as is.
    """
    said = result.stderr.strip()
    # A positive status is QEMU's own error exit; a negative one, a signal (a kill we sent).
    if not result.markers and (result.returncode or 0) > 0:
        reason = said.splitlines()[-1] if said else f"QEMU exited with status {result.returncode}"
        raise BootError(f"the VM did not start: {reason}")
    if said:
        sys.stderr.write(said + "\n")


def run_bundle(bundle: str, opts: RunOptions, cache: Cache) -> RunResult:
    loaded = load_bundle(bundle)  # vm.json and every file checked before anything boots
    vm_json = loaded.vm
    if vm_json.init.type != "agent" and opts.cmd:
        raise BootError("--cmd needs a bundle built with the agent")
    if opts.persist and vm_json.rootfs.type != "ext4":
        raise BootError(f"--persist needs an ext4 bundle; {bundle} has {vm_json.rootfs.type}")
    accel = choose_accel(loaded.kernel_path, cache, opts.accel)
    with cache.temp_dir() as tmp:
        qmp = os.path.join(tmp, "qmp.sock")
        launch = LaunchOptions(
            accel=accel.name,
            vcpus=opts.vcpus,
            memory_mib=opts.memory_mib,
            publish=opts.publish,
            snapshot=not opts.persist,
            qmp_socket=qmp,
            extra_cmdline=(
                *kernel_args(options=BootOptions(cmd=opts.cmd))[1:],
                *(() if opts.console_all else SILENT_KERNEL_ARGS),
            ),
        )
        out = sys.stdout.buffer

        def write(chunk: bytes) -> None:
            out.write(chunk)
            out.flush()

        shown = None if opts.console_all else ConsoleFilter(write)
        echo = shown or write

        env = {**os.environ, "TMPDIR": tmp}
        vm = VM(qemu_command(vm_json, bundle, opts=launch), env=env, echo=echo)
        shutdown = _Shutdown(vm, qmp)
        old_handlers = {
            s: signal.signal(s, lambda *_: shutdown.request())
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            with _raw_terminal(sys.stdin.fileno()) as is_tty:
                vm.start(stdin=subprocess.PIPE)
                relay = threading.Thread(
                    target=_relay_stdin, args=(vm, vm.stdin_fd, shutdown, is_tty), daemon=True
                )
                relay.start()
                result = vm.wait(opts.timeout)
        finally:
            vm.kill()
            if shown is not None:
                shown.flush()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if opts.persist:
                record_rootfs_change(loaded)
    exit_marker = result.last("exit")
    if exit_marker is None:
        _explain_no_report(result)
        return RunResult(EXIT_NO_REPORT, accel.name, accel.reason, False)
    return RunResult(
        int(exit_marker.marker.fields.get("code", EXIT_NO_REPORT)), accel.name, accel.reason, True
    )
