"""The run config: what one boot changes from the image's config (docs/agent.md, "Run
config"), in the format the agent reads (agent/src/runcfg.c).

`vmimg run` writes it onto a small read-only disk whose virtio serial is `vmimg-run`, never
onto the kernel command line, which every guest process can read in /proc/cmdline: it may
hold environment values and secrets. `vmimg exec` sends the same format as its request.

Format: a first line `vmimg-run-config 1`, then one line per item: space-separated fields,
each percent-escaped (`protocol.escape`), the first the key. A secret's bytes are written as
lower-case hex, so that any byte, NUL too, can be carried.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from vmimg.errors import AgentError
from vmimg.guest.protocol import escape, unescape

RUN_CONFIG_MAGIC = b"vmimg-run-config"
RUN_CONFIG_VERSION = 1
RUN_DISK_SERIAL = "vmimg-run"  # the agent finds the run disk by this virtio serial
SECTOR = 512  # the run disk is padded with NULs to whole sectors (and at least one NUL)
MAX_RUN_MOUNTS = 32
MAX_SECRETS = 64
MAX_SECRET_BYTES = 500 * 1024  # as Docker's secrets
MAX_RUN_DISK_BYTES = 64 << 20
MAX_WINSIZE = 65535
MOUNT_KINDS = ("volume", "disk")
MOUNT_MODES = ("ro", "rw", "data")  # data: rw, and a fresh disk's root goes to the workload's user
SECRET_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
SECRETS_DIR = "/run/secrets"
_SINGLE_KEYS = ("cwd", "user", "hostname")
_NUMBER_KEYS = ("rows", "cols", "stop_timeout", "stop_signal")
MAX_ID = 2**32 - 2  # as the agent's config: (uid_t)-1 is not a value
MAX_SIGNAL = 65  # Linux signals run 1..64


def check_guest_path(path: str, what: str) -> str:
    """An absolute guest path without `.` or `..` parts, not `/` itself."""
    parts = path.split("/")
    if not path.startswith("/") or path == "/" or any(p in (".", "..") for p in parts):
        raise AgentError(f"{what} must be an absolute guest path other than / "
                         f"(no . or .. parts): {path!r}")  # fmt: skip
    return path


def check_secret_name(name: str) -> str:
    if not SECRET_NAME.fullmatch(name) or name in (".", ".."):
        raise AgentError(f"secret name {name!r} may hold only letters, digits, '.', '_', '-'")
    return name


@dataclass(frozen=True)
class GuestMount:
    """Something the agent mounts: a 9p volume by tag, or a disk by its virtio serial."""

    kind: str  # "volume" or "disk"
    source: str  # the 9p mount tag, or the disk's serial
    target: str  # the guest path; "" for a disk left unmounted
    mode: str = "rw"  # "ro", "rw" or "data"

    def check(self) -> None:
        if self.kind not in MOUNT_KINDS or self.mode not in MOUNT_MODES or not self.source:
            raise AgentError(f"bad guest mount {self}")
        if self.kind == "volume" and self.mode == "data":
            raise AgentError("a volume cannot be a data disk")
        if self.target or self.kind == "volume":
            check_guest_path(self.target, "a mount point")


@dataclass(frozen=True)
class Secret:
    """A secret's name and bytes; the bytes never appear in a repr (logs, tracebacks)."""

    name: str
    data: bytes = field(repr=False)

    def check(self) -> None:
        check_secret_name(self.name)
        if len(self.data) > MAX_SECRET_BYTES:
            raise AgentError(f"secret {self.name} is larger than {MAX_SECRET_BYTES} bytes")


