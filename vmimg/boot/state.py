"""What vmimg knows about the VMs `vmimg run` started, for `vmimg ps`, `logs`, `stop`,
`exec` and `rm`: one private directory per VM name under the state root.

The state root is $XDG_RUNTIME_DIR/vmimg, else /run/user/UID/vmimg, else vmimg-UID in the
temporary directory; it and every VM's directory are mode 0700 and must belong to us (a
directory another user made in /tmp is refused, never used). A VM's directory holds its
record (state.json), its console log, QEMU's stderr and the QMP and exec sockets.

A VM is running only while its QEMU process is: the record names QEMU's pid and the
process's start time, which /proc must still show (a reused pid has another start time, a
zombie is not running). Anything else is exited, with the exit code the agent reported on
the console, if it did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field

from vmimg.errors import BootError, UsageError
from vmimg.guest.protocol import parse_markers

STATE_ENV = "XDG_RUNTIME_DIR"
RUN_USER_DIR = "/run/user"
STATE_DIR_NAME = "vmimg"
RECORD = "state.json"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
QMP_SOCKET = "qmp.sock"
EXEC_SOCKET = "exec.sock"
EXEC_LOCK = "exec.lock"
RUN_DISK = "run.img"
PRIVATE_MODE = 0o700
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the NUL
CONSOLE_TAIL = 64 * 1024  # where the exit marker is looked for
PROC_STAT_STATE = 0  # fields after the command name in /proc/PID/stat
PROC_STAT_STARTTIME = 19
GONE_STATES = ("Z", "X")


def state_root() -> str:
    """The state root, made (0700) if missing and checked to be ours and private."""
    runtime = os.environ.get(STATE_ENV)
    user_dir = os.path.join(RUN_USER_DIR, str(os.getuid()))
    if runtime:
        root = os.path.join(runtime, STATE_DIR_NAME)
    elif os.path.isdir(user_dir):
        root = os.path.join(user_dir, STATE_DIR_NAME)
    else:
        root = os.path.join(tempfile.gettempdir(), f"{STATE_DIR_NAME}-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, PRIVATE_MODE)
    check_private_dir(root)
    return root


def check_private_dir(path: str) -> None:
    """BootError unless `path` is a real directory of ours that nobody else may enter."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise BootError(f"{path} is not a private directory of this user: remove it, or set "
                        f"{STATE_ENV}")  # fmt: skip


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(f"a VM name is 1-64 letters, digits, '_', '.', '-' (a letter or digit "
                         f"first), not {name!r}")  # fmt: skip
    return name


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[PROC_STAT_STATE].decode() in GONE_STATES:
        return None
    return int(fields[PROC_STAT_STARTTIME])


@dataclass
class VmRecord:
    """state.json: what `vmimg run` recorded about one VM."""

    name: str
    bundle: str
    detached: bool
    remove: bool  # --rm: the state goes when the VM ends
    started_at: float
    ports: list[str] = field(default_factory=list)
    pid: int = 0  # QEMU's
    pid_start: int = 0
    exec_channel: bool = False  # the agent serves `vmimg exec`
    exit_code: int | None = None  # recorded by a foreground run
    ended_at: float | None = None


@dataclass
class VmState:
    """One VM's state directory."""

    dir: str

    @property
    def name(self) -> str:
        return os.path.basename(self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def socket(self, name: str) -> str:
        path = self.path(name)
        if len(os.fsencode(path)) > SOCKET_PATH_MAX:
            raise BootError(f"the socket path {path} is too long: set {STATE_ENV} to a short "
                            "directory")  # fmt: skip
        return path

    def load(self) -> VmRecord:
        try:
            with open(self.path(RECORD)) as f:
                return VmRecord(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise BootError(f"the state of VM {self.name} is unreadable: {e}") from None

    def save(self, record: VmRecord) -> None:
        tmp = self.path(f".{RECORD}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(asdict(record), f, indent=2)
        os.replace(tmp, self.path(RECORD))

    def running(self, record: VmRecord | None = None) -> bool:
        rec = record or self.load()
        return rec.pid > 0 and process_start(rec.pid) == rec.pid_start

    def exit_code(self, record: VmRecord | None = None) -> int | None:
        """The exit code the agent reported (recorded, or found at the console's end)."""
        rec = record or self.load()
        if rec.exit_code is not None:
            return rec.exit_code
        try:
            with open(self.path(CONSOLE_LOG), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - CONSOLE_TAIL))
                tail = f.read()
        except OSError:
            return None
        codes = [m.fields.get("code", "") for m in parse_markers(tail) if m.event == "exit"]
        return int(codes[-1]) if codes and codes[-1].isdigit() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _reap_removed(root: str, name: str) -> None:
    """A --rm VM that has ended since: its state goes now."""
    state = VmState(os.path.join(root, name))
    try:
        rec = state.load()
    except BootError:
        return
    if rec.remove and rec.pid and not state.running(rec):
        state.remove()


def create(name: str | None) -> VmState:
    """A fresh state directory for a new VM, named `name` or a new random name."""
    root = state_root()
    for _ in range(100):
        chosen = check_name(name) if name is not None else f"vm-{secrets.token_hex(3)}"
        _reap_removed(root, chosen)
        path = os.path.join(root, chosen)
        try:
            os.mkdir(path, PRIVATE_MODE)
        except FileExistsError:
            if name is not None:
                raise BootError(f"the name {name} is in use: `vmimg rm {name}` removes an "
                                "ended VM's state") from None  # fmt: skip
            continue
        return VmState(path)
    raise BootError("no free VM name")


def get(name: str) -> VmState:
    root = state_root()
    check_name(name)
    _reap_removed(root, name)
    state = VmState(os.path.join(root, name))
    if not os.path.isfile(state.path(RECORD)):
        raise BootError(f"no VM named {name} (`vmimg ps -a` lists them)")
    return state


def list_all() -> list[VmState]:
    root = state_root()
    names = sorted(n for n in os.listdir(root) if NAME.fullmatch(n))
    for n in names:
        _reap_removed(root, n)
    return [VmState(os.path.join(root, n)) for n in names
            if os.path.isfile(os.path.join(root, n, RECORD))]  # fmt: skip


def wait_gone(state: VmState, record: VmRecord, timeout: float, poll: float = 0.1) -> bool:
    """Wait up to `timeout` seconds for the VM's QEMU to end; whether it did."""
    deadline = time.monotonic() + timeout
    while state.running(record):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True
