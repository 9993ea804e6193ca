"""A pure-Python reference for the C fast path, vmimg/image/_tarscan.c: the same contract
(which headers it takes, and what it makes of them), written plainly, as the oracle the C
code is checked against (tests/test_tarparse.py)."""

from __future__ import annotations

BLOCK = 512
NS_PER_S = 1_000_000_000
MAX_ID = (1 << 32) - 1
MAX_MTIME_S = ((1 << 63) - 1) // NS_PER_S
MAX_BASE256 = 1 << 62
BLANKS = b" \t\n\v\f\r\x1c\x1d\x1e\x1f"  # what str.strip() strips of ASCII text
META = b"LKSxgX"
NO_DATA = b"123456"  # types whose data tarfile does not skip
MAX_PAX_HEADER = 64 << 10  # local PAX headers of more data go to the Python parser
MAX_PAX_DIGITS = 18  # PAX numbers and record lengths of more digits too
MAX_PAX_SIZE = (1 << 60) - 1
MAX_NS = (1 << 63) - 1
DIGITS = b"0123456789"

Member = tuple[bytes, bytes, int, int, int, int, int, bytes, int, int, int]


def number(f: bytes) -> int | None:
    """A number field in the plain forms, or None (the Python parser decides)."""
    if f[0] == 0x80:
        n = int.from_bytes(f[1:], "big")
        return n if n < MAX_BASE256 else None
    if f[0] == 0xFF:
        return None
    text = f.split(b"\0", 1)[0].strip(BLANKS)
    if any(c not in b"01234567" for c in text):
        return None
    return int(text, 8) if text else 0


def cstr(f: bytes) -> bytes:
    return f.split(b"\0", 1)[0]


def checksum_ok(b: bytes, stored: int) -> bool:
    spaced = b[:148] + b" " * 8 + b[156:]
    unsigned = sum(spaced)
    signed = sum(c - 256 if c >= 0x80 else c for c in spaced)
    return stored in (unsigned, signed)


def fields(b: bytes) -> list[int] | None:
    """mode, uid, gid, size, mtime, devmajor, devminor; None unless the checksum is right
    and every number is in the plain forms."""
    chk = number(b[148:156])
    if chk is None or not checksum_ok(b, chk):
        return None
    out = [number(b[o : o + w]) for o, w in ((100, 8), (108, 8), (116, 8), (124, 12),
                                               (136, 12), (329, 8), (337, 8))]  # fmt: skip
    return None if any(x is None for x in out) else [x for x in out if x is not None]


# A local PAX header's records that matter: path and linkpath, and the numbers (size, uid,
# gid, and mtime in nanoseconds)
Pax = tuple[dict[bytes, bytes], dict[bytes, int]]


