"""The streaming tar parser (vmimg/image/tarparse.py) and its C fast path (_tarscan.c).

Three oracles: the C scanner must agree with its pure-Python reference (tests/tarscan_ref.py)
on any bytes; the whole parser must give the same entries with and without the C scanner,
however the stream is cut into chunks; and it must read what vmimg's tarfile-based reader
read before (tests/tarfile_oracle.py), entries and errors alike.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from tests import layerkit as L
from tests import tarfile_oracle, tarscan_ref
from vmimg.digest import Hasher, digest_bytes
from vmimg.errors import DigestError, LayerError
from vmimg.image import _tarscan, tarparse
from vmimg.image.cache import Cache, SpaceGuard
from vmimg.image.layers import WriteBehind, iter_entries, unpack_layer_to_cache
from vmimg.image.oci import Descriptor
from vmimg.image.tarparse import Entry, parse_layer
from vmimg.rootfs.flatten import flatten

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Refusals the streaming parser adds where tarfile read on (or recursed until it crashed):
# the oracle cannot agree with these, and need not.
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER_TAR + "+gzip"
NEW_REFUSALS = ("extended header of -", "extended headers", "sparse map of", "refers back")

# -- the C scanner against its reference ---------------------------------------------


def octal(n: int, width: int) -> st.SearchStrategy[bytes]:
    digits = f"{n:o}".encode()
    return st.sampled_from(
        [
            digits.rjust(width - 1, b"0") + b"\0",
            digits.rjust(width - 1, b" ") + b" ",
            b" " + digits + b"\0",
            digits + b"\0" * (width - len(digits)),
            b"\x1c" + digits + b"\t",
            b"+" + digits,
            b"0o" + digits,
            digits[:1] + b"_" + digits[1:],
            b"-" + digits,
            digits + b"9",
            b"\0" * width,
            b" " * width,
        ]
    ).map(lambda f: f[:width].ljust(width, b"\0"))


def base256(n: int, width: int, negative: bool) -> bytes:
    lead = b"\xff" if negative else b"\x80"
    return lead + (n % (1 << (8 * (width - 1)))).to_bytes(width - 1, "big")


def number_field(width: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(0, 8 ** (width - 1) - 1).flatmap(lambda n: octal(n, width)),
        st.builds(base256, st.integers(0, 1 << (8 * (width - 1))), st.just(width), st.booleans()),
        st.binary(min_size=width, max_size=width),
    )


@st.composite
def header_block(draw: st.DrawFn) -> bytes:
    b = bytearray(512)
    b[0:100] = draw(st.binary(max_size=100)).ljust(100, b"\0")
    for off, width in ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)):
        b[off : off + width] = draw(number_field(width))
    b[156:157] = draw(st.sampled_from([*map(bytes, [[c] for c in b"0\x001234567LKSxgXVM"])]))
    b[157:257] = draw(st.binary(max_size=100)).ljust(100, b"\0")
    b[257:265] = b"ustar\x0000"
    b[345:500] = draw(st.one_of(st.just(b""), st.binary(max_size=155))).ljust(155, b"\0")
    if draw(st.booleans()):  # small sizes mostly, so that members follow in the buffer
        b[124:136] = f"{draw(st.integers(0, 3000)):011o}\0".encode()
    b[148:156] = b" " * 8
    unsigned = sum(b)
    signed = sum(c - 256 if c >= 0x80 else c for c in b)
    chk = draw(st.sampled_from([unsigned, signed, unsigned + 1]))
    if chk >= 0:  # in octal, or base-256 (its lead byte has the top bit: signed sums differ)
        b[148:156] = draw(st.one_of(octal(chk, 8), st.just(base256(chk, 8, False))))
    return bytes(b)


def with_checksum(b: bytearray) -> bytes:
    b[148:156] = b" " * 8
    b[148:156] = f"{sum(b):06o}\0 ".encode()
    return bytes(b)


@st.composite
def plain_header(draw: st.DrawFn, good: bool = False) -> bytes:
    """A header tarfile writes: one the C scanner takes if `good`, else mostly."""
    if not good and draw(st.integers(0, 15)) == 0:
        return bytes(512)
    info = tarfile.TarInfo(draw(st.text(st.sampled_from("ab/é.\udcff"), max_size=40)))
    types = b"0\x001234567" if good else b"0\x0012345677SLg"
    info.type = draw(st.sampled_from([*map(bytes, [[c] for c in types])]))
    info.size = draw(st.integers(0, 3000))
    info.uid = draw(st.integers(0, (1 << 21) - 1))
    info.mtime = draw(st.integers(0, 8**11 - 1))
    info.linkname = draw(st.text(st.sampled_from("ab/"), max_size=99))
    if draw(st.booleans()):
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")[:512]
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")[:512]


PAX_KEYWORDS = [b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime", b"comment",
                b"uname", b"hdrcharset", b"GNU.sparse.size", b"GNU.sparse.name", b"GNU.sparse",
                b"SCHILY.xattr.user.a", b"SCHILY.xattr", b"pat", b"path ", b"a\nb"]  # fmt: skip
PAX_NUMBERS = [b"0", b"12", b"700", b"4294967295", b"4294967296", b"-1", b"+5", b"", b"0x10",
               b"1_0", b" 7", b"7 ", b"1" * 18, b"1" * 19, b"0" * 18 + b"5", b"0" * 17 + b"5",
               b"1152921504606846975", b"1152921504606846976", b"\xd9\xa1"]  # fmt: skip
PAX_TIMES = [b"1700000000.123456", b"-1.5", b"1.", b".5", b"-.5", b"+1", b"1e3", b"-", b"",
             b"-0", b"0", b"00001.5", b"1.2.3", b" 1", b"1_0", b"\xd9\xa1", b"9" * 30,
             b"-0.000000001", b"1.1234567891234", b"0" * 19 + b"1", b"0" * 17 + b"1",
             b"9223372036.854775807", b"9223372036.854775808", b"9223372036.999999999",
             b"9223372037", b"-9223372036.854775807", b"-9223372036.854775808", b"1.5x",
             b"nan", b"inf"]  # fmt: skip


GOOD_PAX_KEYWORDS = [b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime",
                     b"comment"]  # fmt: skip


def pax_value(keyword: bytes, good: bool) -> st.SearchStrategy[bytes]:
    """A value for `keyword`: one the C scanner takes if `good`, else anything."""
    if keyword in (b"size", b"uid", b"gid"):
        number = st.integers(0, 3000).map(lambda n: b"%d" % n)
        return number if good else st.one_of(st.sampled_from(PAX_NUMBERS), number)
    if keyword in (b"mtime", b"atime"):
        fraction = st.binary(max_size=12).map(lambda b: bytes(48 + c % 10 for c in b))
        time = st.builds(lambda s, f: b"%d.%s" % (s, f), st.integers(-(10**12), 10**12), fraction)
        return time if good else st.one_of(st.sampled_from(PAX_TIMES), time)
    name = st.text(st.sampled_from("ab/é\udcff"), max_size=150).map(
        lambda t: t.encode("utf-8", "surrogateescape")
    )
    return name if good else st.one_of(name, st.binary(max_size=40))  # NUL, "=", "\n"...


def record_length(rest: int) -> int:
    """The LEN of a record whose bytes after LEN number `rest`."""
    length = rest + 1
    while length != rest + len(str(length)):
        length = rest + len(str(length))
    return length


@st.composite
def pax_record(draw: st.DrawFn, good: bool) -> tuple[bytes, bytes, bytes]:
    """One record, (keyword, value, bytes): one the C scanner takes if `good`, else right
    or subtly wrong."""
    keyword = draw(st.sampled_from(GOOD_PAX_KEYWORDS if good else PAX_KEYWORDS))
    value = draw(pax_value(keyword, good))
    body = b" " + keyword + b"=" + value + b"\n"
    length = record_length(len(body))
    how = "ok" if good else draw(st.sampled_from(["ok"] * 8 + ["long", "short", "zero", "plus",
                                 "lead0", "no-nl", "no-space", "no-eq", "junk"]))  # fmt: skip
    if how == "long":
        return keyword, value, b"%d" % (length + 1) + body
    if how == "short":
        return keyword, value, b"%d" % (length - 1) + body
    if how == "zero":
        return keyword, value, b"0" + body
    if how == "plus":
        return keyword, value, b"+%d" % (length - 1) + body
    if how == "lead0":  # leading zeros are still the right length
        return keyword, value, b"0%d" % record_length(len(body) + 1) + body
    if how == "no-nl":
        return keyword, value, b"%d" % length + body[:-1] + b"x"
    if how == "no-space":
        return keyword, value, b"%d" % length + body[1:]
    if how == "no-eq":
        return keyword, value, b"%d" % length + body.replace(b"=", b"", 1)
    if how == "junk":
        return keyword, value, draw(st.binary(max_size=20))
    return keyword, value, b"%d" % length + body


@st.composite
def pax_part(draw: st.DrawFn) -> bytes:
    """A local PAX header (records right or subtly wrong, its padding sometimes digits or
    records), then a member header and that member's data (its size as the records say, if
    they say a plain one)."""
    good = draw(st.booleans())  # half of them well-formed: the C scanner takes those
    records = draw(st.lists(pax_record(good), max_size=6))
    text = b"".join(r for _, _, r in records)
    size = len(text)
    if not good:
        size = draw(st.sampled_from([size] * 6 + [size + 1, max(size - 1, 0), 70000, 0]))
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = size
    head = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    how = "ok" if good else draw(st.sampled_from(["ok", "bad sum", "plus mode", "base-256 size"]))
    if how == "bad sum":
        head[148:156] = b"0000000\0"
    elif how == "plus mode":
        head[100:108] = b"+000644\0"
        head = bytearray(with_checksum(head))
    elif how == "base-256 size":
        head[124:136] = base256(size, 12, False)
        head = bytearray(with_checksum(head))
    pads = [b"", b"x"] if good else [b"", b"7", b"12 a=b\n", b"x hdrcharset=y", b" hdrcharset="]
    padded = text + draw(st.sampled_from(pads))
    padded += bytes(-len(padded) % 512)
    member = draw(plain_header(good) if good else st.one_of(plain_header(good), header_block()))
    sizes = [int(v) for k, v, _ in records if k == b"size" and v.isdigit() and len(v) < 6]
    try:
        data_size = tarparse.nti(member[124:136])
    except tarparse._InvalidHeader:
        data_size = 0
    by_records = draw(st.booleans())
    if sizes and by_records:
        data_size = sizes[-1]
    n = tarparse._block(min(max(data_size, 0), 4000))
    data = draw(st.binary(max_size=64)).ljust(n, b"\0")[:n]
    return bytes(head) + padded + member + data


member_parts = st.one_of(
    st.tuples(header_block(), st.binary(max_size=1200)).map(b"".join),
    st.tuples(plain_header(), st.binary(max_size=1200)).map(b"".join),
    pax_part(),
)


@pytest.mark.slow
@SETTINGS
@given(
    st.lists(member_parts, min_size=1, max_size=6),
    st.integers(0, 4000),
    st.integers(0, 1 << 40),
    st.integers(0, 600),
)
def test_c_scanner_agrees_with_its_reference(
    parts: list[bytes], cut: int, base: int, pos: int
) -> None:
    buf = b"".join(parts)
    buf = buf[: max(0, len(buf) - cut)] if cut % 3 == 0 else buf
    pos = pos if pos < len(buf) and pos % 7 == 0 else 0
    assert _tarscan.scan(buf, pos, base) == tarscan_ref.scan(buf, pos, base)


@SETTINGS
@given(st.lists(member_parts, min_size=1, max_size=5), st.lists(st.integers(0, 9000), max_size=6))
def test_the_parser_reads_pax_headers_alike_with_and_without_c(
    parts: list[bytes], cuts: list[int]
) -> None:
    """Where the C scanner takes a local PAX header, it reads it as the Python code does;
    where it does not, the Python code reads it (in any chunks: one header's records may
    not have arrived yet)."""
    data = b"".join(parts) + bytes(1024)
    with pytest.MonkeyPatch.context() as mp:
        assert streamed(data, cuts, True, mp) == streamed(data, [], False, mp)


def test_a_pax_layer_is_read_by_the_c_scanner_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """tarfile's PAX format puts a local PAX header before every member with a float
    mtime, a long name or link, or a number too large for its field: one scan takes them
    all, as the reference does."""
    data = L.layer(
        L.dir("etc/", mtime=1700000000.123456),
        L.file("etc/passwd", b"root:x:0:0\n", uid=1 << 30, mtime=1.5),
        L.file("d/" * 60 + "long", b"x" * 700, mtime=-1.25),
        L.symlink("lib", "usr/" * 40 + "lib", mtime=2.0),
        L.hardlink("h/" * 60, "etc/passwd", mtime=3.000000001),
        L.file("plain", b"no PAX header"),
        L.file("c", b"", pax={"comment": "ignored", "atime": "1.5", "gid": "7"}),
    )
    members, pos = _tarscan.scan(data, 0, 0)
    assert (members, pos) == tarscan_ref.scan(data, 0, 0)
    assert data[pos:].count(0) == len(data) - pos  # stopped at the end-of-archive blocks
    monkeypatch.setattr(tarparse, "_scan", None)
    assert [Entry(*m) for m in members] == parse_layer(iter([data]), "layer t")
    assert tarscan_ref.scan(b"?" + data, 1, 1 << 40) == _tarscan.scan(b"?" + data, 1, 1 << 40)
    assert [m[0] for m in members] == [b"etc", b"etc/passwd", b"d/" * 60 + b"long", b"lib",
                                       b"h/" * 59 + b"h", b"plain", b"c"]  # fmt: skip
    assert [m[5] for m in members] == [1700000000123456000, 1_500_000_000, -1_250_000_000,
                                       2 * 10**9, 3_000_000_001, L.DEFAULT_MTIME * 10**9,
                                       L.DEFAULT_MTIME * 10**9]  # fmt: skip
    assert members[1][3] == 1 << 30 and members[6][4] == 7
    assert members[3][7] == b"usr/" * 40 + b"lib"


@SETTINGS
@given(st.binary(max_size=3000), st.integers(0, 3000))
def test_c_scanner_on_arbitrary_bytes(buf: bytes, pos: int) -> None:
    assert _tarscan.scan(buf, pos, 0) == tarscan_ref.scan(buf, pos, 0)


def entries_scanned(buf: bytes, pos: int, base: int, data_end: int) -> tuple[list[Entry], int, int]:
    """What _tarscan.scan_entries makes of buf[pos:], after an entry already there."""
    entries = [Entry(b"before", b"5", 0, 0, 0, 0, 0, b"", 0, 0, 0)]
    pos, data_end = _tarscan.scan_entries(
        buf, pos, base, entries, Entry, tarparse.ENTRY_SLOTS, data_end
    )
    return entries[1:], pos, data_end


def entries_of_scan(buf: bytes, pos: int, base: int, data_end: int) -> tuple[list[Entry], int, int]:
    """The same made from _tarscan.scan's tuples, as tarparse made them before."""
    members, pos = _tarscan.scan(buf, pos, base)
    for t in members:
        if t[1] in tarparse.FILE_TYPES:
            data_end = max(data_end, t[10] + t[6])
    return [Entry(*t) for t in members], pos, data_end


