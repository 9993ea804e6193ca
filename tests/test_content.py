"""ContentReader.read_many: the bytes read() gives for each range, whatever the ranges
(near or far in one layer file, across files, in memory, sparse, bad), in fewer reads."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from unittest.mock import ANY

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import readplan_ref
from vmimg.errors import ContentError
from vmimg.image.layers import Extent
from vmimg.rootfs import _readplan
from vmimg.rootfs.content import _CONTENT_FIELDS, READ_GAP_MAX, READ_SPAN_MAX, ContentReader
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


def test_small_files_close_together_take_one_mapping(
    layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    count = READ_SPAN_MAX // 1024  # 100 bytes every KiB: all within one span
    files = [(Content(size=100, path=layers[0], offset=1024 * k), 0, 100) for k in range(count)]
    maps, preads = [], []
    real_map, real_pread = mmap.mmap, os.pread
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: maps.append(a) or real_map(*a, **k))
    monkeypatch.setattr(os, "pread", lambda *a: preads.append(a) or real_pread(*a))
    with ContentReader() as reader:
        got = reader.read_many(files)
        assert got == [reader.read(c, s, n) for c, s, n in files]
    assert len(maps) == 1 and preads == [(ANY, 100, 1024 * k) for k in range(count)]


def test_where_a_file_cannot_be_mapped_a_span_is_read_in_one(
    layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [(Content(size=100, path=layers[0], offset=1024 * k), 0, 100) for k in range(50)]
    with ContentReader() as reader:
        expected = [reader.read(c, s, n) for c, s, n in files]

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENODEV, "no mmap here")

    preads = []
    real_pread = os.pread
    monkeypatch.setattr(mmap, "mmap", refuse)
    monkeypatch.setattr(os, "pread", lambda *a: preads.append(a) or real_pread(*a))
    with ContentReader() as reader:
        assert reader.read_many(files) == expected
    assert len(preads) == 1


def test_read_many_refuses_a_range_outside_its_content(layers: list[str]) -> None:
    with ContentReader() as reader, pytest.raises(ContentError, match="outside content"):
        reader.read_many([(Content(size=10, path=layers[0]), 5, 6)])
    short = Path(layers[0]).stat().st_size
    with ContentReader() as reader, pytest.raises(ContentError, match="shorter"):
        reader.read_many([(Content(size=10, path=layers[0], offset=short - 5), 0, 10)])


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_the_c_plan_and_cuts_are_the_reference_s(layers: list[str], data: st.DataObject) -> None:
    wanted = data.draw(ranges(layers))
    gap, span = data.draw(st.sampled_from([(READ_GAP_MAX, READ_SPAN_MAX), (0, 4096), (512, 0)]))
    planned = _readplan.spans(wanted, gap, span, _CONTENT_FIELDS)
    assert planned == readplan_ref.spans(wanted, gap, span)
    blob = Path(layers[0]).read_bytes(), Path(layers[1]).read_bytes()
    for i, j, first, end in planned:
        if first >= 0:
            read = blob[layers.index(str(wanted[i][0].path))][first:end]
            got = _readplan.cut(read, wanted, i, j, first, _CONTENT_FIELDS)
            assert got == readplan_ref.cut(read, wanted, i, j, first)


HUGE = 1 << 70


@pytest.mark.parametrize(
    ("content", "start", "length"),
    [
        (Content(size=HUGE, path="p"), 0, 1),  # a size past 64 bits
        (Content(size=10, path="p", offset=HUGE), 0, 1),
        (Content(size=10, path="p", offset=(1 << 63) - 2), 0, 5),  # offset + length overflows
        (Content(size=-5, path="p"), 0, 0),
        (Content(size=10, path="p"), -1, 1),
        (Content(size=10, path="p"), 0, HUGE),
        (Content(size=10, path="p"), 2**63 - 1, 2),
        (Content(size="10", path="p"), 0, 1),  # type: ignore[arg-type]  # not an int
    ],
)
def test_values_no_file_has_are_read_alone_and_refused_there(
    content: Content, start: int, length: int
) -> None:
    plain = (Content(size=10, path="p"), 0, 10)
    assert _readplan.spans([plain, (content, start, length), plain], 8, 100, _CONTENT_FIELDS) == [
        (0, 1, 0, 10),
        (1, 2, -1, -1),
        (2, 3, 0, 10),
    ]


def test_wrong_shapes_are_type_errors_and_bad_cuts_value_errors() -> None:
    c = Content(size=10, path="p")
    for bad in ([(c, 0)], [("not a content", 0, 1)], [[c, 0, 1]]):
        with pytest.raises(TypeError):
            _readplan.spans(bad, 8, 100, _CONTENT_FIELDS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _readplan.spans([(c, 0, 1)], 8, 100, (Content.size,))
    with pytest.raises(ValueError, match="outside"):
        _readplan.cut(b"12345", [(c, 0, 10)], 0, 1, 0, _CONTENT_FIELDS)  # 5 bytes read, 10 asked
    with pytest.raises(ValueError, match="outside"):
        _readplan.cut(b"x" * 20, [(c, 0, 10)], 0, 1, 5, _CONTENT_FIELDS)  # before what was read
    with pytest.raises(ValueError, match="run"):
        _readplan.cut(b"x" * 20, [(c, 0, 10)], 0, 2, 0, _CONTENT_FIELDS)
