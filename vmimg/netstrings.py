"""Length-prefixed text fields: how the cache's small records (hit records, entry seals) are
written and read.

Each field is its length in characters, a colon, the text and a comma (`5:hello,`), and the
record ends with END (`5:hello,2:hi,;`). Any text fits (paths may hold commas, newlines,
anything but NUL), and a record cut short anywhere, or forged with a lying length, is told
from a whole one. The warm-hit fast path (cli/quick) reads these records before anything
else is loaded: json, with the re and enum it imports, was a fifth of that path's time, and
this needs no import at all.
"""

from __future__ import annotations

from collections.abc import Sequence

LENGTH_DIGITS_MAX = 9  # no field of ours comes near 1e9 characters
END = ";"  # after the last field: a record cut between two fields lacks it
# Paths are not always UTF-8: surrogateescape keeps them as they are, both ways.
ENCODING, ERRORS = "utf-8", "surrogateescape"
READ_MAX = 1 << 20  # far more than a record of ours: a forged endless one is cut off


def pack(fields: Sequence[str]) -> str:
    """The fields as one text."""
    return "".join(f"{len(field)}:{field}," for field in fields) + END


def unpack(text: str) -> list[str] | None:
    """The fields of a text `pack` made; None if it is anything else (cut short, a length
    that is not plain digits or runs past the end, a missing comma or END, trailing bytes)."""
    if not text.endswith(END):
        return None
    body = text[: -len(END)]
    fields: list[str] = []
    at = 0
    while at < len(body):
        colon = body.find(":", at, at + LENGTH_DIGITS_MAX + 1)
        digits = body[at:colon]
        if colon < 0 or not (digits.isascii() and digits.isdigit()):
            return None
        start = colon + 1
        end = start + int(digits)
        if body[end : end + 1] != ",":
            return None
        fields.append(body[start:end])
        at = end + 1
    return fields


def write_file(path: str, fields: Sequence[str]) -> None:
    """Write the fields as the file at `path` (created, or replaced in place)."""
    with open(path, "w", encoding=ENCODING, errors=ERRORS) as f:
        f.write(pack(fields))


def read_file(path: str) -> list[str] | None:
    """The fields of the file at `path` (see `unpack`; its first READ_MAX characters only).
    OSError if it cannot be read."""
    with open(path, encoding=ENCODING, errors=ERRORS) as f:
        return unpack(f.read(READ_MAX))
