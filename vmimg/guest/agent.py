"""The init agent: finding its binary, its config and tree manifest, and
putting them into a Tree.

The agent (agent/, C) is PID 1 in the guest. Python decides everything at
build time and writes it into the image as two small line-based files the C
side reads without a JSON parser; both formats are versioned and described
in docs/agent.md:

- /.vmimg/config: the workload (argv, env, cwd, uid/gid/groups, hostname).
- /.vmimg/manifest: every path of the image with its metadata and content
  sha256, for the agent's verify mode.

Values in both are percent-escaped (`escape`), so any byte except NUL fits.
The agent talks back through marker lines on the console (`parse_markers`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmimg.arch import Arch
from vmimg.errors import AgentError
from vmimg.guest.protocol import INIT_PATH, escape, unescape
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType, Tree

CONFIG_MAGIC = b"vmimg-agent-config"
CONFIG_VERSION = 1
MANIFEST_MAGIC = b"vmimg-manifest"
MANIFEST_VERSION = 1

AGENT_DIR = b"/.vmimg"
AGENT_CONFIG = b"/.vmimg/config"
AGENT_MANIFEST = b"/.vmimg/manifest"
AGENT_SCRATCH = b"/.vmimg/mnt"  # empty mount point the agent uses on read-only roots
AGENT_INIT = INIT_PATH.encode()

MAX_ID = 0xFFFFFFFF  # uid_t and gid_t are 32 bits
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_STOP_TIMEOUT = 10
DEFAULT_STOP_SIGNAL = int(signal.SIGTERM)
OVERLAY_MODES = ("auto", "always", "never")
# uids and gids run 0..2^32-2: 2^32-1 is (uid_t)-1, which setuid() and chown() read as
# "leave unchanged". The agent refuses larger values in its config (agent/src/config.h).
MAX_ID = 2**32 - 2
# Decimal ids with more significant digits than this are out of range whatever they say;
# they are not converted (int() refuses strings past a few thousand digits anyway).
_ID_DIGITS = len(str(MAX_ID))
INIT_MODES = ("agent", "image")

# Exit codes the agent reports for its own failures (as container runtimes do).
EXIT_AGENT_ERROR = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # vmimg/
_SOURCE_ROOT = _PACKAGE_DIR.parent
_PACKAGED = _PACKAGE_DIR / "_agent"
_BINARY_ENV = "VMIMG_AGENT_BINARY"


class AgentBinaryMissing(AgentError):
    """No built agent binary for the requested architecture."""


# --- ids ------------------------------------------------------------------------

_DECIMAL = re.compile(r"[0-9]+")


def parse_decimal(text: str) -> int | None:
    """An ASCII decimal number, or None for anything else (str.isdigit() would also take
    "²" and "٣", which int() rejects or reads). Numbers too long to be an id come back as
    MAX_ID + 1, so that range checks refuse them without converting thousands of digits."""
    if not _DECIMAL.fullmatch(text):
        return None
    significant = text.lstrip("0") or "0"
    return MAX_ID + 1 if len(significant) > _ID_DIGITS else int(significant)


def check_id(value: int, what: str) -> int:
    """`value` if it can be a uid or gid; else AgentError naming `what` (field and file)."""
    if not 0 <= value <= MAX_ID:
        shown = str(value) if value != MAX_ID + 1 else "too large"
        raise AgentError(f"{what} is out of range ({shown}; ids run 0..{MAX_ID})")
    return value


# --- the binary -------------------------------------------------------------


# What the Makefile cross-compiles with, for the hint when the binary is missing.
_AGENT_TOOLCHAIN_HINT = {
    Arch.X86_64: "needs musl-gcc: apt-get install musl-tools",
    Arch.ARM64: "needs aarch64-linux-musl-gcc: dpkg --add-architecture arm64 && apt-get update "
    "&& apt-get install gcc-aarch64-linux-gnu musl-dev:arm64",
}


# ELF e_machine of each agent arch (vmimg/arch.py): an x86_64 agent in an arm64 image would
# only show up as a kernel panic at boot, so a mismatch is caught at build time.
_ELF_MAGIC = b"\x7fELF"
_ELF_MACHINE_OFFSET = 18


def _check_binary_arch(path: str, arch: str) -> None:
    """AgentBinaryMissing if `path` is an ELF file for another machine than `arch`."""
    with open(path, "rb") as f:
        head = f.read(_ELF_MACHINE_OFFSET + 2)
    known = Arch.parse(arch)
    if known is None or not head.startswith(_ELF_MAGIC):
        return  # not an ELF file (a test stand-in) or an arch we have no number for
    machine = int.from_bytes(head[_ELF_MACHINE_OFFSET:], "little")
    if machine != known.elf_machine:
        raise AgentBinaryMissing(f"agent binary {path} is for ELF machine {machine}, not {arch}")


def agent_arch(arch: str) -> str:
    """The agent's name for `arch` (x86_64, aarch64), given a kernel/OCI/agent name."""
    known = Arch.parse(arch)
    return known.gnu if known is not None else arch