@pytest.mark.slow
@SETTINGS
@given(
    st.lists(member_parts, min_size=1, max_size=6),
    st.integers(0, 4000),
    st.integers(0, 1 << 40),
    st.integers(0, 1 << 41),
)
def test_c_entries_are_the_entries_of_c_tuples(
    parts: list[bytes], cut: int, base: int, data_end: int
) -> None:
    """scan_entries makes the Entry objects Entry(*member) makes of scan's tuples (each
    with its own xattrs dict), and the data end tarparse computed from them."""
    buf = b"".join(parts)
    buf = buf[: max(0, len(buf) - cut)] if cut % 3 == 0 else buf
    got = entries_scanned(buf, 0, base, data_end)
    assert got == entries_of_scan(buf, 0, base, data_end)
    assert len({id(e.xattrs) for e in got[0]}) == len(got[0])


@SETTINGS
@given(st.binary(max_size=3000), st.integers(0, 3000))
def test_c_entries_on_arbitrary_bytes(buf: bytes, pos: int) -> None:
    assert entries_scanned(buf, pos, 0, 0) == entries_of_scan(buf, pos, 0, 0)


def test_c_entries_of_a_real_layer() -> None:
    data = L.layer(
        L.dir("etc/"),
        L.file("etc/passwd", b"root:x:0:0\n", uid=1000, gid=(1 << 32) - 1, mtime=1.5),
        L.symlink("lib", "usr/lib"),
        L.hardlink("etc/hard", "etc/passwd"),
        L.chardev("dev/null", 1, 3),
        L.file("big", b"y" * 3000),
        L.fifo("run/p"),
    )
    got = entries_scanned(data, 0, 1 << 30, 7)
    assert got == entries_of_scan(data, 0, 1 << 30, 7)
    assert len(got[0]) == 7 and got[2] == got[0][5].offset + 3000  # "big" reaches furthest