@dataclass(frozen=True)
class RunConfig:
    """What a boot (or an exec) changes; None and empty leave the image's values."""

    argv: tuple[str, ...] | None = None  # replaces the whole command (entrypoint + cmd)
    env: tuple[str, ...] = ()  # "K=V", replacing K or adding it
    cwd: str | None = None
    user: str | None = None  # name|uid[:group|gid], resolved in the guest
    hostname: str | None = None
    tty: bool | None = None  # False: the console without echo or newline translation
    stdin: bool | None = None  # False: the workload's stdin is /dev/null
    rows: int | None = None
    cols: int | None = None
    stop_timeout: int | None = None  # seconds between the stop signal and SIGKILL
    stop_signal: int | None = None  # what a stop request sends the workload
    mounts: tuple[GuestMount, ...] = ()
    secrets: tuple[Secret, ...] = field(default=(), repr=False)

    def check(self) -> None:
        if self.argv is not None and not self.argv:
            raise AgentError("the run config's command is empty")
        for item in self.env:
            key, sep, _ = item.partition("=")
            if not sep or not key:
                raise AgentError(f"environment entry {item!r} is not KEY=VALUE")
        if self.cwd is not None and not self.cwd.startswith("/"):
            raise AgentError(f"working directory must be absolute: {self.cwd!r}")
        if self.user is not None and (not self.user or self.user.startswith(":")):
            raise AgentError(f"bad user {self.user!r}")
        for size in (self.rows, self.cols):
            if size is not None and not 0 < size <= MAX_WINSIZE:
                raise AgentError(f"terminal size {size} is out of range")
        if self.stop_timeout is not None and not 0 <= self.stop_timeout <= MAX_ID:
            raise AgentError(f"stop timeout {self.stop_timeout} is out of range")
        if self.stop_signal is not None and not 0 < self.stop_signal < MAX_SIGNAL:
            raise AgentError(f"stop signal {self.stop_signal} is not a signal number")
        if len(self.mounts) > MAX_RUN_MOUNTS:
            raise AgentError(f"at most {MAX_RUN_MOUNTS} volumes and disks")
        for m in self.mounts:
            m.check()
        if len(self.secrets) > MAX_SECRETS:
            raise AgentError(f"at most {MAX_SECRETS} secrets")
        names = [s.name for s in self.secrets]
        for s in self.secrets:
            s.check()
        if len(set(names)) != len(names):
            raise AgentError("two secrets have the same name")

    def to_bytes(self) -> bytes:
        """The run config file (docs/agent.md)."""
        self.check()
        lines: list[list[str | bytes]] = []
        lines += [["arg", a] for a in self.argv or ()]
        lines += [["env", e] for e in self.env]
        lines += [[k, v] for k in _SINGLE_KEYS if (v := getattr(self, k)) is not None]
        for key in ("tty", "stdin"):
            if (flag := getattr(self, key)) is not None:
                lines.append([key, "1" if flag else "0"])
        lines += [[k, str(v)] for k in _NUMBER_KEYS if (v := getattr(self, k)) is not None]
        lines += [[m.kind, m.source, m.target, m.mode] for m in self.mounts]
        lines += [["secret", s.name, s.data.hex().encode()] for s in self.secrets]
        out = [RUN_CONFIG_MAGIC + b" %d" % RUN_CONFIG_VERSION]
        for fields in lines:
            out.append(b" ".join(_field(f) for f in fields))
        return b"\n".join(out) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> RunConfig:
        """Parse a run config (the inverse of `to_bytes`, for tests and tools)."""
        lines = data.rstrip(b"\0").split(b"\n")
        if lines[0] != RUN_CONFIG_MAGIC + b" %d" % RUN_CONFIG_VERSION:
            raise AgentError(f"not a version {RUN_CONFIG_VERSION} run config")
        values: dict[str, object] = {}
        argv: list[str] = []
        env: list[str] = []
        mounts: list[GuestMount] = []
        secrets: list[Secret] = []
        for line in lines[1:]:
            if not line or line.startswith(b"#"):
                continue
            raw = line.split(b" ")
            key = raw[0].decode("ascii", "replace")
            if key == "secret" and len(raw) == 3:
                name = os.fsdecode(unescape(raw[1]))
                secrets.append(Secret(name, bytes.fromhex(raw[2].decode())))
                continue
            f = [os.fsdecode(unescape(r)) for r in raw[1:]]
            if key == "arg":
                argv.append(f[0])
            elif key == "env":
                env.append(f[0])
            elif key in MOUNT_KINDS:
                mounts.append(GuestMount(key, f[0], f[1], f[2]))
            elif key in ("tty", "stdin"):
                values[key] = f[0] == "1"
            elif key in _NUMBER_KEYS:
                values[key] = int(f[0])
            elif key in _SINGLE_KEYS:
                values[key] = f[0]
        return cls(argv=tuple(argv) or None, env=tuple(env), mounts=tuple(mounts),
                   secrets=tuple(secrets), **values)  # type: ignore[arg-type]  # fmt: skip


def _field(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else escape(os.fsencode(value))


def run_disk_image(config: RunConfig) -> bytes:
    """The run disk's content: the run config, NUL-padded to whole sectors (at least one
    NUL, which tells the agent where the text ends)."""
    data = config.to_bytes()
    if len(data) >= MAX_RUN_DISK_BYTES:
        raise AgentError(f"the run config is larger than {MAX_RUN_DISK_BYTES} bytes")
    padded = (len(data) // SECTOR + 1) * SECTOR
    return data + bytes(padded - len(data))
