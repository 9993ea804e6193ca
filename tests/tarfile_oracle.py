"""vmimg's layer tar reader before tarparse.py: Python's tarfile with checks on what a member
may claim. Kept as the oracle the streaming parser is checked against (tests/test_tarparse.py):
the same bytes must give the same entries, or the same error."""

# ruff: noqa
# mypy: ignore-errors

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from typing import cast

from vmimg.errors import LayerError
from vmimg.image.tarparse import MAX_TIME_NS, MIN_TIME_NS, NS_PER_S, PAX_XATTR_PREFIX, Entry, Extent

# Limits on what one tar member may claim. tarfile reads a PAX or GNU long-name
# header whole and collects a sparse map in a list, so an unchecked claim is a
# memory bomb; the values mirror what Linux itself can store.
MAX_META_HEADER_BYTES = 1 << 20  # PAX records or a GNU long name, per member
MAX_SPARSE_RUNS = 1 << 20  # data runs in one sparse file's map
GNU_SPARSE_RUNS_PER_BLOCK = 21  # old GNU sparse: runs per extension block
GNU_ISEXTENDED_OFFSET = 504  # old GNU sparse: "another block follows" flag
MAX_ID = (1 << 32) - 1  # uid_t and gid_t are 32 bits
XATTR_NAME_MAX = 255  # Linux limits (include/uapi/linux/limits.h)
XATTR_SIZE_MAX = 1 << 16
# Digits of whole seconds past which a PAX time is clamped without being parsed: more
# than MAX_TIME_NS has, few enough that int() never meets its digit limit.
TIME_DIGITS_MAX = 30
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
# What tarfile lets escape on malformed headers besides TarError.
_MALFORMED = (ValueError, OverflowError, IndexError, KeyError, UnicodeError, EOFError)


class _OversizedHeader(tarfile.HeaderError):
    """A member's header data (PAX records, long name, sparse map) is too large."""


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile's member parser, refusing header data too large to hold in memory.

    The checks run before tarfile reads the data they bound.
    """

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER_BYTES:
            raise _OversizedHeader(
                f"extended header of {self.size} bytes (more than {MAX_META_HEADER_BYTES})"
            )
        return super()._proc_member(tf)  # type: ignore[misc,no-any-return]

    def _proc_sparse(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        assert tf.fileobj is not None
        start = tf.fileobj.tell()
        extended = bool(self._sparse_structs[1])  # type: ignore[attr-defined]
        blocks = 0
        while extended:
            blocks += 1
            if blocks * GNU_SPARSE_RUNS_PER_BLOCK > MAX_SPARSE_RUNS:
                raise _OversizedHeader(f"sparse map of more than {MAX_SPARSE_RUNS}")
            block = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise _OversizedHeader("truncated sparse map")
            extended = bool(block[GNU_ISEXTENDED_OFFSET])
        tf.fileobj.seek(start)
        return super()._proc_sparse(tf)  # type: ignore[misc,no-any-return]

    def _proc_gnusparse_10(
        self, next: tarfile.TarInfo, pax_headers: dict[str, str], tf: tarfile.TarFile
    ) -> None:
        assert tf.fileobj is not None
        start = tf.fileobj.tell()
        count = tf.fileobj.read(tarfile.BLOCKSIZE).split(b"\n", 1)[0].strip()
        tf.fileobj.seek(start)
        if count.isdigit() and int(count) > MAX_SPARSE_RUNS:
            raise _OversizedHeader(f"sparse map of {int(count)} runs")
        super()._proc_gnusparse_10(next, pax_headers, tf)  # type: ignore[misc]


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, clamped to what a Tree holds (each writer
    clamps it further to what its format stores): an odd time never fails an image."""
    text = info.pax_headers.get("mtime")
    mtime = _pax_time_ns(text) if text else int(info.mtime) * NS_PER_S
    return min(max(mtime, MIN_TIME_NS), MAX_TIME_NS)


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _pax_time_ns(text: str) -> int:
    """A PAX decimal time ("-1.5") parsed exactly: a float would lose the nanoseconds."""
    whole, _, frac = text.partition(".")
    negative = whole.startswith("-")
    digits = whole[1:] if negative else whole
    if not _is_digits(digits) or (frac and not _is_digits(frac)):
        raise LayerError(f"invalid PAX mtime {text[:64]!r}")
    sign = -1 if negative else 1
    if len(digits.lstrip("0")) > TIME_DIGITS_MAX:
        return sign * (MAX_TIME_NS + 1)  # far outside the range: the caller clamps it
    ns = int((frac + "000000000")[:9]) if frac else 0
    return sign * (int(digits) * NS_PER_S + ns)