def test_c_entries_refuse_other_classes() -> None:
    """Only slot descriptors of the class itself, thirteen different ones: nothing that runs
    code, and each slot of a new entry set once (C stores into them directly)."""
    slots = tarparse.ENTRY_SLOTS
    twice = (*slots[:-1], slots[0])
    for cls, fields in (
        (Entry, slots[:-1]),
        (Entry, (property(),) * 13),
        (int, slots),
        (Entry, twice),
    ):
        with pytest.raises(TypeError):
            _tarscan.scan_entries(b"", 0, 0, [], cls, fields, 0)
    with pytest.raises(ValueError):
        _tarscan.scan_entries(b"", -1, 0, [], Entry, slots, 0)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("encoding", ["octal", "base-256"])
def test_c_scanner_takes_signed_and_unsigned_checksums(signed: bool, encoding: str) -> None:
    """Old tars summed signed chars; a checksum field may be base-256 (its lead byte has the
    top bit set, and is not part of the sum): the C scanner takes each, as its reference."""
    info = tarfile.TarInfo("caf\u00e9/\u00fcber")  # bytes with the top bit in the sum
    info.size = 3
    head = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")[:512])
    head[148:156] = b" " * 8
    chk = sum(c - 256 if c >= 0x80 else c for c in head) if signed else sum(head)
    assert chk != sum(head) or not signed
    head[148:156] = base256(chk, 8, False) if encoding == "base-256" else f"{chk:06o}\0 ".encode()
    data = bytes(head) + b"abc".ljust(512, b"\0") + bytes(1024)
    members, pos = _tarscan.scan(data, 0, 0)
    assert [m[0] for m in members] == ["caf\u00e9/\u00fcber".encode()]
    assert (members, pos) == tarscan_ref.scan(data, 0, 0)


