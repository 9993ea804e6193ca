"""Layer tars parsed as their bytes stream by: one pass, no second read, no tarfile.

`parse_layer` reads tar headers from a stream of chunks (decompressed as they come, or
read from a cached layer tar) and returns the layer's `Entry` records. It reads what
Python's tarfile (3.11) read from the same bytes, quirks included, so that entries,
offsets and errors are what vmimg made of a layer before: ustar and v7 headers, GNU long
names and links, base-256 numbers, PAX records (local and global: path, linkpath, size,
mtime, uid, gid, SCHILY.xattr.*), and GNU sparse files (old GNU, PAX 0.0, 0.1 and 1.0).

Unlike tarfile it never seeks back further than the headers of the member it is reading,
so the stream needs no file behind it; it refuses header data too large to hold (PAX
records, long names, sparse maps) before reading it; and a member whose data runs past
the end of the layer is found once the stream's length is known.

Plain headers (most of any layer) are read by a C extension, `_tarscan`, built by pip
with vmimg (`pip install -e .`, as scripts/setup does), and so are plain local PAX headers
with the member after them (tarfile's PAX format writes one before every member with a
float mtime or a long name): records in the strict "LEN KEYWORD=VALUE\\n" form, none of them
hdrcharset, GNU sparse or SCHILY.xattr, and path, linkpath, size, uid, gid and mtime values
this module reads the same way (see _tarscan.c); never while global PAX records apply. It
takes only what it can read exactly as this module would, and leaves every other header to
the Python code here. It makes the `Entry` objects itself, without running __init__.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

from vmimg.errors import LayerError
from vmimg.image._tarscan import scan_entries as _c_scan

# (buf, pos, base, entries, cls, fields, data_end) -> (pos, data_end), as _tarscan's
ScanFunction = Callable[[bytes, int, int, list[Any], type, tuple[Any, ...], int], tuple[int, int]]
# The C scanner (None: the Python code reads every header; the tests compare the two)
_scan: ScanFunction | None = _c_scan

NS_PER_S = 1_000_000_000
# The widest time any output stores (erofs and tar keep signed 64-bit seconds): a layer's
# time outside it is clamped here, and each writer clamps further to its own format.
MIN_TIME_NS = -(1 << 63) * NS_PER_S
MAX_TIME_NS = ((1 << 63) - 1) * NS_PER_S + NS_PER_S - 1

BLOCKSIZE = 512
REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE = b"L", b"K", b"S"
XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE = b"x", b"g", b"X"
REGULAR_TYPES = (REGTYPE, AREGTYPE, CONTTYPE, GNUTYPE_SPARSE)
FILE_TYPES = frozenset(REGULAR_TYPES)  # members whose data is file content
# The types tarfile knows; it skips the data of regular files and of types it does not know.
SUPPORTED_TYPES = (REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE, DIRTYPE, FIFOTYPE, CONTTYPE, CHRTYPE,
                   BLKTYPE, GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE)  # fmt: skip
GNU_TYPES = (GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE)
META_TYPES = (XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE, GNUTYPE_LONGNAME, GNUTYPE_LONGLINK)

# Limits on what one tar member may claim: header data is held in memory while it is read,
# so an unchecked claim is a memory bomb; the values mirror what Linux itself can store.
MAX_META_HEADER_BYTES = 1 << 20  # PAX records or a GNU long name, per member
MAX_META_HEADERS = 64  # extended headers before one member (tar writes at most a few)
MAX_SPARSE_RUNS = 1 << 20  # data runs in one sparse file's map
MAX_SPARSE_MAP_BYTES = 48 << 20  # a PAX 1.0 sparse map's text: 2 numbers a run, 24 bytes each
GNU_SPARSE_RUNS_PER_BLOCK = 21  # old GNU sparse: runs per extension block
GNU_ISEXTENDED_OFFSET = 504  # old GNU sparse: "another block follows" flag
GNU_SPARSE_HEADER_OFFSET = 386  # old GNU sparse: the 4 runs in the header itself
GNU_SPARSE_HEADER_RUNS = 4
SPARSE_NUMBER_LEN = 12
MAX_ID = (1 << 32) - 1  # uid_t and gid_t are 32 bits
XATTR_NAME_MAX = 255  # Linux limits (include/uapi/linux/limits.h)
XATTR_SIZE_MAX = 1 << 16
PAX_XATTR_PREFIX = "SCHILY.xattr."
# Digits of whole seconds past which a PAX time is clamped without being parsed: more
# than MAX_TIME_NS has, few enough that int() never meets its digit limit.
TIME_DIGITS_MAX = 30
BASE256_POSITIVE, BASE256_NEGATIVE = 0o200, 0o377
CHKSUM_FIELD = slice(148, 156)
_ASCII = bytes(range(0x80))
PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
PAX_HDRCHARSET = re.compile(rb"\d+ hdrcharset=([^\n]+)\n")
PAX_SPARSE_OFFSET = re.compile(rb"\d+ GNU.sparse.offset=(\d+)\n")
PAX_SPARSE_NUMBYTES = re.compile(rb"\d+ GNU.sparse.numbytes=(\d+)\n")
# What tarfile's reading let escape on malformed input besides its own errors: reported
# as an invalid tar (int() on a PAX number, a hdrcharset that is not UTF-8...).
MALFORMED = (ValueError, OverflowError, IndexError, KeyError, UnicodeError, EOFError)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of a sparse file's data: `length` bytes at logical `offset`."""

    offset: int
    length: int


