# The erofs writer's per-inode and per-entry loops (see _erofsmeta.c for the contracts).
DIRENT_SIZE: int

def first_fit(
    meta_sizes: list[int], block_size: int, slot_size: int, open_blocks: int, /
) -> tuple[list[int], int]: ...

# file_types: anything with the buffer protocol, one byte per inode
def dir_blocks(
    names: list[bytes],
    targets: list[int],
    block_starts: list[int],
    nids: list[int],
    file_types: bytes | bytearray,
    block_size: int,
    /,
) -> bytes: ...

# dest: a writable buffer (the meta area, a bytearray)
def scatter(dest: bytearray, places: list[int], pieces: list[bytes], /) -> None: ...
