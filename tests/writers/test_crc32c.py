"""CRC-32C (vmimg/rootfs/writers/_crc32c.c), both ways it computes (SSE4.2 and the table),
against the published test vectors and a bit-at-a-time reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmimg.rootfs.writers._crc32c import crc32c

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
        "import sys; from vmimg.rootfs.writers._crc32c import crc32c; "
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
