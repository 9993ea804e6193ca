"""ContentReader.read_many: the bytes read() gives for each range, whatever the ranges
(near or far in one layer file, across files, in memory, sparse, bad), in fewer reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmimg.errors import ContentError
from vmimg.image.layers import Extent
from vmimg.rootfs.content import READ_GAP_MAX, READ_SPAN_MAX, ContentReader
from vmimg.rootfs.tree import Content

FILE_SIZE = 3 * READ_SPAN_MAX


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    paths = []
    for n in range(2):
        path = tmp_path_factory.mktemp("layers") / f"layer{n}"
        path.write_bytes(os.urandom(FILE_SIZE))
        paths.append(str(path))
    return paths


@st.composite
def ranges(draw: st.DrawFn, layers: list[str]) -> list[tuple[Content, int, int]]:
    """Contents mostly small and close together in one file, as small files in a layer."""
    out = []
    offset = 0
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["near", "near", "near", "far", "other", "data", "sparse"]))
        size = draw(st.integers(0, 3 * 4096))
        if kind == "near":
            offset += draw(st.sampled_from([0, 512, READ_GAP_MAX, READ_GAP_MAX + 1]))
        elif kind == "far":
            offset = draw(st.integers(0, FILE_SIZE - size))
        offset = min(offset, FILE_SIZE - size)
        if kind == "data":
            content = Content.from_bytes(os.urandom(size))
        elif kind == "sparse":
            content = Content(
                size=size + 4096, path=layers[0], offset=offset, extents=(Extent(4096, size),)
            )
        else:
            content = Content(size=size, path=layers[kind == "other"], offset=offset)
        start = draw(st.integers(0, size))
        length = draw(st.integers(0, size - start))
        out.append((content, start, length))
        offset += size
    return out


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_read_many_reads_what_read_reads(layers: list[str], data: st.DataObject) -> None:
    wanted = data.draw(ranges(layers))
    counted: list[int] = []
    with ContentReader() as reader:
        reader.on_bytes = counted.append
        got = reader.read_many(wanted)
        assert got == [reader.read(c, s, n) for c, s, n in wanted]
    assert sum(counted) == 2 * sum(n for _, _, n in wanted)  # progress: what was asked for


def test_small_files_close_together_take_one_read(
    layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    count = READ_SPAN_MAX // 1024  # 100 bytes every KiB: all within one span
    files = [(Content(size=100, path=layers[0], offset=1024 * k), 0, 100) for k in range(count)]
    preads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda *a: preads.append(a) or real(*a))
    with ContentReader() as reader:
        assert len(reader.read_many(files)) == count
    assert len(preads) == 1


def test_read_many_refuses_a_range_outside_its_content(layers: list[str]) -> None:
    with ContentReader() as reader, pytest.raises(ContentError, match="outside content"):
        reader.read_many([(Content(size=10, path=layers[0]), 5, 6)])
    short = Path(layers[0]).stat().st_size
    with ContentReader() as reader, pytest.raises(ContentError, match="shorter"):
        reader.read_many([(Content(size=10, path=layers[0], offset=short - 5), 0, 10)])
