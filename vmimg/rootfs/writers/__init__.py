"""File system writers. Each turns a Tree into one image file, deterministically.

Every writer has the same shape: `write_X(tree, reader, out_fd, options)`,
where `out_fd` is a fresh, empty file, open for reading too (a writer may read back
what it wrote), that the caller renames into place when the writer returns. Writers see
only the Tree and the content it references.

`FORMATS` is the one table of what vmimg can write: each format's options type, its
writer, the file name a bundle gives it, and whether the kernel mounts it read-only.
Everything else (the CLI's options, bundles, conversion keys) reads it from here. The
options types are cheap (options.py); a writer's module is loaded when it first writes, so
a conversion to erofs never loads the ext4 writer.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from vmimg.errors import WriterError
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Tree
from vmimg.rootfs.writers.options import CpioOptions, ErofsOptions, Ext4Options, TarOptions


class WriterOptions(Protocol):
    """What every writer's options are: a frozen dataclass (so they key caches)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


Writer = Callable[[Tree, ContentReader, int, Any], list[str]]
# The version of each writer's output: part of the conversion cache key, so a cached image
# is never reused once the same tree and options would give other bytes. Bump on change.
# 2: symlinks 0777, times clamped per format; erofs: zero chunks share pclusters.
WRITER_VERSIONS = {"tar": 2, "initramfs": 3, "ext4": 2, "erofs": 2}
# Compressed initramfs names say their compression (docs/bundle.md).
INITRAMFS_SUFFIX = {"gzip": ".gz", "zstd": ".zst", "none": ""}


@dataclass(frozen=True)
class Format:
    """One output format."""

    name: str
    options_type: type[Any]
    writer: str  # "module:function" of its Writer, the module in this package, loaded when used
    read_only: bool  # the kernel mounts it read-only (erofs), or it is unpacked (initramfs)
    bootable: bool  # a bundle can carry it as its root

    def file_name(self, options: WriterOptions) -> str:
        """The root file system's name in a bundle."""
        if isinstance(options, CpioOptions):
            return "initramfs.cpio" + INITRAMFS_SUFFIX[options.compression]
        return f"rootfs.{self.name}"

    def write(self, tree: Tree, reader: ContentReader, out_fd: int, options: Any) -> list[str]:
        """Write `tree` with this format's writer (its module imported now if not yet)."""
        module, _, function = self.writer.partition(":")
        write: Writer = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        return write(tree, reader, out_fd, options)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("tar", TarOptions, "tar:write_tar", read_only=False, bootable=False),
        Format("initramfs", CpioOptions, "cpio:write_cpio", read_only=False, bootable=True),
        Format("ext4", Ext4Options, "ext4.writer:write_ext4", read_only=False, bootable=True),
        Format("erofs", ErofsOptions, "erofs.writer:write_erofs", read_only=True, bootable=True),
    )
}
BOOTABLE = tuple(name for name, f in FORMATS.items() if f.bootable)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise WriterError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


def default_options(name: str) -> WriterOptions:
    result: WriterOptions = get_format(name).options_type()
    return result


def seeded(options: WriterOptions, seed: bytes) -> WriterOptions:
    """Options with `seed` filled in where the writer derives UUIDs from one and the
    caller gave none: the same image then gives the same bytes through any transport."""
    if "seed" in options.__dataclass_fields__ and not getattr(options, "seed", b""):
        result: WriterOptions = dataclasses.replace(options, seed=seed)
        return result
    return options


def options_doc(options: WriterOptions | None) -> dict[str, Any]:
    """Writer options as a dict (for cache keys and metadata)."""
    if options is None:
        return {}
    return {"type": type(options).__name__, **dataclasses.asdict(options)}


def write_image(
    fmt: str, tree: Tree, reader: ContentReader, out_fd: int, options: WriterOptions
) -> list[str]:
    """Write `tree` as format `fmt`; returns warnings to show the user."""
    writer = get_format(fmt)
    if not isinstance(options, writer.options_type):
        raise WriterError(f"{fmt} takes {writer.options_type.__name__}, not {type(options)}")
    return writer.write(tree, reader, out_fd, options)