def test_c_scanner_refuses_nonsense_positions() -> None:
    with pytest.raises(ValueError):
        _tarscan.scan(b"", -1, 0)
    with pytest.raises(ValueError):
        _tarscan.scan(b"", 0, -5)
    # past the end, or on a buffer shorter than a block: nothing taken, nothing read
    assert _tarscan.scan(bytes(100), 5000, 0) == ([], 5000)
    assert _tarscan.scan(b"\x01" * 511, 0, 0) == ([], 0)


def test_c_scanner_reads_a_real_layer_as_its_reference() -> None:
    data = L.layer(
        L.dir("etc/"),
        L.file("etc/passwd", b"root:x:0:0\n", uid=1000, gid=(1 << 32) - 1),
        L.symlink("lib", "usr/lib"),
        L.hardlink("etc/hard", "etc/passwd"),
        L.chardev("dev/null", 1, 3),
        L.fifo("run/p"),
        fmt=tarfile.GNU_FORMAT,  # the gid in base-256
    )
    members, pos = _tarscan.scan(data, 0, 0)
    assert (members, pos) == tarscan_ref.scan(data, 0, 0)
    assert [m[0] for m in members] == [b"etc", b"etc/passwd", b"lib", b"etc/hard", b"dev/null",
                                       b"run/p"]  # fmt: skip
    assert members[1][3:5] == (1000, (1 << 32) - 1)
    assert members[4][8:10] == (1, 3)
    assert data[pos:].count(0) == len(data) - pos  # stopped at the end-of-archive blocks
    ustar = L.layer(L.file("p/" * 60 + "f", b"prefix and name"), fmt=tarfile.USTAR_FORMAT)
    members, pos = _tarscan.scan(ustar, 0, 1 << 30)
    assert members == tarscan_ref.scan(ustar, 0, 1 << 30)[0]
    assert members[0][0] == b"p/" * 60 + b"f" and members[0][10] == (1 << 30) + 512


