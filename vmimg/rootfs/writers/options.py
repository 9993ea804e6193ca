"""Each format's options: small frozen dataclasses (so they key caches), cheap to import, so
that `FORMATS` and the CLI's option parsing load no writer (each is loaded when used)."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
DEFAULT_HEADROOM = 256 * MiB  # free space an automatic ext4 size leaves for the guest


@dataclass(frozen=True)
class TarOptions:
    pass


@dataclass(frozen=True)
class CpioOptions:
    compression: str = "gzip"  # "gzip" | "zstd" | "none"
    level: int | None = None


@dataclass(frozen=True)
class Ext4Options:
    """How to build the image.

    size: exact image size in bytes; None sizes it automatically as what the
        tree needs plus `headroom`.
    headroom: free bytes an automatic size adds (default 256 MiB). Spare
        inodes are added too, one per 64 KiB of headroom.
    extra_inodes: inodes to add beyond what the tree and headroom need.
    journal: an internal jbd2 journal (inode 8); False for read-only images.
    seed: bytes the UUID and directory hash seed derive from (the image
        manifest digest, say); empty means derive them from the tree.
    label: volume label, at most 16 bytes of UTF-8.
    """

    size: int | None = None
    headroom: int = DEFAULT_HEADROOM
    extra_inodes: int = 0
    journal: bool = True
    seed: bytes = b""
    label: str = ""


@dataclass(frozen=True)
class ErofsOptions:
    compress: str = "none"  # "none" | "lz4" | "lz4hc"
    compress_level: int | None = None  # lz4hc level, 1..12 (default 9, as mkfs.erofs)
    seed: bytes = b""  # the UUID derives from it and the image's metadata
    label: str = ""  # volume name, at most 15 bytes