def find_agent_binary(arch: str = Arch.X86_64.gnu) -> str:
    """The agent binary for `arch`: $VMIMG_AGENT_BINARY, the source tree's
    agent/build/<arch>/init, or a copy packaged as vmimg/_agent/<arch>/init.

    `arch` may be the kernel's or OCI's name (arm64, amd64) as well as the agent's."""
    arch = agent_arch(arch)
    override = os.environ.get(_BINARY_ENV)
    if override:
        if not os.path.isfile(override):
            raise AgentBinaryMissing(f"{_BINARY_ENV}={override} is not a file")
        _check_binary_arch(override, arch)
        return override
    candidates = [_SOURCE_ROOT / "agent" / "build" / arch / "init", _PACKAGED / arch / "init"]
    for path in candidates:
        if path.is_file():
            _check_binary_arch(str(path), arch)
            return str(path)
    raise AgentBinaryMissing(
        f"no agent binary for {arch} (looked at {', '.join(map(str, candidates))}); "
        f"build it with `make -C agent ARCH={arch}` "
        f"({_toolchain_hint(arch)})"
    )


def _toolchain_hint(arch: str) -> str:
    known = Arch.parse(arch)
    return _AGENT_TOOLCHAIN_HINT[known] if known else "needs a static C cross compiler"


def host_arch() -> str:
    """The agent architecture name of this machine (x86_64, aarch64)."""
    return agent_arch(platform.machine())


# --- config -------------------------------------------------------------------


