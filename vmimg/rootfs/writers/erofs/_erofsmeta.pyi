# The erofs writer's per-inode and per-entry loops (see _erofsmeta.c for the contracts).
from collections.abc import Callable
from typing import Any, TypeVar

_InodeT = TypeVar("_InodeT")

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

# inodes: the writer's _Inode objects; the fields are slot descriptors (see writer._VERSION_ARGS)
def decide_versions(
    inodes: list[Any],
    start: int,
    build_time_ns: int,
    inode_fields: tuple[Any, ...],
    node_fields: tuple[Any, ...],
    content_fields: tuple[Any, ...],
    types: tuple[object, ...],
    limits: tuple[int, ...],
    /,
) -> int: ...

# the fields are slot descriptors (see writer._PLAIN_ARGS); copies: (index, offset, length)
def place_plain(
    inodes: list[Any],
    start: int,
    next_block: int,
    block_size: int,
    inode_fields: tuple[Any, ...],
    node_fields: tuple[Any, ...],
    data_types: tuple[object, ...],
    layouts: tuple[int, int],
    /,
) -> tuple[int, int, list[tuple[int, int, int]]]: ...

# dest: a writable buffer (the meta area, a bytearray)
def scatter(dest: bytearray, places: list[int], pieces: list[bytes], /) -> None: ...

# root: the writer's _Inode for the root node; fields: _Inode's slot descriptors (see
# writer._COLLECT_FIELDS), defaults: the values of fields[5:] for a new inode
def collect(
    root: _InodeT,
    fields: tuple[Any, ...],
    defaults: tuple[Any, ...],
    dir_type: object,
    name_len_max: int,
    bad_name: Callable[[bytes, _InodeT], object],
    /,
) -> tuple[list[_InodeT], list[_InodeT]]: ...

# meta: the meta area's window (a bytearray); shapes: writer._META_SHAPES. Returns the
# first inode from `start` on that it did not pack (len(inodes) when it packed them all).
def pack_inodes(
    meta: bytearray,
    inodes: list[Any],
    nids: list[int],
    base: int,
    start: int,
    shapes: tuple[Any, ...],
    /,
) -> int: ...

# Appends to the four lists; returns the inode to go on from: one it left to the caller,
# the one after the tail that filled `ranges` to `limit`, or len(inodes).
def gather_tails(
    inodes: list[Any],
    nids: list[int],
    base: int,
    start: int,
    limit: int,
    shapes: tuple[Any, ...],
    places: list[int],
    pieces: list[bytes],
    read_places: list[int],
    ranges: list[tuple[Any, int, int]],
    /,
) -> int: ...

# shapes: writer._SURVEY_SHAPES; counts, file_types (one byte per inode) and with_xattrs are
# filled in. Returns the first inode from `start` on that it left to the caller
# (len(inodes) when it surveyed them all).
def survey(
    inodes: list[Any],
    start: int,
    shapes: tuple[Any, ...],
    counts: dict[int, int],
    file_types: bytearray,
    with_xattrs: list[int],
    /,
) -> int: ...

# fields: writer._META_SIZE_SLOTS. Returns the sizes, None at each place in `left` (the
# inodes it left to the caller: compressed ones, anything unusual).
def meta_sizes(
    inodes: list[Any], fields: tuple[Any, ...], /
) -> tuple[list[int | None], list[int]]: ...

# fields: writer._PLAN_SLOTS. Returns the first directory from `start` on that it did not
# plan (len(directories) when it planned them all).
def plan_dirents(
    directories: list[Any],
    start: int,
    fields: tuple[Any, ...],
    dirent_size: int,
    block_size: int,
    /,
) -> int: ...