@dataclass(slots=True)
class Entry:
    """One tar member, decoded: what the flattener needs, nothing more."""

    name: bytes
    type: bytes  # tar type flag
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    linkname: bytes
    devmajor: int
    devminor: int
    offset: int  # where the member's bytes start in the layer tar
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    sparse: tuple[Extent, ...] | None = None


# Entry's slot descriptors in field order: what the C scanner sets each new Entry through
ENTRY_SLOTS = tuple(vars(Entry)[f.name] for f in dataclass_fields(Entry))


# -- the stream ------------------------------------------------------------------


class SourceFailed(Exception):
    """The chunks' source failed (decompression, a digest, the unpack budget, the disk):
    not the tar's fault, so `error` goes up as it is."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Source:
    """A forward-only stream of chunks, read like a file. It holds the bytes from `keep`
    (the first header of the member being read) on, so that a member's headers can be
    read again, and drops file data as soon as the reader moves past it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.buf = b""
        self.base = 0  # offset of buf[0] in the stream
        self.pos = 0  # the read position
        self.keep = 0  # no read ever goes back before this offset
        self.ended = False

    @property
    def end(self) -> int:
        """How many bytes of the stream have arrived (its length, once `ended`)."""
        return self.base + len(self.buf)

    def pull(self) -> bool:
        """One more chunk in; False at the end of the stream."""
        if self.ended:
            return False
        try:
            chunk = next(self._chunks, None)
        except Exception as e:
            raise SourceFailed(e) from e
        if chunk is None:
            self.ended = True
            return False
        low, end = max(min(self.keep, self.pos), self.base), self.end
        if low >= end:  # nothing held is needed any more
            skip = low - end
            if skip >= len(chunk):
                self.buf, self.base = b"", end + len(chunk)
            else:
                self.buf, self.base = (chunk[skip:] if skip else chunk), low
        else:
            self.buf, self.base = self.buf[low - self.base :] + chunk, low
        return True

    def fill(self, offset: int) -> None:
        """Pull until the bytes before `offset` are in (or the stream ends)."""
        while self.end < offset and self.pull():
            pass

    def read(self, n: int) -> bytes:
        """Up to `n` bytes at the read position; fewer only where the stream ends."""
        self.fill(self.pos + n)
        start = self.pos - self.base
        data = self.buf[start : start + n]
        self.pos += len(data)
        return data

    def seek(self, offset: int) -> None:
        if offset < self.base:
            raise _ReadError("a header refers back before the member it belongs to")
        self.pos = offset

    def drain(self) -> None:
        """Read the stream to its end, holding nothing: its length is then `end`."""
        self.keep = self.pos = 1 << 63
        while self.pull():
            pass