@dataclass
class AgentConfig:
    """What the agent runs, resolved at build time."""

    argv: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    hostname: str | None = None
    overlay: str = "auto"
    smoke: str | None = None
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    stop_signal: int = DEFAULT_STOP_SIGNAL  # the image's STOPSIGNAL, as a number

    def to_bytes(self) -> bytes:
        """The /.vmimg/config file (docs/agent.md)."""
        if not self.argv:
            raise AgentError("agent config has no command")
        if self.overlay not in OVERLAY_MODES:
            raise AgentError(f"overlay must be one of {OVERLAY_MODES}, not {self.overlay!r}")
        if not self.cwd.startswith("/"):
            raise AgentError(f"working directory must be absolute: {self.cwd!r}")
        check_id(self.uid, f"agent config uid {self.uid}")
        check_id(self.gid, f"agent config gid {self.gid}")
        for g in self.groups:
            check_id(g, f"agent config supplementary group {g}")
        check_id(self.stop_timeout, f"agent config stop_timeout {self.stop_timeout}")
        items: list[tuple[str, str]] = [("arg", a) for a in self.argv]
        items += [("env", e) for e in self.env]
        items += [("cwd", self.cwd), ("uid", str(self.uid)), ("gid", str(self.gid))]
        items += [("group", str(g)) for g in self.groups]
        if self.hostname is not None:
            items.append(("hostname", self.hostname))
        items.append(("overlay", self.overlay))
        if self.smoke is not None:
            items.append(("smoke", self.smoke))
        items.append(("stop_timeout", str(self.stop_timeout)))
        if self.stop_signal != DEFAULT_STOP_SIGNAL:
            items.append(("stop_signal", str(self.stop_signal)))
        lines = [CONFIG_MAGIC + b" %d" % CONFIG_VERSION]
        lines += [key.encode() + b" " + escape(os.fsencode(value)) for key, value in items]
        return b"\n".join(lines) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentConfig:
        """Parse a config file; the inverse of `to_bytes` (for tests and tools)."""
        lines = data.split(b"\n")
        if lines[0] != CONFIG_MAGIC + b" %d" % CONFIG_VERSION:
            raise AgentError(f"not a version {CONFIG_VERSION} agent config: {lines[0]!r}")
        cfg = cls(argv=[])
        for line in lines[1:]:
            if not line or line.startswith(b"#"):
                continue
            key, _, raw = line.partition(b" ")
            value = os.fsdecode(unescape(raw))
            _set_config_key(cfg, key.decode("ascii", "replace"), value)
        return cfg


def _config_number(key: str, value: str) -> int:
    number = parse_decimal(value)
    if number is None:
        raise AgentError(f"agent config {key} {value!r} is not a decimal number")
    return check_id(number, f"agent config {key}")


def _set_config_key(cfg: AgentConfig, key: str, value: str) -> None:
    if key == "arg":
        cfg.argv.append(value)
    elif key == "env":
        cfg.env.append(value)
    elif key == "cwd":
        cfg.cwd = value
    elif key in ("uid", "gid", "stop_timeout", "stop_signal"):
        setattr(cfg, key, _config_number(key, value))
    elif key == "group":
        cfg.groups.append(_config_number(key, value))
    elif key in ("hostname", "overlay", "smoke"):
        setattr(cfg, key, value)
    # unknown keys are skipped, as the agent does


@dataclass
class ConfigOverrides:
    """What a user may change at build time (docker run's options, roughly).

    Setting `entrypoint` drops the image's Cmd unless `cmd` is given too, as
    `docker run --entrypoint` does. `env` entries ("K=V") replace or add.
    """

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    overlay: str | None = None
    smoke: str | None = None


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def _read_text(tree: Tree, reader: ContentReader, path: bytes) -> str | None:
    """A small text file of the image, following symlinks inside the tree."""
    node = _resolve(tree, path)
    if node is None or node.type is not NodeType.FILE:
        return None
    assert node.content is not None
    return reader.read_all(node.content).decode("utf-8", "replace")


def _resolve(tree: Tree, path: bytes, depth: int = 0) -> Node | None:
    """The node at `path`, following a final symlink (absolute or relative)."""
    node = tree.get(path)
    if node is None or node.type is not NodeType.SYMLINK or depth > 8:
        return node
    assert node.target is not None
    base = path.rsplit(b"/", 1)[0] or b"/"
    target = node.target if node.target.startswith(b"/") else base + b"/" + node.target
    parts: list[bytes] = []
    for part in target.split(b"/"):
        if part == b"..":
            if parts:
                parts.pop()
        elif part not in (b"", b"."):
            parts.append(part)
    return _resolve(tree, b"/" + b"/".join(parts), depth + 1)


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def parse_passwd(text: str) -> list[PasswdEntry]:
    """The entries of an /etc/passwd with decimal ids. Ids are range-checked only when an
    entry is used (`resolve_user`): an odd line the workload never uses does not matter."""
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) < 7:
            continue
        uid, gid = parse_decimal(f[2]), parse_decimal(f[3])
        if uid is not None and gid is not None:
            out.append(PasswdEntry(f[0], uid, gid, f[5]))
    return out


