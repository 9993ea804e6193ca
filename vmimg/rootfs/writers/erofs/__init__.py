"""A native EROFS writer: `write_erofs(tree, reader, out_fd, ErofsOptions(...))`.

See docs/erofs.md for the layout, the options and the limits.
"""

from vmimg.rootfs.writers.erofs.writer import ErofsOptions, write_erofs

__all__ = ["ErofsOptions", "write_erofs"]