# -- tarfile's errors, and ours ------------------------------------------------------


class _TarError(Exception):
    pass


class _ReadError(_TarError):
    pass


class _HeaderError(_TarError):
    pass


class _EmptyHeader(_HeaderError):
    pass


class _TruncatedHeader(_HeaderError):
    pass


class _EOFHeader(_HeaderError):
    pass


class _InvalidHeader(_HeaderError):
    pass


class _SubsequentHeader(_HeaderError):
    pass


class _OversizedHeader(_HeaderError):
    """A member's header data (PAX records, long name, sparse map) is too large."""


# -- header fields ---------------------------------------------------------------------


def _nts(field_bytes: bytes) -> str:
    """A NUL-terminated name field, as tarfile decodes it (bytes survive as surrogates)."""
    p = field_bytes.find(b"\0")
    if p != -1:
        field_bytes = field_bytes[:p]
    return field_bytes.decode("utf-8", "surrogateescape")


def nti(field_bytes: bytes) -> int:
    """A number field: octal text (as Python's int() reads it), or base-256."""
    lead = field_bytes[0]
    if lead in (BASE256_POSITIVE, BASE256_NEGATIVE):
        n = int.from_bytes(field_bytes[1:], "big")
        if lead == BASE256_NEGATIVE:
            n = -(256 ** (len(field_bytes) - 1) - n)
        return n
    try:
        p = field_bytes.find(b"\0")
        text = (field_bytes[:p] if p != -1 else field_bytes).decode("ascii")
        return int(text.strip() or "0", 8)
    except ValueError:
        raise _InvalidHeader("invalid header") from None


def checksums(block: bytes) -> tuple[int, int]:
    """The header checksum, unsigned and signed (old tars summed signed chars), with the
    checksum field counted as spaces."""
    rest = block[: CHKSUM_FIELD.start] + block[CHKSUM_FIELD.stop :]
    unsigned = 256 + sum(rest)
    return unsigned, unsigned - 256 * len(rest.translate(None, _ASCII))


