"""File system writers. Each turns a Tree into one image file, deterministically.

Every writer has the same shape: `write_X(tree, reader, out_fd, options)`,
where `out_fd` is a fresh, empty file the caller renames into place when the
writer returns. Writers see only the Tree and the content it references.
"""

from __future__ import annotations

from typing import Any

from vmimg.errors import WriterError
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Tree

FORMATS = ("tar", "initramfs", "ext4", "erofs")


def write_image(
    fmt: str, tree: Tree, reader: ContentReader, out_fd: int, options: Any
) -> list[str]:
    """Dispatch to the writer for `fmt`; returns warnings to show the user."""
    if fmt == "tar":
        from vmimg.rootfs.writers.tar import write_tar

        return write_tar(tree, reader, out_fd, options)
    if fmt == "initramfs":
        from vmimg.rootfs.writers.cpio import write_cpio

        return write_cpio(tree, reader, out_fd, options)
    if fmt == "ext4":
        from vmimg.rootfs.writers.ext4 import write_ext4

        write_ext4(tree, reader, out_fd, options)
        return []
    if fmt == "erofs":
        from vmimg.rootfs.writers.erofs import write_erofs

        write_erofs(tree, reader, out_fd, options)
        return []
    raise WriterError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