def parse_group(text: str) -> list[GroupEntry]:
    """The entries of an /etc/group with a decimal gid (range-checked when used)."""
    out = []
    for line in text.splitlines():
        f = line.split(":")
        gid = parse_decimal(f[2]) if len(f) >= 4 else None
        if gid is not None:
            members = tuple(m for m in f[3].split(",") if m)
            out.append(GroupEntry(f[0], gid, members))
    return out


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    groups: list[int]
    home: str


def resolve_user(
    spec: str, passwd: Sequence[PasswdEntry], groups: Sequence[GroupEntry]
) -> ResolvedUser:
    """Resolve "name", "uid", "name:group" or "uid:gid" as runc does: a name
    must exist; a number need not (it then gets gid 0 and HOME=/);
    supplementary groups are the /etc/group entries listing the user."""
    user_part, _, group_part = (spec or "0").partition(":")
    entry: PasswdEntry | None
    number = parse_decimal(user_part)
    if number is not None:
        uid = check_id(number, f"uid {user_part} in User {spec!r}")
        entry = next((p for p in passwd if p.uid == uid), None)
    else:
        entry = next((p for p in passwd if p.name == user_part), None)
        if entry is None:
            raise AgentError(f"user {user_part!r} is not in the image's /etc/passwd")
        uid = check_id(entry.uid, f"uid of user {entry.name!r} in the image's /etc/passwd")
    gid = 0
    if entry is not None:
        gid = check_id(entry.gid, f"gid of user {entry.name!r} in the image's /etc/passwd")
    if group_part:
        number = parse_decimal(group_part)
        if number is not None:
            gid = check_id(number, f"gid {group_part} in User {spec!r}")
        else:
            group = next((g for g in groups if g.name == group_part), None)
            if group is None:
                raise AgentError(f"group {group_part!r} is not in the image's /etc/group")
            gid = check_id(group.gid, f"gid of group {group.name!r} in the image's /etc/group")
    supplementary: list[int] = []
    if entry is not None:
        for g in groups:
            if entry.name in g.members and g.gid != gid and g.gid not in supplementary:
                what = f"gid of group {g.name!r} (lists {entry.name!r}) in the image's /etc/group"
                supplementary.append(check_id(g.gid, what))
    home = entry.home if entry and entry.home else "/"
    return ResolvedUser(uid, gid, supplementary, home)


def _id(text: str, what: str) -> int:
    value = int(text)
    if value > MAX_ID:
        raise AgentError(f"{what} id {text[:32]} is larger than {MAX_ID}")
    return value


def _merge_env(base: Iterable[str], extra: Iterable[str]) -> list[str]:
    """Later "K=V" entries replace earlier ones with the same K, in place."""
    merged: dict[str, str] = {}
    for item in (*base, *extra):
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise AgentError(f"environment entry {item!r} is not KEY=VALUE")
        merged[key] = item
    return list(merged.values())


def command_parts(
    image_config: Mapping[str, Any], overrides: ConfigOverrides | None = None
) -> tuple[list[str], list[str]]:
    """The workload's entrypoint and cmd (argv is the two in a row): overriding the
    entrypoint drops the image's Cmd unless a cmd is given too, as `docker run --entrypoint`
    does."""
    o = overrides or ConfigOverrides()
    if o.entrypoint is not None:
        entrypoint = list(o.entrypoint)
    else:
        entrypoint = list(image_config.get("Entrypoint") or [])
    if o.cmd is not None:
        cmd = list(o.cmd)
    elif o.entrypoint is not None:
        cmd = []
    else:
        cmd = list(image_config.get("Cmd") or [])
    return entrypoint, cmd


