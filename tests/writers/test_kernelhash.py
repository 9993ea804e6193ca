"""The kernel's metadata hashes in vmimg/rootfs/writers/_kernelhash.c: CRC-32C, both ways it
computes (SSE4.2 and the table), against the published test vectors and a bit-at-a-time
reference; ext4's half-MD4 name hash against debugfs's dx_hash and a plain-Python reference."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need
from vmimg.rootfs.writers._kernelhash import crc32c, half_md4

POLY = 0x82F63B78
MASK = 0xFFFFFFFF


def reference(seed: int, data: bytes) -> int:
    """The kernel's crc32c(seed, data), one bit at a time."""
    crc = seed
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (POLY if crc & 1 else 0)
    return crc


def standard(data: bytes) -> int:
    """The standard CRC-32C (inverted in and out), as the test vectors give it."""
    return crc32c(MASK, data) ^ MASK


# RFC 3720 (iSCSI) appendix B.4, and the usual check value.
VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
    (b"", 0),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_published_vectors(data: bytes, expected: int) -> None:
    assert standard(data) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(0, MASK), st.binary(max_size=100), st.integers(0, 7))
def test_agrees_with_the_bitwise_reference(seed: int, data: bytes, skip: int) -> None:
    view = memoryview(data)[min(skip, len(data)) :]  # unaligned starts too
    assert crc32c(seed, view) == reference(seed, bytes(view))
    assert crc32c(seed, bytearray(view)) == crc32c(seed, bytes(view))


def test_chaining_is_one_pass() -> None:
    data = os.urandom(10_000)
    assert crc32c(crc32c(123, data[:4567]), data[4567:]) == crc32c(123, data)


def test_the_table_gives_what_the_instruction_gives() -> None:
    """VMIMG_CRC32C_TABLE=1 forces the table (what a CPU without SSE4.2 runs)."""
    data = os.urandom(5000)
    code = (
        "import sys; from vmimg.rootfs.writers._kernelhash import crc32c; "
        "d = sys.stdin.buffer.read(); "
        "print([crc32c(s, d[i:]) for s in (0, 1, 0xFFFFFFFF) for i in range(9)])"
    )
    env = {**os.environ, "VMIMG_CRC32C_TABLE": "1"}
    r = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, env=env,
                       check=True)  # fmt: skip
    expected = [crc32c(s, data[i:]) for s in (0, 1, MASK) for i in range(9)]
    assert r.stdout.decode().strip() == str(expected)
    assert expected[18] == reference(MASK, data)


def test_refuses_what_is_not_a_seed_or_bytes() -> None:
    with pytest.raises(ValueError, match="32-bit"):
        crc32c(1 << 32, b"x")
    for seed in (-1, 1 << 70):
        with pytest.raises(OverflowError):
            crc32c(seed, b"x")
    with pytest.raises(TypeError):
        crc32c(0, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        crc32c(1.0, b"x")  # type: ignore[arg-type]


# -- ext4's half-MD4 name hash ---------------------------------------------------------------

K2, K3 = 0o13240474631, 0o15666365641
MD4_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
ROUNDS = (
    (lambda b, c, d: d ^ (b & (c ^ d)), 0, ((0, 3), (1, 7), (2, 11), (3, 19), (4, 3), (5, 7),
                                           (6, 11), (7, 19))),
    (lambda b, c, d: (b & c) + ((b ^ c) & d), K2, ((1, 3), (3, 5), (5, 9), (7, 13), (0, 3),
                                                  (2, 5), (4, 9), (6, 13))),
    (lambda b, c, d: b ^ c ^ d, K3, ((3, 3), (7, 9), (2, 11), (6, 15), (1, 3), (5, 9), (0, 11),
                                     (4, 15))),
)  # fmt: skip


def md4_reference(name: bytes, seed: tuple[int, int, int, int]) -> tuple[int, int]:
    """fs/ext4/hash.c's half-MD4 (unsigned chars), written out plainly."""
    buf = list(seed) if any(seed) else list(MD4_INIT)
    remaining = len(name)
    pos = 0
    while True:
        pad = remaining | (remaining << 8)
        pad = (pad | (pad << 16)) & MASK
        chunk = name[pos : pos + min(remaining, 32)]
        words = [pad] * 8
        val, i = pad, 0
        for i, ch in enumerate(chunk):
            val = (ch + (val << 8)) & MASK
            if i % 4 == 3:
                words[i // 4], val = val, pad
        if len(chunk) % 4:
            words[len(chunk) // 4] = val
        a, b, c, d = buf
        for f, k, steps in ROUNDS:
            for x, s in steps:
                t = (a + f(b, c, d) + words[x] + k) & MASK
                a, b, c, d = d, ((t << s) | (t >> (32 - s))) & MASK, b, c
        buf = [(v + w) & MASK for v, w in zip(buf, (a, b, c, d), strict=True)]
        remaining -= 32
        pos += 32
        if remaining <= 0:
            break
    major = buf[1] & ~1
    if major == 0x7FFFFFFF << 1:
        major = 0x7FFFFFFE << 1
    return major, buf[2]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=255), st.tuples(*[st.integers(0, MASK)] * 4), st.booleans())
def test_half_md4_agrees_with_the_reference(
    name: bytes, seed: tuple[int, int, int, int], zero_seed: bool
) -> None:
    seed = (0, 0, 0, 0) if zero_seed else seed
    assert half_md4(name, seed) == md4_reference(name, seed)


@pytest.mark.parametrize("name", ["hello", "a", "x" * 31, "y" * 32, "z" * 33, "f" * 255,
                                  "lost+found", "Makefile.in"])  # fmt: skip
@pytest.mark.parametrize("seed", ["", "01234567-89ab-cdef-0123-456789abcdef"])
def test_half_md4_is_what_debugfs_computes(name: str, seed: str) -> None:
    """debugfs's dx_hash (e2fsprogs' own code) as the oracle; ASCII names, where its half_md4
    and the unsigned variant ext4 uses agree."""
    args = f"dx_hash -h half_md4 {'-s ' + seed if seed else ''} {name}"
    r = subprocess.run([need("debugfs"), "-R", args, "/dev/null"], capture_output=True,
                       text=True, check=False)  # fmt: skip
    m = re.search(r"Hash of \S+ is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    words = struct.unpack("<4I", uuid.UUID(seed).bytes) if seed else (0, 0, 0, 0)
    assert half_md4(name.encode(), words) == (int(m[1], 16), int(m[2], 16))


def test_half_md4_refuses_what_is_not_a_name_and_seed() -> None:
    with pytest.raises(TypeError):
        half_md4("name", (0, 0, 0, 0))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        half_md4(b"name", (0, 0, 0))  # type: ignore[arg-type]
