"""`vmimg run`: boot a bundle the way `docker run` starts a container.

What the run changes from the image (command, environment, user, directory, hostname,
volumes, disks, secrets) travels on a small read-only disk holding the run config
(guest/runconfig.py), never on the kernel command line; the host file is removed as soon as
QEMU has opened it. Every VM gets a state directory (boot/state.py) with its console log,
its QMP socket and, for agents that serve it, the exec channel's socket.

In the foreground the console is relayed through vmimg rather than handed to QEMU, so that
vmimg can watch the agent's markers (the workload's exit code becomes ours) and keep an
escape key: with -it, Ctrl-] asks the guest to shut down (ACPI power button -> agent -> the
workload's stop signal); pressed twice, it kills the VM. SIGINT and SIGTERM to vmimg ask the
guest to shut down; a second one within the grace period kills it. With -d, QEMU runs on by
itself, its console in the state directory.

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
from dataclasses import dataclass, field

from vmimg.boot.accel import choose_accel
from vmimg.boot.devices import (
    DISK_SERIAL,
    DataDisk,
    ExtraDisk,
    Volume,
    data_disk_path,
    disk_args,
    ensure_data_disk,
    exec_port_args,
    run_disk_args,
    volume_args,
)
from vmimg.boot.launch import LaunchOptions, PortForward, qemu_command
from vmimg.boot.state import (
    CONSOLE_LOG,
    EXEC_SOCKET,
    QEMU_LOG,
    QMP_SOCKET,
    RUN_DISK,
    VmRecord,
    VmState,
    create,
    process_start,
)
from vmimg.boot.vm import VM, BootResult, TimedMarker, qemu_missing, qmp_command
from vmimg.bundle.format import Bundle, load_bundle, record_rootfs_change
from vmimg.errors import AgentError, BootError, UsageError
from vmimg.guest.protocol import MARKER_PREFIX, RUN_CONFIG_PROTOCOL, BootOptions, kernel_args
from vmimg.guest.runconfig import GuestMount, RunConfig, Secret, run_disk_image
from vmimg.image.cache import Cache

ESCAPE_KEY = b"\x1d"  # Ctrl-]
EOF_KEY = b"\x04"  # Ctrl-D: end of input for the guest console's canonical mode
DOUBLE_ESCAPE_SECONDS = 2.0
SHUTDOWN_GRACE_SECONDS = DOUBLE_ESCAPE_SECONDS * 5  # a second request within: kill
STDIN_POLL_SECONDS = 0.2
QMP_READY_SECONDS = 60.0  # QEMU answers QMP once every device (the run disk too) is open
QMP_POLL_SECONDS = 0.05
EXIT_NO_REPORT = 125  # the VM ended without the agent's exit report
SHELL = "/bin/sh"
FILE_MODE = 0o600


@dataclass(frozen=True)
class RunOptions:
    accel: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    publish: tuple[PortForward, ...] = ()
    cmd: str | None = None  # a shell command instead of the image's command
    command: tuple[str, ...] | None = None  # docker's [COMMAND [ARG...]]: replaces Cmd
    entrypoint: tuple[str, ...] | None = None  # replaces Entrypoint (and drops Cmd)
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    network: str = "user"  # or "none"
    name: str | None = None
    remove: bool = False  # --rm
    interactive: bool = False  # -i: stdin goes to the guest console
    tty: bool = False  # -t: the console is a terminal for the workload
    detach: bool = False
    volumes: tuple[Volume, ...] = ()
    disks: tuple[ExtraDisk, ...] = ()
    data: tuple[DataDisk, ...] = ()
    secrets: tuple[Secret, ...] = field(default=(), repr=False)
    stop_timeout: int | None = None  # seconds from the stop signal to SIGKILL (image: 10)
    stop_signal: int | None = None  # default: the image's STOPSIGNAL, else SIGTERM
    persist: bool = False  # let the guest write to the bundle's ext4 image
    timeout: float | None = None
    console_all: bool = False  # kernel messages and the agent's marker lines too


@dataclass
class RunResult:
    exit_code: int
    accel: str
    accel_reason: str
    reported: bool  # the agent reported an exit code
    name: str = ""
    detached: bool = False
    warnings: list[str] = field(default_factory=list)


def _check_options(opts: RunOptions) -> None:
    if opts.cmd is not None and (opts.command or opts.entrypoint is not None):
        raise UsageError("--cmd runs a shell command: it does not mix with COMMAND or "
                         "--entrypoint")  # fmt: skip
    if opts.network not in ("user", "none"):
        raise UsageError(f"--network is user or none, not {opts.network!r}")
    if opts.network == "none" and opts.publish:
        raise UsageError("--publish needs a network: not with --network none")
    if opts.detach and (opts.interactive or opts.tty):
        raise UsageError("-d runs the VM on its own: no -i or -t (use `vmimg exec -it`)")
    if opts.detach and (opts.persist or opts.timeout is not None):
        raise UsageError("--persist and --timeout need vmimg to stay: not with -d")
    if opts.tty and opts.interactive and not os.isatty(sys.stdin.fileno()):
        raise UsageError("-it needs a terminal on stdin (without one, use -i alone)")
    targets = [v.guest_dir for v in opts.volumes] + [d.guest_dir for d in opts.data]
    targets += [d.guest_dir for d in opts.disks if d.guest_dir]
    if len(set(targets)) != len(targets):
        raise UsageError("two volumes or disks are mounted on the same guest directory")


def _argv(bundle: Bundle, opts: RunOptions) -> tuple[str, ...] | None:
    """The whole command the guest runs, or None for the image's own."""
    if opts.cmd is not None:
        return (SHELL, "-c", opts.cmd)
    if opts.entrypoint is not None:
        argv = (*opts.entrypoint, *(opts.command or ()))
    elif opts.command:
        workload = bundle.vm.workload
        if workload is None or workload.entrypoint is None:
            raise UsageError(f"{bundle.dir} predates run-time commands (vm.json has no "
                             "entrypoint): give --entrypoint too, or rebuild it")  # fmt: skip
        argv = (*workload.entrypoint, *opts.command)
    else:
        return None
    if not argv:
        raise UsageError("the command is empty: give COMMAND or --entrypoint")
    return argv


