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


def member(b: bytes, hdr: int) -> tuple[Member, int] | None:
    kind = b[156:157]
    if kind in (b"L", b"K", b"S", b"x", b"g", b"X"):
        return None
    chk = number(b[148:156])
    if chk is None or not checksum_ok(b, chk):
        return None
    fields = [
        number(b[100:108]),
        number(b[108:116]),
        number(b[116:124]),
        number(b[124:136]),
        number(b[136:148]),
        number(b[329:337]),
        number(b[337:345]),
    ]
    if any(x is None for x in fields):
        return None
    mode, uid, gid, size, mtime, major, minor = (x for x in fields if x is not None)
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
    data = hdr + BLOCK
    skip = kind not in NO_DATA
    nxt = data + (-(-size // BLOCK) * BLOCK if skip else 0)
    return (name, kind, mode, uid, gid, mtime * NS_PER_S, size, link, major, minor, data), nxt


def scan(buf: bytes, pos: int, base: int) -> tuple[list[Member], int]:
    out: list[Member] = []
    while pos + BLOCK <= len(buf):
        b = buf[pos : pos + BLOCK]
        if b.count(0) == BLOCK:
            break
        got = member(b, base + pos)
        if got is None:
            break
        m, nxt = got
        out.append(m)
        pos = nxt - base
        if pos > len(buf):
            break
    return out, pos