def iter_entries(tar_path: str, what: str) -> Iterator[Entry]:
    """Every member of an uncompressed layer tar, in tar order.

    Anything malformed or impossible is a LayerError naming `what` (and the
    member, when there is one): nothing else escapes, whatever the bytes.
    """
    name = ""
    try:
        layer_size = os.path.getsize(tar_path)
        with tarfile.open(
            tar_path,
            "r:",
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=_CheckedTarInfo,
        ) as tf:
            while (info := tf.next()) is not None:
                tf.members.clear()  # type: ignore[attr-defined]  # else it keeps them all
                name = info.name
                entry = _entry_of(info)
                _check_stored_bytes(entry, layer_size)
                yield entry
            name = ""
            _check_end(tf, layer_size)
    except LayerError as e:
        raise LayerError(f"{what}: {_member(name)}{e}") from None
    except (tarfile.TarError, *_MALFORMED) as e:
        raise LayerError(f"{what}: invalid tar: {_member(name)}{e}") from None


def _member(name: str) -> str:
    return f"entry {name!r}: " if name else ""


def _check_stored_bytes(e: Entry, layer_size: int) -> None:
    stored = sum(x.length for x in e.sparse) if e.sparse is not None else e.size
    is_file = e.type in (
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.CONTTYPE,
        tarfile.GNUTYPE_SPARSE,
    )
    if is_file and e.offset + stored > layer_size:
        raise LayerError(f"claims {stored} bytes of data; the layer ends before that")


def _check_end(tf: tarfile.TarFile, layer_size: int) -> None:
    """tarfile stops quietly at a corrupt header after the first: refuse instead."""
    assert tf.fileobj is not None
    if tf.offset >= layer_size:
        return  # no end-of-archive blocks: tolerated, as GNU tar does
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if block.count(0) != len(block):
        raise LayerError(f"invalid tar header at offset {tf.offset}")


def _entry_of(info: tarfile.TarInfo) -> Entry:
    xattrs: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(PAX_XATTR_PREFIX):
            xname, xvalue = _bytes(key[len(PAX_XATTR_PREFIX) :]), _bytes(value)
            if not xname or b"\0" in xname or len(xname) > XATTR_NAME_MAX:
                raise LayerError(f"invalid xattr name {xname[:64]!r}")
            if len(xvalue) > XATTR_SIZE_MAX:
                raise LayerError(
                    f"xattr {xname[:64]!r} of {len(xvalue)} bytes (Linux's limit is "
                    f"{XATTR_SIZE_MAX})"
                )
            xattrs[xname] = xvalue
    name, linkname = _bytes(info.name), _bytes(info.linkname)
    if b"\0" in name or b"\0" in linkname:
        raise LayerError("NUL byte in a name")
    if info.size < 0:
        raise LayerError(f"negative size {info.size}")
    if not (0 <= info.uid <= MAX_ID and 0 <= info.gid <= MAX_ID):
        raise LayerError(f"uid/gid {info.uid}:{info.gid} outside 0..{MAX_ID}")
    sparse = None
    if info.sparse is not None:
        # tarfile reports the logical size in .size; the stored bytes are the runs
        runs = cast(list[tuple[int, int]], info.sparse)  # typeshed says bytes; it is not
        sparse = _checked_runs(runs, info.size)
    return Entry(
        name=name,
        type=info.type,
        mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        mtime_ns=_mtime_ns(info),
        size=info.size,
        linkname=linkname,
        devmajor=info.devmajor,
        devminor=info.devminor,
        offset=info.offset_data,
        xattrs=xattrs,
        sparse=sparse,
    )


def _checked_runs(runs: list[tuple[int, int]], size: int) -> tuple[Extent, ...]:
    """A sparse map's data runs: in order, not overlapping, inside the file."""
    out: list[Extent] = []
    end = 0
    for offset, length in runs:
        if length == 0:
            continue
        if offset < end or length < 0 or offset + length > size:
            raise LayerError(f"sparse map run ({offset}, {length}) overlaps or leaves the file")
        out.append(Extent(offset, length))
        end = offset + length
    return tuple(out)