# -- the whole parser: with and without C, in any chunks, against tarfile -----------------


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    last = 0
    for c in sorted({min(c, len(data)) for c in cuts}):
        if c > last:
            yield data[last:c]
            last = c
    if last < len(data):
        yield data[last:]


def outcome(parse: object) -> list[Entry] | str:
    try:
        return parse()  # type: ignore[operator,no-any-return]
    except LayerError as e:
        return str(e)


def streamed(data: bytes, cuts: list[int], fast: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(tarparse, "_scan", None)
        return outcome(lambda: parse_layer(chunked(data, cuts), "layer t"))


def with_tarfile(data: bytes, tmp: Path) -> list[Entry] | str:
    path = tmp / "layer.tar"
    path.write_bytes(data)
    try:
        return outcome(lambda: list(tarfile_oracle.iter_entries(str(path), "layer t")))
    except RecursionError:
        return "recursion"


names = st.text(st.sampled_from("abé/._\udcff-"), min_size=1, max_size=160).filter(
    lambda s: s.strip("/")
)
SPARSE_01 = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.map": "0,2,100,2",
             "GNU.sparse.name": "sparse", "GNU.sparse.size": "200"}  # fmt: skip
PAX_KEYS = ["SCHILY.xattr.user.a", "SCHILY.xattr.", "mtime", "uid", "gid", "size", "path",
            "linkpath", "comment", "atime", "GNU.sparse.size"]  # fmt: skip
