"""What `vmimg run` attaches beside the root disk: published ports, volumes (virtio-9p),
extra disks and persistent data disks (virtio-blk, found in the guest by serial), the run
disk (the run config, guest/runconfig.py) and the exec port (virtio-serial).

Each is parsed here from its command line form, turned into QEMU arguments, and into the
`GuestMount` the agent acts on. Nothing here boots anything.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from vmimg.boot.launch import PortForward, qemu_opt
from vmimg.errors import BootError, UsageError
from vmimg.guest.channel import EXEC_PORT_NAME
from vmimg.guest.runconfig import (
    MAX_SECRET_BYTES,
    RUN_DISK_SERIAL,
    GuestMount,
    Secret,
    check_guest_path,
    check_secret_name,
)
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Node, NodeType, Tree
from vmimg.rootfs.writers.ext4 import Ext4Options, write_ext4

MAX_PORT = 65535
PROTOCOLS = ("tcp", "udp")
VOLUME_TAG = "vmimg{}"  # 9p mount tags, one per volume
DISK_SERIAL = "vmimg-disk{}"  # virtio serials (at most 20 bytes), one per disk
DATA_DIR_SUFFIX = ".data"  # BUNDLE.data/ beside the bundle holds its data disks
DATA_DISK_EXT = ".ext4"
DATA_BYTES_PER_INODE = 16384  # as mke2fs's default "default" usage type
MIN_DATA_DISK = 16 << 20
MAX_DATA_DISK = 16 << 40
DATA_DISK_MODE = 0o600
_PUBLISH = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?P<host>\d+):(?P<guest>\d+)(?:/(?P<proto>\w+))?$")


def _port(text: str, what: str) -> int:
    number = int(text)
    if not 0 < number <= MAX_PORT:
        raise UsageError(f"{what} port {text} is not between 1 and {MAX_PORT}")
    return number


def parse_publish(spec: str) -> PortForward:
    """`-p [IP:]HOST:GUEST[/tcp|/udp]`; IP defaults to 127.0.0.1 (not every interface)."""
    m = _PUBLISH.match(spec)
    if not m:
        raise UsageError(f"--publish takes [IP:]HOST:GUEST[/tcp|/udp], not {spec!r}")
    proto = m["proto"] or "tcp"
    if proto not in PROTOCOLS:
        raise UsageError(f"--publish {spec}: protocol must be tcp or udp")
    ip = m["ip"] or "127.0.0.1"
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        raise UsageError(f"--publish {spec}: {ip} is not an IPv4 address") from None
    return PortForward(_port(m["host"], "host"), _port(m["guest"], "guest"), ip, proto)


def _split_mode(spec: str) -> tuple[str, bool]:
    """`X:ro` / `X:rw` -> (X, read_only)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in ("ro", "rw"):
        return head, tail == "ro"
    return spec, False


@dataclass(frozen=True)
class Volume:
    """A host directory shared with the guest over virtio-9p (`-v HOSTDIR:GUESTDIR[:ro]`)."""

    host_dir: str
    guest_dir: str
    read_only: bool = False


def parse_volume(spec: str) -> Volume:
    body, read_only = _split_mode(spec)
    host, sep, guest = body.partition(":")
    if not sep or not host or not guest:
        raise UsageError(f"--volume takes HOSTDIR:GUESTDIR[:ro], not {spec!r}")
    if not os.path.isdir(host):
        raise UsageError(f"--volume {spec}: {host} is not a directory")
    return Volume(os.path.abspath(host), _guest_path(guest, "--volume"), read_only)


@dataclass(frozen=True)
class ExtraDisk:
    """A host file attached as a virtio-blk disk (`--disk FILE[:GUESTDIR][:ro]`); mounted
    (ext4 or erofs) when GUESTDIR is given, else left to the workload as /dev/vdX."""

    file: str
    guest_dir: str = ""
    read_only: bool = False


def parse_disk(spec: str) -> ExtraDisk:
    body, read_only = _split_mode(spec)
    file, _, guest = body.partition(":")
    if not file:
        raise UsageError(f"--disk takes FILE[:GUESTDIR][:ro], not {spec!r}")
    if not os.path.isfile(file):
        raise UsageError(f"--disk {spec}: {file} is not a file")
    if not read_only and not os.access(file, os.W_OK):
        raise UsageError(f"--disk {spec}: {file} is not writable (add :ro)")
    return ExtraDisk(os.path.abspath(file), _guest_path(guest, "--disk") if guest else "",
                     read_only)  # fmt: skip


@dataclass(frozen=True)
class DataDisk:
    """A persistent ext4 disk kept beside the bundle (`--data SIZE:GUESTDIR`)."""

    size: int
    guest_dir: str