def resolve_config(
    image_config: Mapping[str, Any],
    tree: Tree,
    reader: ContentReader,
    overrides: ConfigOverrides | None = None,
) -> AgentConfig:
    """The agent config for an image: `image_config` is the OCI image config's
    "config" object (Entrypoint, Cmd, Env, WorkingDir, User, Hostname)."""
    o = overrides or ConfigOverrides()
    entrypoint, cmd = command_parts(image_config, o)
    argv = entrypoint + cmd
    if not argv:
        raise AgentError("the image has no Entrypoint or Cmd, and none was given")

    passwd = parse_passwd(_read_text(tree, reader, b"/etc/passwd") or "")
    groups = parse_group(_read_text(tree, reader, b"/etc/group") or "")
    user = resolve_user(o.user or image_config.get("User") or "", passwd, groups)

    env = _merge_env(image_config.get("Env") or [], o.env)
    keys = {e.partition("=")[0] for e in env}
    if "PATH" not in keys:
        env.insert(0, "PATH=" + DEFAULT_PATH)
    if "HOME" not in keys:
        env.append("HOME=" + user.home)
    hostname = o.hostname or image_config.get("Hostname") or None
    if hostname and "HOSTNAME" not in keys:
        env.append("HOSTNAME=" + hostname)

    return AgentConfig(
        argv=argv,
        env=env,
        cwd=o.workdir or image_config.get("WorkingDir") or "/",
        uid=user.uid,
        gid=user.gid,
        groups=user.groups,
        hostname=hostname,
        overlay=o.overlay or "auto",
        smoke=o.smoke,
        stop_signal=parse_signal(image_config.get("StopSignal")),
    )


def parse_signal(value: object) -> int:
    """An image config's StopSignal ("SIGQUIT", "QUIT", "3") as a number; SIGTERM if unset."""
    if value is None or value == "":
        return DEFAULT_STOP_SIGNAL
    text = str(value).strip().upper()
    number = parse_decimal(text)
    if number is not None and 0 < number < signal.NSIG:
        return number
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise AgentError(f"the image's StopSignal {value!r} is not a signal") from None


# --- manifest -----------------------------------------------------------------

_TYPE_LETTER = {
    NodeType.FILE: b"f",
    NodeType.DIR: b"d",
    NodeType.SYMLINK: b"l",
    NodeType.CHAR: b"c",
    NodeType.BLOCK: b"b",
    NodeType.FIFO: b"p",
    NodeType.SOCKET: b"s",
}
_LETTER_TYPE = {v: k for k, v in _TYPE_LETTER.items()}
_MANIFEST_FIELDS = 9
_NONE = b"-"


@dataclass(frozen=True)
class ManifestEntry:
    """One path of the image as the agent's verify mode checks it."""

    path: bytes
    type: NodeType
    mode: int
    uid: int
    gid: int
    size: int
    rdev: tuple[int, int] = (0, 0)
    sha256: str | None = None  # files only
    target: bytes | None = None  # symlinks only

    def to_line(self) -> bytes:
        fields = [
            escape(self.path),
            _TYPE_LETTER[self.type],
            b"%04o" % self.mode,
            b"%d" % self.uid,
            b"%d" % self.gid,
            b"%d" % self.size,
            b"%d:%d" % self.rdev,
            self.sha256.encode() if self.sha256 else _NONE,
            escape(self.target) if self.target is not None else _NONE,
        ]
        return b" ".join(fields)

    @classmethod
    def from_line(cls, line: bytes) -> ManifestEntry:
        f = line.split(b" ")
        if len(f) != _MANIFEST_FIELDS or f[1] not in _LETTER_TYPE:
            raise AgentError(f"bad manifest line {line!r}")
        kind = _LETTER_TYPE[f[1]]
        major, _, minor = f[6].partition(b":")
        return cls(
            path=unescape(f[0]),
            type=kind,
            mode=int(f[2], 8),
            uid=int(f[3]),
            gid=int(f[4]),
            size=int(f[5]),
            rdev=(int(major), int(minor)),
            sha256=f[7].decode() if kind is NodeType.FILE else None,
            target=unescape(f[8]) if kind is NodeType.SYMLINK else None,
        )