# a float mtime, or one outside the header's field, is a PAX record in the PAX format
mtimes = st.one_of(st.integers(0, 1 << 34), st.floats(-1e10, 1e10))
entries = st.one_of(
    st.builds(
        L.file,
        names,
        st.binary(max_size=700),
        uid=st.integers(0, 1 << 33),
        mtime=mtimes,
    ),
    st.builds(L.dir, names, mtime=mtimes),
    st.builds(L.symlink, names, names, mtime=mtimes),
    st.builds(L.chardev, names, st.integers(0, 1 << 22), st.integers(0, 1 << 22)),
    st.builds(
        L.file,
        names,
        st.binary(max_size=8),
        pax=st.dictionaries(
            st.sampled_from(PAX_KEYS),
            st.text(st.sampled_from("0123456789.-x é"), max_size=12),
            max_size=3,
        ),
    ),
    st.just(L.file("s", b"abcd", pax=SPARSE_01)),
)


@st.composite
def layer_bytes(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    try:
        data = L.layer(*draw(st.lists(entries, max_size=8)), fmt=fmt)
    except (ValueError, UnicodeError):  # what tarfile cannot write in that format
        data = L.layer(L.file("fallback", b"x"))
    ba = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):  # damage: bytes overwritten
        if ba:
            at = draw(st.integers(0, len(ba) - 1))
            ba[at : at + 1] = draw(st.binary(min_size=1, max_size=1))
    cut = draw(st.integers(0, len(ba)))
    return bytes(ba[: cut if draw(st.booleans()) else len(ba)])