def parse_data(spec: str, size_of: Callable[[str], int]) -> DataDisk:
    """`--data SIZE:GUESTDIR`; `size_of` reads SIZE (the CLI's 512M, 2G)."""
    size_text, sep, guest = spec.partition(":")
    if not sep or not guest:
        raise UsageError(f"--data takes SIZE:GUESTDIR, not {spec!r}")
    try:
        size = size_of(size_text)
    except Exception:
        raise UsageError(f"--data {spec}: {size_text!r} is not a size (64M, 2G)") from None
    if not MIN_DATA_DISK <= size <= MAX_DATA_DISK:
        raise UsageError(f"--data {spec}: a data disk is between 16M and 16T")
    return DataDisk(size, _guest_path(guest, "--data"))


def parse_secret(spec: str) -> Secret:
    """`--secret id=NAME,src=FILE` (also `source=`): the file is read now."""
    fields: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("id", "src", "source", "type") or key in fields:
            raise UsageError(f"--secret takes id=NAME,src=FILE, not {spec!r}")
        fields["src" if key == "source" else key] = value
    if fields.get("type", "file") != "file" or "id" not in fields or "src" not in fields:
        raise UsageError(f"--secret takes id=NAME,src=FILE, not {spec!r}")
    try:
        name = check_secret_name(fields["id"])
    except Exception as e:
        raise UsageError(f"--secret: {e}") from None
    try:
        with open(fields["src"], "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise UsageError(f"--secret {name}: cannot read {fields['src']}: {e.strerror}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise UsageError(f"--secret {name}: {fields['src']} is larger than {MAX_SECRET_BYTES} "
                         "bytes")  # fmt: skip
    return Secret(name, data)


def _guest_path(path: str, what: str) -> str:
    try:
        return check_guest_path(path, f"{what} {path}")
    except Exception as e:
        raise UsageError(str(e)) from None


# -- data disks ------------------------------------------------------------------------


def data_dir(bundle: str) -> str:
    """BUNDLE.data/: beside the bundle, since a bundle holds only its listed files."""
    return os.path.abspath(bundle).rstrip("/") + DATA_DIR_SUFFIX


def data_disk_path(bundle: str, guest_dir: str) -> str:
    """BUNDLE.data/<guest dir, %-quoted>.ext4: one disk per guest directory."""
    name = urllib.parse.quote(guest_dir.strip("/"), safe="")
    return os.path.join(data_dir(bundle), name + DATA_DISK_EXT)


def ensure_data_disk(path: str, size: int) -> bool:
    """An empty ext4 file system of `size` bytes at `path`, written by vmimg's own ext4
    writer, unless one is there already (then it is kept as it is). Returns whether it was
    made now."""
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isfile(path):
            raise BootError(f"data disk {path} is not a regular file")
        return False
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    now = time.time_ns()
    tree = Tree(Node(NodeType.DIR, mode=0o755, mtime_ns=now))
    options = Ext4Options(size=size, extra_inodes=size // DATA_BYTES_PER_INODE,
                          seed=os.urandom(16), label="vmimg-data")  # fmt: skip
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DATA_DISK_MODE)
    try:
        with ContentReader() as reader:
            write_ext4(tree, reader, fd, options)
        os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return True


# -- QEMU arguments ----------------------------------------------------------------------


def volume_args(index: int, volume: Volume) -> tuple[list[str], GuestMount]:
    """virtio-9p: QEMU serves the directory itself (security_model=none: files get the
    owner of the QEMU process, and guest chowns are not kept)."""
    tag = VOLUME_TAG.format(index)
    fsdev = f"local,id=fs{index},path={qemu_opt(volume.host_dir)},security_model=none"
    if volume.read_only:
        fsdev += ",readonly=on"
    args = ["-fsdev", fsdev, "-device", f"virtio-9p-device,fsdev=fs{index},mount_tag={tag}"]
    mode = "ro" if volume.read_only else "rw"
    return args, GuestMount("volume", tag, volume.guest_dir, mode)


def disk_args(index: int, file: str, read_only: bool, serial: str | None = None) -> list[str]:
    """A raw virtio-blk disk with a serial the agent finds it by."""
    drive = f"id=disk{index},file={qemu_opt(file)},format=raw,if=none"
    if read_only:
        drive += ",readonly=on"
    serial = serial or DISK_SERIAL.format(index)
    return ["-drive", drive, "-device", f"virtio-blk-device,drive=disk{index},serial={serial}"]


def run_disk_args(file: str) -> list[str]:
    return disk_args(99, file, True, RUN_DISK_SERIAL)


def exec_port_args(socket_path: str) -> list[str]:
    """A virtio-serial port named vmimg.exec, on a unix socket `vmimg exec` connects to."""
    return [
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=exec,path={qemu_opt(socket_path)},server=on,wait=off",
        "-device", f"virtserialport,chardev=exec,name={EXEC_PORT_NAME}",
    ]  # fmt: skip