def member(b: bytes, hdr: int, pax: Pax | None = None) -> tuple[Member, int] | None:
    kind = b[156:157]
    if kind in (b"L", b"K", b"S", b"x", b"g", b"X"):
        return None
    f = fields(b)
    if f is None:
        return None
    mode, uid, gid, size, mtime, major, minor = f
    if uid > MAX_ID or gid > MAX_ID or mtime > MAX_MTIME_S:
        return None
    name, link, prefix = cstr(b[0:100]), cstr(b[157:257]), cstr(b[345:500])
    if kind == b"\0" and name.endswith(b"/"):
        kind = b"5"
    if kind == b"5":
        name = name.rstrip(b"/")
    if prefix:
        name = prefix + b"/" + name
    if kind == b"5":
        name = name.rstrip(b"/")
    mtime_ns = mtime * NS_PER_S
    if pax is not None:  # tarfile's _apply_pax_info
        names, numbers = pax
        if b"path" in names:  # its trailing slashes go, whatever the type
            name = names[b"path"].rstrip(b"/")
        link = names.get(b"linkpath", link)
        size = numbers.get(b"size", size)
        uid = numbers.get(b"uid", uid)
        gid = numbers.get(b"gid", gid)
        mtime_ns = numbers.get(b"mtime", mtime_ns)
    data = hdr + BLOCK
    skip = kind not in NO_DATA
    nxt = data + (-(-size // BLOCK) * BLOCK if skip else 0)
    return (name, kind, mode, uid, gid, mtime_ns, size, link, major, minor, data), nxt


def pax_number(v: bytes, top: int) -> int | None:
    if not v or len(v) > MAX_PAX_DIGITS or any(c not in DIGITS for c in v):
        return None
    n = int(v)
    return n if n <= top else None


def pax_time(v: bytes) -> int | None:
    """tarfile.py's _pax_time_ns, where the result fits 64-bit nanoseconds."""
    whole, _, frac = v.partition(b".")
    negative = whole.startswith(b"-")
    digits = whole[1:] if negative else whole
    if not digits or len(digits) > MAX_PAX_DIGITS or any(c not in DIGITS for c in digits):
        return None
    if any(c not in DIGITS for c in frac):
        return None
    sec = int(digits)
    ns = sec * NS_PER_S + int((frac + b"000000000")[:9])
    if sec > MAX_MTIME_S or ns > MAX_NS:
        return None
    return -ns if negative else ns


def pax_records(data: bytes, size: int) -> Pax | None:
    """The records that matter of a local PAX header (`data`: its records and padding), or
    None where the Python parser must read them."""
    if b" hdrcharset=" in data:
        return None
    if size < len(data) and data[size] in DIGITS:
        return None
    records: dict[bytes, bytes] = {}
    p = 0
    while p < size:
        d = 0
        while p + d < size and data[p + d] in DIGITS:
            d += 1
        if d == 0 or d > MAX_PAX_DIGITS:
            return None
        length = int(data[p : p + d])
        end = p + length
        if length == 0 or end > size or p + d >= end:
            return None
        if data[p + d] != ord(" ") or data[end - 1] != ord("\n"):
            return None
        keyword, eq, value = data[p + d + 1 : end - 1].partition(b"=")
        if not eq or not keyword:
            return None
        if keyword.startswith((b"GNU.sparse", b"SCHILY.xattr.")):
            return None
        records[keyword] = value  # the last record of a keyword wins
        p = end
    names = {k: v for k, v in records.items() if k in (b"path", b"linkpath")}
    if any(b"\0" in v for v in names.values()):
        return None
    numbers: dict[bytes, int] = {}
    for key, top in ((b"size", MAX_PAX_SIZE), (b"uid", MAX_ID), (b"gid", MAX_ID)):
        if key in records:
            n = pax_number(records[key], top)
            if n is None:
                return None
            numbers[key] = n
    if b"mtime" in records:
        t = pax_time(records[b"mtime"])
        if t is None:
            return None
        numbers[b"mtime"] = t
    return names, numbers


def pax_member(buf: bytes, pos: int, base: int) -> tuple[Member, int] | None:
    """A local PAX header at buf[pos] and the plain member after it, as one member."""
    f = fields(buf[pos : pos + BLOCK])
    if f is None or f[3] > MAX_PAX_HEADER:
        return None
    size = f[3]
    padded = -(-size // BLOCK) * BLOCK
    hdr = pos + BLOCK + padded
    if hdr + BLOCK > len(buf):
        return None
    pax = pax_records(buf[pos + BLOCK : hdr], size)
    if pax is None:
        return None
    b = buf[hdr : hdr + BLOCK]
    if b.count(0) == BLOCK:
        return None
    return member(b, base + hdr, pax)


def scan(buf: bytes, pos: int, base: int) -> tuple[list[Member], int]:
    out: list[Member] = []
    while pos + BLOCK <= len(buf):
        b = buf[pos : pos + BLOCK]
        if b.count(0) == BLOCK:
            break
        got = pax_member(buf, pos, base) if b[156:157] == b"x" else member(b, base + pos)
        if got is None:
            break
        m, nxt = got
        out.append(m)
        pos = nxt - base
        if pos > len(buf):
            break
    return out, pos
