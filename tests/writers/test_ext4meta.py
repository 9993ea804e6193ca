"""The C loop bodies of the ext4 writer (vmimg/rootfs/writers/ext4/_ext4meta.c) against
their plain Python references (format.py's pack_inode_into, tests/ext4meta_ref.py): the
same bytes for any input, and bad input refused with an exception, never written out of
bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import ext4meta_ref
from vmimg.rootfs.writers.ext4 import _ext4meta
from vmimg.rootfs.writers.ext4 import format as fmt

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U48 = st.integers(0, (1 << 48) - 1)

inode_fields = st.tuples(
    U32,  # fs_seed
    U32,  # ino
    U16,  # mode
    U32,  # uid
    U32,  # gid
    st.integers(0, (1 << 64) - 1),  # size
    U16,  # links
    U48,  # blocks_512
    U32,  # flags
    st.binary(min_size=fmt.N_BLOCKS_BYTES, max_size=fmt.N_BLOCKS_BYTES),  # i_block
    U32,  # sec
    U32,  # extra
    U48,  # file_acl
    st.binary(max_size=fmt.XATTR_IBODY_SPACE),  # xattr_ibody
)


def reference(fields: tuple, offset: int, length: int) -> bytearray:
    fs_seed, ino, mode, uid, gid, size, links, blocks, flags, i_block, sec, extra, acl, xattr = (
        fields
    )
    table = bytearray(length)
    fmt.pack_inode_into(
        table,
        offset,
        fmt.inode_checksum_seed(fs_seed, ino, 0),
        (mode, uid, gid, size, links, blocks, flags),
        i_block,
        sec,
        extra,
        acl,
        xattr,
    )
    return table


@given(inode_fields, st.integers(0, 3))
@settings(max_examples=400, deadline=None)
def test_pack_inode_matches_the_reference(fields: tuple, slot: int) -> None:
    length = 4 * fmt.INODE_SIZE
    offset = slot * fmt.INODE_SIZE
    # Whatever the table held, all 256 bytes are written; the neighbours are untouched.
    table = bytearray(b"\xa5" * length)
    _ext4meta.pack_inode(table, offset, *fields)
    expected = reference(fields, offset, length)
    assert table[offset : offset + fmt.INODE_SIZE] == expected[offset : offset + fmt.INODE_SIZE]
    assert table[:offset] == b"\xa5" * offset
    assert table[offset + fmt.INODE_SIZE :] == b"\xa5" * (length - offset - fmt.INODE_SIZE)


GOOD = (1, 12, 0o100644, 0, 0, 5, 1, 8, fmt.INODE_FLAG_EXTENTS, bytes(60), 0, 0, 0, b"")


def call(table: object = None, offset: int = 0, **changes: object) -> None:
    names = [
        "fs_seed", "ino", "mode", "uid", "gid", "size", "links", "blocks_512", "flags",
        "i_block", "sec", "extra", "file_acl", "xattr_ibody",
    ]  # fmt: skip
    args = dict(zip(names, GOOD, strict=True)) | changes
    buf = bytearray(fmt.INODE_SIZE) if table is None else table
    _ext4meta.pack_inode(buf, offset, *args.values())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"mode": 0x10000}, ValueError),
        ({"uid": 1 << 32}, ValueError),
        ({"links": -1}, OverflowError),
        ({"size": 1 << 64}, OverflowError),
        ({"blocks_512": 1 << 48}, ValueError),
        ({"file_acl": 1 << 48}, ValueError),
        ({"fs_seed": 1 << 32}, ValueError),
        ({"sec": "0"}, TypeError),
        ({"i_block": bytes(59)}, ValueError),
        ({"i_block": bytearray(60)}, ValueError),
        ({"xattr_ibody": bytes(fmt.XATTR_IBODY_SPACE + 1)}, ValueError),
    ],
)
def test_pack_inode_refuses_bad_fields(changes: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        call(**changes)


def test_pack_inode_stays_inside_the_table() -> None:
    with pytest.raises(ValueError):
        call(offset=1)  # 255 bytes left
    with pytest.raises(ValueError):
        call(offset=-1)
    with pytest.raises(ValueError):
        call(bytearray(fmt.INODE_SIZE - 1))
    with pytest.raises(BufferError):
        call(bytes(fmt.INODE_SIZE))  # read-only
    with pytest.raises(TypeError):
        _ext4meta.pack_inode(bytearray(fmt.INODE_SIZE), 0)  # type: ignore[call-arg]
    call(bytearray(2 * fmt.INODE_SIZE), fmt.INODE_SIZE)


# Entries as directories have them: short names mostly, some of the longest allowed.
dir_entries = st.lists(
    st.tuples(
        st.integers(0, 0xFFFFFFFF),
        st.one_of(st.binary(min_size=1, max_size=20), st.binary(min_size=250, max_size=255)),
        st.integers(0, 7),
    ),
    max_size=60,
)


@given(dir_entries, U32)
@settings(max_examples=300, deadline=None)
def test_dir_leaf_matches_the_reference(entries: list[tuple[int, bytes, int]], seed: int) -> None:
    inos = [ino for ino, _, _ in entries]
    names = [name for _, name, _ in entries]
    types = bytes([t for _, _, t in entries])
    try:
        expected = ext4meta_ref.dir_leaf(inos, names, types, seed)
    except ValueError:  # more than a block holds
        with pytest.raises(ValueError):
            _ext4meta.dir_leaf(inos, names, types, seed)
        return
    assert _ext4meta.dir_leaf(inos, names, types, seed) == expected


def test_dir_leaf_fills_a_block_exactly() -> None:
    # 4084 bytes before the tail; a 255-byte name's entry takes 264
    names = [b"n" * 255] * 15 + [b"x" * 120]  # 15 * 264 + 128 = 4088: 4 bytes too many
    with pytest.raises(ValueError):
        _ext4meta.dir_leaf(list(range(16)), names, bytes(16), 0)
    names = [b"n" * 255] * 15 + [b"x" * 116]  # 15 * 264 + 124 = 4084: exactly full
    leaf = _ext4meta.dir_leaf(list(range(16)), names, bytes(16), 0)
    assert leaf == ext4meta_ref.dir_leaf(list(range(16)), names, bytes(16), 0)


@pytest.mark.parametrize(
    ("inos", "names", "types", "error"),
    [
        ([1], [b""], b"\x01", ValueError),  # an empty name
        ([1], [b"n" * 256], b"\x01", ValueError),
        ([1], ["n"], b"\x01", TypeError),
        ([1 << 32], [b"n"], b"\x01", ValueError),
        ([-1], [b"n"], b"\x01", OverflowError),
        (["1"], [b"n"], b"\x01", TypeError),
        ([1, 2], [b"n"], b"\x01", ValueError),  # lengths differ
        ([1], [b"n"], b"", ValueError),
    ],
)
def test_dir_leaf_refuses_bad_entries(
    inos: list[object], names: list[object], types: bytes, error: type
) -> None:
    with pytest.raises(error):
        _ext4meta.dir_leaf(inos, names, types, 0)  # type: ignore[arg-type]


def test_dir_leaf_refuses_a_bad_seed() -> None:
    with pytest.raises(ValueError):
        _ext4meta.dir_leaf([], [], b"", 1 << 32)
    with pytest.raises(OverflowError):
        _ext4meta.dir_leaf([], [], b"", -1)
    with pytest.raises(TypeError):
        _ext4meta.dir_leaf((), [], b"", 0)  # type: ignore[arg-type]