@dataclass
class Manifest:
    entries: list[ManifestEntry]

    def to_bytes(self) -> bytes:
        """The /.vmimg/manifest file, entries in Tree.walk order."""
        header = MANIFEST_MAGIC + b" %d" % MANIFEST_VERSION
        return b"\n".join([header, *(e.to_line() for e in self.entries)]) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        lines = data.split(b"\n")
        if lines[0] != MANIFEST_MAGIC + b" %d" % MANIFEST_VERSION:
            raise AgentError(f"not a version {MANIFEST_VERSION} manifest: {lines[0]!r}")
        return cls([ManifestEntry.from_line(line) for line in lines[1:] if line])


def _sha256(reader: ContentReader, content: Content) -> str:
    """Hash a file's logical bytes (holes as zeros) without loading it whole."""
    h = hashlib.sha256()
    chunk = 1 << 20
    pos = 0  # logical offset reached
    stored = 0  # offset into the stored runs
    for ext in content.data_extents():
        h.update(bytes(ext.offset - pos))
        for start in range(0, ext.length, chunk):
            n = min(chunk, ext.length - start)
            h.update(reader.read(content, stored + start, n))
        stored += ext.length
        pos = ext.offset + ext.length
    h.update(bytes(content.size - pos))
    return h.hexdigest()


def build_manifest(tree: Tree, reader: ContentReader) -> Manifest:
    """Every path of `tree` except /.vmimg, with content hashes (once per
    hardlinked node)."""
    hashes: dict[int, str] = {}
    entries = []
    for path, node in tree.walk():
        if path == AGENT_DIR or path.startswith(AGENT_DIR + b"/"):
            continue
        digest = None
        if node.type is NodeType.FILE:
            assert node.content is not None
            if id(node) not in hashes:
                hashes[id(node)] = _sha256(reader, node.content)
            digest = hashes[id(node)]
        entries.append(
            ManifestEntry(
                path=path,
                type=node.type,
                mode=node.permissions,
                uid=node.uid,
                gid=node.gid,
                size=node.size,
                rdev=node.rdev if node.type in (NodeType.CHAR, NodeType.BLOCK) else (0, 0),
                sha256=digest,
                target=node.target if node.type is NodeType.SYMLINK else None,
            )
        )
    return Manifest(entries)


# --- injection ----------------------------------------------------------------


def inject_agent(
    tree: Tree,
    config: AgentConfig,
    manifest: Manifest,
    binary_path: str,
    init_mode: str = "agent",
) -> None:
    """Add /.vmimg/{init,config,manifest} (and the empty /.vmimg/mnt) to the
    tree. With init_mode "image" the image's own init boots and nothing is
    added. The image's files are never touched."""
    if init_mode not in INIT_MODES:
        raise AgentError(f"init mode must be one of {INIT_MODES}, not {init_mode!r}")
    if init_mode == "image":
        return
    try:
        binary = Path(binary_path).read_bytes()
    except OSError as e:
        raise AgentBinaryMissing(f"cannot read agent binary {binary_path}: {e.strerror}") from e
    mtime = tree.root.mtime_ns
    tree.add(AGENT_DIR, Node(NodeType.DIR, mode=0o755, mtime_ns=mtime))
    tree.add(AGENT_SCRATCH, Node(NodeType.DIR, mode=0o755, mtime_ns=mtime))
    files = {
        AGENT_INIT: (0o755, binary),
        AGENT_CONFIG: (0o644, config.to_bytes()),
        AGENT_MANIFEST: (0o644, manifest.to_bytes()),
    }
    for path, (mode, data) in files.items():
        node = Node(NodeType.FILE, mode=mode, mtime_ns=mtime, content=Content.from_bytes(data))
        tree.add(path, node)