def _run_config(bundle: Bundle, opts: RunOptions, mounts: list[GuestMount]) -> RunConfig:
    rows = cols = None
    if opts.tty and os.isatty(sys.stdin.fileno()):
        size = os.get_terminal_size(sys.stdin.fileno())
        rows, cols = size.lines or None, size.columns or None
    try:
        config = RunConfig(
            argv=_argv(bundle, opts), env=opts.env, cwd=opts.workdir, user=opts.user,
            hostname=opts.hostname, tty=opts.tty, stdin=opts.interactive, rows=rows, cols=cols,
            stop_timeout=opts.stop_timeout, stop_signal=opts.stop_signal, mounts=tuple(mounts),
            secrets=opts.secrets,
        )  # fmt: skip
        config.check()
    except AgentError as e:
        raise UsageError(str(e)) from None
    return config


def _needs_run_config(opts: RunOptions) -> bool:
    return bool(
        opts.command or opts.entrypoint is not None or opts.env or opts.workdir or opts.user
        or opts.hostname or opts.volumes or opts.disks or opts.data or opts.secrets
        or opts.interactive or opts.tty or opts.stop_timeout is not None
        or opts.stop_signal is not None
    )  # fmt: skip


@dataclass
class _Devices:
    """The QEMU arguments beside the root disk, and the run disk file to remove."""

    args: list[str] = field(default_factory=list)
    run_disk: str | None = None
    warnings: list[str] = field(default_factory=list)
    exec_channel: bool = False