def _block(count: int) -> int:
    """`count` rounded up to whole blocks (Python's divmod, for negative counts too)."""
    blocks, remainder = divmod(count, BLOCKSIZE)
    return (blocks + (1 if remainder else 0)) * BLOCKSIZE


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _Member:
    """A header as tarfile's TarInfo held it while reading: names as surrogate-escaped str."""

    __slots__ = ("devmajor", "devminor", "gid", "linkname", "mode", "mtime", "name",
                 "offset", "offset_data", "pax_headers", "size", "sparse", "sparse_structs",
                 "type", "uid")  # fmt: skip

    def __init__(self, block: bytes) -> None:
        self.name = _nts(block[0:100])
        self.mode = nti(block[100:108])
        self.uid = nti(block[108:116])
        self.gid = nti(block[116:124])
        self.size = nti(block[124:136])
        self.mtime: float = nti(block[136:148])
        self.type = block[156:157]
        self.linkname = _nts(block[157:257])
        self.devmajor = nti(block[329:337])
        self.devminor = nti(block[337:345])
        prefix = _nts(block[345:500])
        self.offset = self.offset_data = 0
        self.pax_headers: dict[str, str] = {}
        self.sparse: list[tuple[int, int]] | None = None
        self.sparse_structs: tuple[list[tuple[int, int]], bool, int] | None = None
        # v7 marks a directory by a slash at the end of a regular file's name
        if self.type == AREGTYPE and self.name.endswith("/"):
            self.type = DIRTYPE
        if self.type == GNUTYPE_SPARSE:  # its first runs are in the header itself
            pos = GNU_SPARSE_HEADER_OFFSET
            structs = []
            for _ in range(GNU_SPARSE_HEADER_RUNS):
                structs.append((nti(block[pos : pos + 12]), nti(block[pos + 12 : pos + 24])))
                pos += 24
            self.sparse_structs = (structs, bool(block[482]), nti(block[483:495]))
        if self.type == DIRTYPE:
            self.name = self.name.rstrip("/")
        if prefix and self.type not in GNU_TYPES:
            self.name = prefix + "/" + self.name

    def skips_data(self) -> bool:
        return self.type in REGULAR_TYPES or self.type not in SUPPORTED_TYPES

    def apply_pax(self, pax_headers: dict[str, str]) -> None:
        """Header fields replaced by PAX records (tarfile's _apply_pax_info)."""
        for keyword, value in pax_headers.items():
            if keyword == "GNU.sparse.name":
                self.name = value
            elif keyword in ("GNU.sparse.size", "GNU.sparse.realsize"):
                self.size = int(value)
            elif keyword == "path":
                self.name = value.rstrip("/")
            elif keyword == "linkpath":
                self.linkname = value
            elif keyword == "mtime":
                try:
                    self.mtime = float(value)
                except ValueError:
                    self.mtime = 0
            elif keyword in ("size", "uid", "gid"):
                try:
                    number = int(value)
                except ValueError:
                    number = 0
                setattr(self, keyword, number)
        self.pax_headers = pax_headers.copy()


def _header(block: bytes) -> _Member:
    if len(block) == 0:
        raise _EmptyHeader("empty header")
    if len(block) != BLOCKSIZE:
        raise _TruncatedHeader("truncated header")
    if block.count(0) == BLOCKSIZE:
        raise _EOFHeader("end of file header")
    if nti(block[CHKSUM_FIELD]) not in checksums(block):
        raise _InvalidHeader("bad checksum")
    return _Member(block)


# -- members to entries ----------------------------------------------------------------


def _mtime_ns(m: _Member) -> int:
    """The member's mtime in nanoseconds, clamped to what a Tree holds (each writer
    clamps it further to what its format stores): an odd time never fails an image."""
    text = m.pax_headers.get("mtime")
    mtime = _pax_time_ns(text) if text else int(m.mtime) * NS_PER_S
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


def _xattrs(pax_headers: dict[str, str]) -> dict[bytes, bytes]:
    xattrs: dict[bytes, bytes] = {}
    for key, value in pax_headers.items():
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
    return xattrs


def _entry_of(m: _Member) -> Entry:
    xattrs = _xattrs(m.pax_headers)
    name, linkname = _bytes(m.name), _bytes(m.linkname)
    if b"\0" in name or b"\0" in linkname:
        raise LayerError("NUL byte in a name")
    if m.size < 0:
        raise LayerError(f"negative size {m.size}")
    if not (0 <= m.uid <= MAX_ID and 0 <= m.gid <= MAX_ID):
        raise LayerError(f"uid/gid {m.uid}:{m.gid} outside 0..{MAX_ID}")
    # a sparse member's .size is its logical size; the stored bytes are the runs
    sparse = _checked_runs(m.sparse, m.size) if m.sparse is not None else None
    return Entry(name, m.type, m.mode, m.uid, m.gid, _mtime_ns(m), m.size, linkname,
                 m.devmajor, m.devminor, m.offset_data, xattrs, sparse)  # fmt: skip


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


def stored_size(e: Entry) -> int:
    """The bytes of the member's data in the layer (a sparse file's runs only)."""
    return sum(x.length for x in e.sparse) if e.sparse is not None else e.size


def _member(name: str) -> str:
    return f"entry {name!r}: " if name else ""


