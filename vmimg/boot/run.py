"""`vmimg run`: boot a bundle with the console attached.

The console is relayed through vmimg rather than handed to QEMU, so that
vmimg can watch the agent's markers (the workload's exit code becomes ours)
and keep an escape key: Ctrl-] asks the guest to shut down (ACPI power
button -> agent -> SIGTERM to the workload); pressed twice, it kills the VM.
Ctrl-C goes to the workload, as `docker run -it` does. When stdin is not a
terminal, SIGINT and SIGTERM to vmimg ask the guest to shut down instead.
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
from collections.abc import Iterator
from dataclasses import dataclass

from vmimg.boot.accel import choose_accel
from vmimg.boot.launch import LaunchOptions, qemu_command
from vmimg.boot.vm import VM, BootResult, qmp_command
from vmimg.bundle.format import load_bundle, record_rootfs_change
from vmimg.errors import BootError
from vmimg.guest.protocol import BootOptions, kernel_args
from vmimg.image.cache import Cache

ESCAPE_KEY = b"\x1d"  # Ctrl-]
DOUBLE_ESCAPE_SECONDS = 2.0
STDIN_POLL_SECONDS = 0.2
EXIT_NO_REPORT = 125  # the VM ended without the agent's exit report


@dataclass(frozen=True)
class RunOptions:
    accel: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    publish: tuple[tuple[int, int], ...] = ()
    cmd: str | None = None
    persist: bool = False  # let the guest write to the bundle's ext4 image
    timeout: float | None = None


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
            extra_cmdline=tuple(kernel_args(options=BootOptions(cmd=opts.cmd))[1:]),
        )
        out = sys.stdout.buffer

        def echo(chunk: bytes) -> None:
            out.write(chunk)
            out.flush()

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
