"""Native ext4 writer: a Tree becomes an ext4 image without root, loop devices or mke2fs.

`format` holds the on-disk structures, `writer` the layout logic.
"""

from vmimg.rootfs.writers.ext4.writer import DEFAULT_HEADROOM, Ext4Options, write_ext4

__all__ = ["DEFAULT_HEADROOM", "Ext4Options", "write_ext4"]
