"""The file type a directory entry records for its child: Linux's generic FT_* numbers
(include/linux/fs_types.h), which ext4's dirent2 and erofs's dirent both store."""

from __future__ import annotations

from vmimg.rootfs.tree import NodeType

FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

FILE_TYPES = {
    NodeType.FILE: FT_REG_FILE,
    NodeType.DIR: FT_DIR,
    NodeType.SYMLINK: FT_SYMLINK,
    NodeType.CHAR: FT_CHRDEV,
    NodeType.BLOCK: FT_BLKDEV,
    NodeType.FIFO: FT_FIFO,
    NodeType.SOCKET: FT_SOCK,
}