@SETTINGS
@given(layer_bytes(), st.lists(st.integers(0, 20000), max_size=8))
def test_parser_reads_what_tarfile_read(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, cuts: list[int]
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        fast = streamed(data, cuts, True, mp)
        slow = streamed(data, [], False, mp)
    assert fast == slow
    old = with_tarfile(data, tmp_path_factory.mktemp("t"))
    if isinstance(fast, str) and any(s in fast for s in NEW_REFUSALS):
        return
    if old == "recursion":
        assert isinstance(fast, str)
        return
    assert fast == old


def test_parser_reads_every_seed_in_one_byte_chunks() -> None:
    data = L.layer(
        L.file("etc/passwd", b"root\n", pax={"SCHILY.xattr.user.k": "v"}),
        L.file("a/" + "n" * 200 + "/long", b"x", mtime=1.5, pax={"mtime": "1.5"}),
        L.file("sparse", b"abcd", pax=SPARSE_01),
        L.dir("d"),
    )
    whole = parse_layer(iter([data]), "layer t")
    assert parse_layer(iter([data[i : i + 1] for i in range(len(data))]), "layer t") == whole
    assert whole[0].xattrs == {b"user.k": b"v"}
    assert whole[1].name == b"a/" + b"n" * 200 + b"/long" and whole[1].mtime_ns == 1_500_000_000
    assert whole[2].name == b"sparse" and whole[2].size == 200


# -- hostile headers the new parser refuses --------------------------------------------


def pax_header(records: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = kind
    info.size = len(records)
    pad = -len(records) % 512
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(pad)


def test_a_chain_of_extended_headers_is_refused_not_recursed() -> None:
    """tarfile recursed once per extended header: a layer of thousands of them crashed the
    reader with RecursionError (not a LayerError)."""
    data = pax_header(b"11 a=bcdef\n") * 5000 + L.layer(L.file("f", b"x"))
    with pytest.raises(LayerError, match="layer t: invalid tar: more than 64 extended headers"):
        parse_layer(iter([data]), "layer t")


def test_a_sparse_map_count_in_any_form_is_bounded() -> None:
    """PAX sparse 1.0's run count was bounded only when it was plain digits: "+9999999999"
    read the whole layer as numbers."""
    sparse10 = b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n30 GNU.sparse.realsize=9999\n"
    info = tarfile.TarInfo("s")
    info.size = 1 << 20
    body = b"+99999999999\n" + b"0\n" * ((1 << 20) // 2 - 7)
    data = pax_header(sparse10) + info.tobuf(tarfile.USTAR_FORMAT) + body.ljust(1 << 20, b"\n")
    with pytest.raises(LayerError, match="sparse map of 99999999999 runs"):
        parse_layer(iter([data]), "layer t")


def test_a_negative_extended_header_size_is_refused() -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT)[:512])
    block[124:136] = b"\xff" * 12  # -1 in base-256
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    with pytest.raises(LayerError, match="extended header of -1 bytes"):
        parse_layer(iter([bytes(block) + bytes(1024)]), "layer t")


def test_the_c_scanner_is_built() -> None:
    """pip builds it with vmimg: without it every header goes through Python, slowly."""
    assert tarparse._scan is _tarscan.scan_entries


def test_random_layers_split_anywhere(tmp_path: Path) -> None:
    rng = random.Random(7)
    files = (L.file(f"d{i % 7}/f{i}", rng.randbytes(rng.randrange(2000))) for i in range(300))
    data = L.layer(*files)
    whole = parse_layer(iter([data]), "layer t")
    for _ in range(20):
        cuts = sorted(rng.randrange(len(data)) for _ in range(rng.randrange(1, 40)))
        assert parse_layer(chunked(data, cuts), "layer t") == whole
    path = tmp_path / "l.tar"
    path.write_bytes(data)
    assert whole == list(tarfile_oracle.iter_entries(str(path), "layer t"))
    assert len(whole) == 300


# -- one pass: the cold unpack ---------------------------------------------------------


def test_a_cold_unpack_parses_the_layer_on_the_way(cache: Cache) -> None:
    """The entries come from the chunks being written: equal to a parse of the cached tar,
    with nothing written beside it."""
    tar = L.layer(*(L.file(f"d/f{i}", b"x" * i) for i in range(50)), L.symlink("l", "d"))
    blob = gzip.compress(tar)
    desc = Descriptor(OCI_LAYER_GZIP, digest_bytes(blob), len(blob))
    layer = unpack_layer_to_cache(cache, desc, digest_bytes(tar), lambda: io.BytesIO(blob))
    assert layer.entries is not None and len(layer.entries) == 51
    assert layer.entries == list(iter_entries(layer.tar_path, "again"))
    assert os.listdir(os.path.dirname(layer.tar_path)) == [os.path.basename(layer.tar_path)]


def test_a_malformed_layer_is_kept_and_reported_by_flatten(cache: Cache) -> None:
    """The tar's own faults wait for flatten, after the digests (as before: the layer is
    whole and verified; what is wrong is inside it)."""
    tar = L.layer(L.file("a", b"a"))[:1024] + b"\xff" * 512 + bytes(1024)
    desc = Descriptor(OCI_LAYER_TAR, digest_bytes(tar), len(tar))
    layer = unpack_layer_to_cache(cache, desc, digest_bytes(tar), lambda: io.BytesIO(tar))
    assert layer.entries is None and os.path.exists(layer.tar_path)
    with pytest.raises(LayerError, match=r"^layer sha256:\w+: invalid tar header at offset 1024$"):
        flatten([layer])


class _FailingFile(io.BytesIO):
    """A cache file whose disk fills after `room` bytes."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_write_behind_writes_and_hashes_in_order(tmp_path: Path) -> None:
    chunks = [os.urandom(1000 + i) for i in range(40)]
    blob = [os.urandom(500 + i) for i in range(40)]
    hasher, blob_hasher, out = Hasher(), Hasher("sha512"), io.BytesIO()
    behind = WriteBehind(
        hasher, out, SpaceGuard(str(tmp_path)), "layer x", depth=2, blob_hasher=blob_hasher
    )
    for c, b in zip(chunks, blob, strict=True):
        behind.put(c)
        behind.put_blob(b)  # hashed only: never written
    behind.finish()
    behind.finish()  # once finished, finishing again changes nothing
    assert out.getvalue() == b"".join(chunks)
    assert hasher.digest == digest_bytes(b"".join(chunks))
    assert blob_hasher.digest == digest_bytes(b"".join(blob), "sha512")
    assert blob_hasher.size == sum(map(len, blob))
    assert not any(t.name == "layer-write" for t in threading.enumerate())


def test_write_behind_passes_the_disk_s_error_on(tmp_path: Path) -> None:
    """A write that fails in the thread is raised by the next put or by finish, and the
    thread takes (and drops) what follows, so that the reader never blocks."""
    behind = WriteBehind(Hasher(), _FailingFile(5000), SpaceGuard(str(tmp_path)), "x", depth=1)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):
            behind.put(bytes(1000))
        behind.finish()
    with pytest.raises(OSError, match="No space left"):
        behind.finish()
    assert not any(t.name == "layer-write" for t in threading.enumerate())


def test_a_failed_unpack_leaves_no_thread_behind(cache: Cache) -> None:
    tar = L.layer(*(L.file(f"f{i}", os.urandom(3000)) for i in range(30)))
    blob = gzip.compress(tar)
    desc = Descriptor(OCI_LAYER_GZIP, digest_bytes(blob), len(blob))
    with pytest.raises(DigestError, match="uncompressed"):
        unpack_layer_to_cache(cache, desc, digest_bytes(b"other"), lambda: io.BytesIO(blob))
    assert not any(t.name == "layer-write" for t in threading.enumerate())
