# The ext4 writer's per-inode and per-directory loop bodies (see _ext4meta.c for the contracts).

# table: a writable buffer (bytearray); all 256 bytes at offset are written
def pack_inode(
    table: bytearray,
    offset: int,
    fs_seed: int,
    ino: int,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    links: int,
    blocks_512: int,
    flags: int,
    i_block: bytes,
    sec: int,
    extra: int,
    file_acl: int,
    xattr_ibody: bytes,
    /,
) -> None: ...

# file_types: anything with the buffer protocol, one byte per entry
def dir_leaf(
    inos: list[int], names: list[bytes], file_types: bytes | bytearray, inode_seed: int, /
) -> bytes: ...
