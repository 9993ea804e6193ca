"""File system writers. Each turns a Tree into one image file, deterministically.

Every writer has the same shape: `write_X(tree, reader, out_fd, options)`,
where `out_fd` is a fresh, empty file the caller renames into place when the
writer returns. Writers see only the Tree and the content it references.
"""

from __future__ import annotations

import os
from typing import Any

from vmimg.content import ContentReader
from vmimg.errors import WriterError
from vmimg.tree import Tree

FORMATS = ("tar", "initramfs", "ext4", "erofs")
# The version of each writer's output: part of the conversion cache key, so a cached image
# is never reused once the same tree and options would give other bytes. Bump on change.
# 2: symlinks 0777, times clamped per format; erofs: zero chunks share pclusters.
WRITER_VERSIONS = {"tar": 2, "initramfs": 2, "ext4": 2, "erofs": 2}
SHOWN_WARNINGS_MAX = 20  # warnings of one kind listed by path; the rest are counted


class PathWarnings:
    """Warnings of one kind ("mtime clamped"), one per path up to SHOWN_WARNINGS_MAX:
    a hostile tree with a million odd entries must not make a million lines."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.shown: list[str] = []
        self.more = 0

    def add(self, path: bytes) -> None:
        if len(self.shown) < SHOWN_WARNINGS_MAX:
            self.shown.append(f"{os.fsdecode(path)}: {self.what}")
        else:
            self.more += 1

    def lines(self) -> list[str]:
        if not self.more:
            return list(self.shown)
        return [*self.shown, f"{self.more} more paths: {self.what}"]


def write_image(
    fmt: str, tree: Tree, reader: ContentReader, out_fd: int, options: Any
) -> list[str]:
    """Dispatch to the writer for `fmt`; returns warnings to show the user."""
    if fmt == "tar":
        from vmimg.writers.tar import write_tar

        return write_tar(tree, reader, out_fd, options)
    if fmt == "initramfs":
        from vmimg.writers.cpio import write_cpio

        return write_cpio(tree, reader, out_fd, options)
    if fmt == "ext4":
        from vmimg.writers.ext4 import write_ext4

        return write_ext4(tree, reader, out_fd, options)
    if fmt == "erofs":
        from vmimg.writers.erofs import write_erofs

        write_erofs(tree, reader, out_fd, options)
        return []
    raise WriterError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
