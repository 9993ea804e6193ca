"""Length-prefixed text fields (vmimg/netstrings.py): any text round-trips, and anything that
is not a whole record of them is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmimg import netstrings


@given(st.lists(st.text()))
def test_any_fields_round_trip(fields: list[str]) -> None:
    assert netstrings.unpack(netstrings.pack(fields)) == fields


@given(st.lists(st.text()), st.data())
def test_a_record_cut_short_anywhere_is_refused(fields: list[str], data: st.DataObject) -> None:
    """Even between two fields: the end mark is missing then."""
    text = netstrings.pack(fields)
    cut = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    assert netstrings.unpack(text[:cut]) is None


@pytest.mark.parametrize(
    "text",
    [
        "5:abc,;",  # a length past the end
        "3:abcd,;",  # a length short of the comma
        "3:abc;",  # no comma
        "3:abc,",  # no end mark
        "3:abc;,;",
        "-1:,;",
        "+3:abc,;",
        " 3:abc,;",
        "3 :abc,;",
        "\u0663:abc,;",  # a digit, but not an ASCII one
        "1e3:abc,;",
        "0x3:abc,;",
        ":abc,;",
        "3abc,;",
        "9999999999:abc,;",  # more digits than any length of ours
        "3:abc,x;",  # bytes between the fields and the end mark
        "3:abc,;;",
        "",
    ],
)
def test_malformed_text_is_refused(text: str) -> None:
    assert netstrings.unpack(text) is None


def test_no_fields_is_the_end_mark_alone() -> None:
    assert netstrings.pack([]) == ";" and netstrings.unpack(";") == []


def test_a_file_round_trips_names_that_are_not_utf8(tmp_path: Path) -> None:
    fields = ["/srv/\udcff\udcfe", "a,b:c\n", ""]  # surrogateescape: bytes 0xff 0xfe
    netstrings.write_file(str(tmp_path / "r"), fields)
    assert netstrings.read_file(str(tmp_path / "r")) == fields


def test_an_endless_file_is_read_no_further_than_read_max(tmp_path: Path) -> None:
    path = tmp_path / "r"
    with open(path, "w") as f:
        f.write(f"{netstrings.READ_MAX * 2}:")
        f.write("x" * (netstrings.READ_MAX * 2) + ",;")
    assert netstrings.read_file(str(path)) is None