def _devices(bundle: Bundle, opts: RunOptions, state: VmState) -> _Devices:
    dev = _Devices()
    if bundle.vm.init.type != "agent" or bundle.vm.init.protocol < RUN_CONFIG_PROTOCOL:
        if _needs_run_config(opts):
            raise BootError(f"{bundle.dir} was built by an older vmimg whose agent cannot take "
                            "run-time options: rebuild it")  # fmt: skip
        return dev
    mounts: list[GuestMount] = []
    for i, volume in enumerate(opts.volumes):
        args, mount = volume_args(i, volume)
        dev.args += args
        mounts.append(mount)
    for i, disk in enumerate(opts.disks):
        dev.args += disk_args(i, disk.file, disk.read_only)
        mode = "ro" if disk.read_only else "rw"
        mounts.append(GuestMount("disk", DISK_SERIAL.format(i), disk.guest_dir, mode))
    for j, data in enumerate(opts.data, start=len(opts.disks)):
        path = data_disk_path(bundle.dir, data.guest_dir)
        made = ensure_data_disk(path, data.size)
        if not made and os.path.getsize(path) != data.size:
            dev.warnings.append(f"data disk {path} is kept at its size "
                                f"({os.path.getsize(path)} bytes), not resized")  # fmt: skip
        dev.args += disk_args(j, path, False)
        mounts.append(GuestMount("disk", DISK_SERIAL.format(j), data.guest_dir, "data"))
    config = _run_config(bundle, opts, mounts)
    dev.run_disk = state.path(RUN_DISK)
    fd = os.open(dev.run_disk, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(run_disk_image(config))
    dev.args += run_disk_args(dev.run_disk)
    dev.args += exec_port_args(state.socket(EXEC_SOCKET))
    dev.exec_channel = True
    return dev


def _remove(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _wait_for_qmp(qmp: str, alive: Callable[[], bool]) -> bool:
    """Wait until QEMU answers on QMP (every device open) or dies; whether it answered."""
    deadline = time.monotonic() + QMP_READY_SECONDS
    while time.monotonic() < deadline:
        if not alive():
            return False
        with contextlib.suppress(OSError, ValueError):
            qmp_command(qmp, "query-status")
            return True
        time.sleep(QMP_POLL_SECONDS)
    return False


@contextlib.contextmanager
def _raw_terminal(fd: int, wanted: bool) -> Iterator[bool]:
    """The terminal in raw mode for the session (when wanted and a terminal); yields whether."""
    if not wanted or not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _Shutdown:
    """Asks the guest to shut down once; kills the VM when asked again within the grace."""

    def __init__(self, vm: VM, qmp: str) -> None:
        self.vm = vm
        self.qmp = qmp
        self.asked_at: float | None = None

    def request(self) -> None:
        now = time.monotonic()
        if self.asked_at is not None and now - self.asked_at < SHUTDOWN_GRACE_SECONDS:
            self.vm.kill()
            return
        self.asked_at = now
        with contextlib.suppress(OSError, ValueError):
            qmp_command(self.qmp, "system_powerdown")


# The last loglevel= on the command line wins: no kernel message reaches the console but
# a panic's (a panic raises the level itself).
SILENT_KERNEL_ARGS = ("loglevel=0",)
MARKER_START = (MARKER_PREFIX + " ").encode()


class ConsoleFilter:
    """The guest console without the agent's marker lines. The agent writes each marker as
    "\\n@@vmimg@@ ...\\n" (its own newline first, so that it starts a line): the empty line
    that newline makes goes with the marker, so what is left is the workload's output as it
    wrote it. Bytes are held back only while they could still belong to a marker: the start
    of a line, and an empty line until the next line shows it is no marker's. A line's own
    newline is never held (a reader waiting for it would wait for the next line), and a
    prompt that ends without a newline shows at once."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write
        self.held = b""  # the start of the current line, not yet known to be a marker or not
        self.eol = b""  # a held empty line's newline: dropped if the next line is a marker
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
        if complete:  # a whole line that is no marker
            text, eol = _split_eol(self.held)
            self.held = b""
            if not text:  # an empty line: perhaps the one before a marker, held
                shown, self.eol = self.eol, eol
                return shown
            shown, self.eol = self.eol + text + eol, b""
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
            self.mode = _START
            return data
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


def _relay_stdin(
    vm: VM, proc_stdin: int, shutdown: _Shutdown, raw: bool, started: threading.Event
) -> None:
    """stdin to the guest console, from when the workload runs: bytes sent earlier could
    reach the serial port before the kernel has set it up, and be lost."""
    last_escape = 0.0
    last_byte = b"\n"
    while vm.running and not started.wait(STDIN_POLL_SECONDS):
        pass
    while vm.running:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], STDIN_POLL_SECONDS)
        if not ready:
            continue
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            if not raw:  # end of input: ^D ends a line, a second ^D on an empty one is EOF
                with contextlib.suppress(OSError):
                    os.write(proc_stdin, EOF_KEY if last_byte == b"\n" else EOF_KEY * 2)
            return
        last_byte = data[-1:]
        if raw and ESCAPE_KEY in data:
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

    QEMU failing before the guest ran (a published port already in use, a missing device,
    a data disk another VM holds) is a VM that could not be started; anything QEMU printed
    later goes to stderr as is.
    """
    said = result.stderr.strip()
    # A positive status is QEMU's own error exit; a negative one, a signal (a kill we sent).
    if not result.markers and (result.returncode or 0) > 0:
        reason = said.splitlines()[-1] if said else f"QEMU exited with status {result.returncode}"
        raise BootError(f"the VM did not start: {reason}")
    if said:
        sys.stderr.write(said + "\n")


def _launch(bundle: Bundle, opts: RunOptions, accel: str, state: VmState, dev: _Devices,
            console: str) -> list[str]:  # fmt: skip
    boot = BootOptions(cmd=opts.cmd) if opts.cmd is not None and not dev.exec_channel else None
    launch = LaunchOptions(
        accel=accel,
        vcpus=opts.vcpus,
        memory_mib=opts.memory_mib,
        publish=opts.publish,
        snapshot=not opts.persist,
        network=opts.network != "none",
        serial=console,
        qmp_socket=state.socket(QMP_SOCKET),
        extra_cmdline=(
            *(kernel_args(options=boot)[1:] if boot else ()),
            *(() if opts.console_all or opts.detach else SILENT_KERNEL_ARGS),
        ),
        extra=tuple(dev.args),
    )
    return qemu_command(bundle.vm, bundle.dir, opts=launch)


def run_bundle(bundle_dir: str, opts: RunOptions, cache: Cache) -> RunResult:
    _check_options(opts)
    bundle = load_bundle(bundle_dir)  # vm.json and every file checked before anything boots
    vm_json = bundle.vm
    if vm_json.init.type != "agent" and opts.cmd:
        raise BootError("--cmd needs a bundle built with the agent")
    if opts.persist and vm_json.rootfs.type != "ext4":
        raise BootError(f"--persist needs an ext4 bundle; {bundle_dir} has {vm_json.rootfs.type}")
    accel = choose_accel(bundle.kernel_path, cache, opts.accel)
    state = create(opts.name)
    try:
        dev = _devices(bundle, opts, state)
        record = VmRecord(
            name=state.name, bundle=os.path.abspath(bundle_dir), detached=opts.detach,
            remove=opts.remove, started_at=time.time(), ports=[str(p) for p in opts.publish],
            exec_channel=dev.exec_channel,
        )  # fmt: skip
        state.save(record)
        if opts.detach:
            _detached(bundle, opts, accel.name, state, dev, record)
            return RunResult(0, accel.name, accel.reason, False, state.name, True, dev.warnings)
        result = _foreground(bundle, opts, accel.name, state, dev, record, cache)
    except BaseException:
        try:
            running = state.running()
        except BootError:  # no record yet
            running = False
        if not running:
            state.remove()
        raise
    result.accel_reason = accel.reason
    result.warnings = dev.warnings
    return result


def _foreground(bundle: Bundle, opts: RunOptions, accel: str, state: VmState, dev: _Devices,
                record: VmRecord, cache: Cache) -> RunResult:  # fmt: skip
    out = sys.stdout.buffer

    def write(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    shown = None if opts.console_all else ConsoleFilter(write)
    echo = shown or write
    try:
        with cache.temp_dir() as tmp:
            env = {**os.environ, "TMPDIR": tmp}
            argv = _launch(bundle, opts, accel, state, dev, "stdio")
            started = threading.Event()

            def on_marker(m: TimedMarker) -> None:
                if m.marker.event == "exec":
                    started.set()

            vm = VM(argv, console_log=state.path(CONSOLE_LOG), env=env, echo=echo,
                    on_marker=on_marker)  # fmt: skip
            shutdown = _Shutdown(vm, state.socket(QMP_SOCKET))
            old_handlers = {
                s: signal.signal(s, lambda *_: shutdown.request())
                for s in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                raw_wanted = opts.interactive and opts.tty
                with _raw_terminal(sys.stdin.fileno(), raw_wanted) as raw:
                    vm.start(stdin=subprocess.PIPE if opts.interactive else subprocess.DEVNULL)
                    record.pid = vm.pid
                    record.pid_start = process_start(vm.pid) or 0
                    state.save(record)
                    if _wait_for_qmp(state.socket(QMP_SOCKET), lambda: vm.running):
                        _remove(dev.run_disk)
                    if opts.interactive:
                        relay = threading.Thread(
                            target=_relay_stdin,
                            args=(vm, vm.stdin_fd, shutdown, raw, started),
                            daemon=True,
                        )  # fmt: skip
                        relay.start()
                    result = vm.wait(opts.timeout)
            finally:
                vm.kill()
                if shown is not None:
                    shown.flush()
                for s, h in old_handlers.items():
                    signal.signal(s, h)
                if opts.persist:
                    record_rootfs_change(bundle)
    finally:
        _remove(dev.run_disk)
    exit_marker = result.last("exit")
    code = int(exit_marker.marker.fields.get("code", EXIT_NO_REPORT)) if exit_marker else None
    record.exit_code, record.ended_at = code, time.time()
    if opts.remove:
        state.remove()
    else:
        state.save(record)
    if exit_marker is None:
        _explain_no_report(result)
        return RunResult(EXIT_NO_REPORT, accel, "", False, state.name)
    return RunResult(code if code is not None else EXIT_NO_REPORT, accel, "", True, state.name)


def _detached(bundle: Bundle, opts: RunOptions, accel: str, state: VmState, dev: _Devices,
              record: VmRecord) -> None:  # fmt: skip
    """QEMU on its own: its own session, no death signal tied to vmimg, the console in the
    state directory. Returns once QEMU has every device open (the run disk is then removed)."""
    console = state.path(CONSOLE_LOG)
    argv = _launch(bundle, opts, accel, state, dev, f"file:{console}")
    env = {**os.environ, "TMPDIR": state.dir}
    try:
        with open(state.path(QEMU_LOG), "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=env, start_new_session=True)  # fmt: skip
    except FileNotFoundError:
        raise qemu_missing(argv[0]) from None
    try:
        record.pid = proc.pid
        record.pid_start = process_start(proc.pid) or 0
        state.save(record)
        ready = _wait_for_qmp(state.socket(QMP_SOCKET), lambda: proc.poll() is None)
    finally:
        _remove(dev.run_disk)
    if not ready:
        proc.kill()
        proc.wait()
        with open(state.path(QEMU_LOG), errors="replace") as f:
            said = f.read().strip().splitlines()
        raise BootError(f"the VM did not start: {said[-1] if said else 'QEMU did not answer'}")