# -- the parser ------------------------------------------------------------------------


class _Parser:
    """tarfile's reading loop (TarFile.next and TarInfo's _proc_* methods), on a Source."""

    def __init__(self, src: Source, what: str) -> None:
        self.src = src
        self.what = what
        self.offset = 0  # where the next member's first header begins
        self.pax_headers: dict[str, str] = {}  # global PAX records, for all later members
        self.entries: list[Entry] = []
        self.data_end = 0  # where the data of the member that reaches furthest ends
        self.last: str | bytes = ""  # the last member's name, for error messages

    def parse(self) -> list[Entry]:
        """Every member, in tar order; the stream is read to its end either way."""
        try:
            self._read_members()
            self.last = ""
            self._check_end()
        except LayerError as e:
            self._check_data()
            raise LayerError(f"{self.what}: {_member(self._last_name())}{e}") from None
        except (_TarError, *MALFORMED) as e:
            self._check_data()
            raise LayerError(f"{self.what}: invalid tar: {_member(self._last_name())}{e}") from None
        self._check_data()
        return self.entries

    def _last_name(self) -> str:
        last = self.last
        return last.decode("utf-8", "surrogateescape") if isinstance(last, bytes) else last

    def _read_members(self) -> None:
        src = self.src
        while True:
            if self.offset != src.pos:
                # tarfile: the previous member's data must all be there
                src.keep = self.offset - 1
                src.seek(self.offset - 1)
                if not src.read(1):
                    raise _ReadError("unexpected end of data")
            src.keep = self.offset
            if _scan is not None and not self.pax_headers and self._scan_plain():
                continue
            m = self._next_member()
            if m is None:
                return
            self.last = m.name
            self._add(_entry_of(m))

    def _add(self, e: Entry) -> None:
        self.entries.append(e)
        if e.type in FILE_TYPES:
            self.data_end = max(self.data_end, e.offset + stored_size(e))

    def _scan_plain(self) -> bool:
        """The plain headers at the read position, read by the C extension; False if it
        took none (the next header is for the Python code)."""
        assert _scan is not None
        src = self.src
        src.fill(self.offset + BLOCKSIZE)
        entries = self.entries
        taken = len(entries)
        # It appends Entry objects itself (made as _slots.c makes nodes, without __init__)
        # and raises data_end past the regular files among them (what _add does)
        pos, self.data_end = _scan(
            src.buf, self.offset - src.base, src.base, entries, Entry, ENTRY_SLOTS, self.data_end
        )
        if len(entries) == taken:
            return False
        self.offset = src.base + pos
        self.last = entries[-1].name
        return True

    def _next_member(self) -> _Member | None:
        """The next member (its extended headers applied), or None at the end."""
        try:
            return self._from_stream(0)
        except _EOFHeader:
            return None
        except (_InvalidHeader, _TruncatedHeader) as e:
            if self.offset == 0:
                raise _ReadError(str(e)) from None
            return None
        except _EmptyHeader:
            if self.offset == 0:
                raise _ReadError("empty file") from None
            return None
        except _SubsequentHeader as e:
            raise _ReadError(str(e)) from None

    def _from_stream(self, depth: int) -> _Member:
        m = _header(self.src.read(BLOCKSIZE))
        m.offset = self.src.pos - BLOCKSIZE
        if m.type in META_TYPES:
            if m.size > MAX_META_HEADER_BYTES:
                raise _OversizedHeader(
                    f"extended header of {m.size} bytes (more than {MAX_META_HEADER_BYTES})"
                )
            if m.size < 0:
                raise _OversizedHeader(f"extended header of {m.size} bytes")
            if depth >= MAX_META_HEADERS:
                raise _OversizedHeader(f"more than {MAX_META_HEADERS} extended headers")
        if m.type in (GNUTYPE_LONGNAME, GNUTYPE_LONGLINK):
            return self._gnu_long(m, depth)
        if m.type == GNUTYPE_SPARSE:
            return self._gnu_sparse(m)
        if m.type in (XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE):
            return self._pax(m, depth)
        return self._builtin(m)

    def _builtin(self, m: _Member) -> _Member:
        m.offset_data = self.src.pos
        self.offset = m.offset_data + (_block(m.size) if m.skips_data() else 0)
        m.apply_pax(self.pax_headers)
        if m.type == DIRTYPE:
            m.name = m.name.rstrip("/")
        return m

    def _next_of(self, depth: int) -> _Member:
        """The member an extended header belongs to."""
        try:
            return self._from_stream(depth + 1)
        except _HeaderError as e:
            raise _SubsequentHeader(str(e)) from None

    def _gnu_long(self, m: _Member, depth: int) -> _Member:
        data = self.src.read(_block(m.size))
        nxt = self._next_of(depth)
        nxt.offset = m.offset
        if m.type == GNUTYPE_LONGNAME:
            nxt.name = _nts(data)
        else:
            nxt.linkname = _nts(data)
        if nxt.type == DIRTYPE:
            nxt.name = nxt.name.removesuffix("/")
        return nxt

    def _gnu_sparse(self, m: _Member) -> _Member:
        """Old GNU sparse: runs in the header, then in extension blocks while flagged."""
        assert m.sparse_structs is not None
        structs, extended, origsize = m.sparse_structs
        self._check_sparse_blocks(extended)
        while extended:
            block = self.src.read(BLOCKSIZE)
            pos = 0
            for _ in range(GNU_SPARSE_RUNS_PER_BLOCK):
                offset = nti(block[pos : pos + SPARSE_NUMBER_LEN])
                numbytes = nti(block[pos + SPARSE_NUMBER_LEN : pos + 2 * SPARSE_NUMBER_LEN])
                if offset and numbytes:
                    structs.append((offset, numbytes))
                pos += 2 * SPARSE_NUMBER_LEN
            extended = bool(block[GNU_ISEXTENDED_OFFSET])
        m.sparse = structs
        m.offset_data = self.src.pos
        self.offset = m.offset_data + _block(m.size)
        m.size = origsize
        return m

    def _check_sparse_blocks(self, extended: bool) -> None:
        """Refuse a map of too many extension blocks, or one the layer cuts short, before
        reading any of it."""
        start = self.src.pos
        blocks = 0
        while extended:
            blocks += 1
            if blocks * GNU_SPARSE_RUNS_PER_BLOCK > MAX_SPARSE_RUNS:
                raise _OversizedHeader(f"sparse map of more than {MAX_SPARSE_RUNS}")
            block = self.src.read(BLOCKSIZE)
            if len(block) < BLOCKSIZE:
                raise _OversizedHeader("truncated sparse map")
            extended = bool(block[GNU_ISEXTENDED_OFFSET])
        self.src.seek(start)

    def _pax(self, m: _Member, depth: int) -> _Member:
        data = self.src.read(_block(m.size))
        # global records change what every later member gets; local ones only the next
        pax_headers = self.pax_headers if m.type == XGLTYPE else self.pax_headers.copy()
        charset = PAX_HDRCHARSET.search(data) if b" hdrcharset=" in data else None
        if charset is not None:
            pax_headers["hdrcharset"] = charset.group(1).decode("utf-8")
        pos = 0
        while (record := PAX_RECORD.match(data, pos)) is not None:
            length = int(record.group(1))
            if length == 0:
                raise _InvalidHeader("invalid header")
            value = data[record.end(2) + 1 : record.start(1) + length - 1]
            keyword = record.group(2).decode("utf-8", "surrogateescape")
            pax_headers[keyword] = value.decode("utf-8", "surrogateescape")
            pos += length
        nxt = self._next_of(depth)
        if "GNU.sparse.map" in pax_headers:  # PAX sparse 0.1
            numbers = [int(x) for x in pax_headers["GNU.sparse.map"].split(",")]
            nxt.sparse = list(zip(numbers[::2], numbers[1::2], strict=False))
        elif "GNU.sparse.size" in pax_headers:  # PAX sparse 0.0
            offsets = [int(r.group(1)) for r in PAX_SPARSE_OFFSET.finditer(data)]
            numbytes = [int(r.group(1)) for r in PAX_SPARSE_NUMBYTES.finditer(data)]
            nxt.sparse = list(zip(offsets, numbytes, strict=False))
        elif (
            pax_headers.get("GNU.sparse.major") == "1"
            and pax_headers.get("GNU.sparse.minor") == "0"
        ):
            self._sparse_map_10(nxt)
        if m.type in (XHDTYPE, SOLARIS_XHDTYPE):
            nxt.apply_pax(pax_headers)
            nxt.offset = m.offset
            if "size" in pax_headers:  # the next header is where the new size says
                self.offset = nxt.offset_data + (_block(nxt.size) if nxt.skips_data() else 0)
        return nxt

    def _sparse_map_10(self, nxt: _Member) -> None:
        """PAX sparse 1.0: the map is text at the start of the member's data."""
        start = self.src.pos
        count = self.src.read(BLOCKSIZE).split(b"\n", 1)[0].strip()
        self.src.seek(start)
        if count.isdigit() and int(count) > MAX_SPARSE_RUNS:
            raise _OversizedHeader(f"sparse map of {int(count)} runs")
        numbers: list[int] = []
        fields, text = self.src.read(BLOCKSIZE).split(b"\n", 1)
        runs = int(fields)
        if runs > MAX_SPARSE_RUNS:
            raise _OversizedHeader(f"sparse map of {runs} runs")
        while len(numbers) < runs * 2:
            if b"\n" not in text:
                text += self.src.read(BLOCKSIZE)
                if self.src.pos - start > MAX_SPARSE_MAP_BYTES:
                    raise _OversizedHeader(f"sparse map of more than {MAX_SPARSE_MAP_BYTES} bytes")
            number, text = text.split(b"\n", 1)
            numbers.append(int(number))
        nxt.offset_data = self.src.pos
        nxt.sparse = list(zip(numbers[::2], numbers[1::2], strict=False))

    def _check_end(self) -> None:
        """The reading stopped at a header that is not one: refuse it unless it is the
        end-of-archive block (or the end of the stream)."""
        self.src.seek(self.offset)
        block = self.src.read(BLOCKSIZE)
        if block.count(0) != len(block):
            raise LayerError(f"invalid tar header at offset {self.offset}")

    def _check_data(self) -> None:
        """Every file's data is inside the layer: checked once the stream's length is known
        (the first member, in tar order, that claims more is the error)."""
        self.src.drain()
        total = self.src.end
        if self.data_end <= total:
            return
        for e in self.entries:
            if e.type in FILE_TYPES and e.offset + stored_size(e) > total:
                raise LayerError(
                    f"{self.what}: entry {_bytes_name(e.name)!r}: claims {stored_size(e)} "
                    "bytes of data; the layer ends before that"
                ) from None


def _bytes_name(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def parse_source(src: Source, what: str) -> list[Entry]:
    """The entries of the layer tar `src` streams; LayerError (naming `what` and the member)
    for anything malformed, SourceFailed if the stream itself fails."""
    return _Parser(src, what).parse()


def parse_layer(chunks: Iterator[bytes], what: str) -> list[Entry]:
    """The entries of the layer tar `chunks` make up; whatever the chunks' iterator raises
    goes up unchanged."""
    try:
        return parse_source(Source(chunks), what)
    except SourceFailed as e:
        raise e.error from None


def file_chunks(path: str, chunk: int) -> Iterator[bytes]:
    """The bytes of the file at `path`, `chunk` bytes at a time."""
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data
