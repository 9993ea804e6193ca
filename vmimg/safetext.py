"""Text from outside (a guest's console, a registry's answer, an image's metadata) made
safe to print: no control characters reach a terminal, a JSON report or a JUnit file.

A terminal acts on escape sequences (moving the cursor, rewriting the title, in some
terminals worse), and XML 1.0 cannot hold most control characters at all, so each such
character is shown as a visible `\\xNN` (or `\\uNNNN`) escape instead.
"""

from __future__ import annotations

import re

# C0 controls but tab, DEL, C1 controls, lone surrogates (from surrogateescape decoding)
# and the two non-characters XML forbids.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape could not decode
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """`text` with every control character (newlines included) escaped visibly."""
    return _UNSAFE.sub(_escape, text)


def escape_line(data: bytes | str) -> str:
    """One line of outside output (bytes are decoded as UTF-8, bad bytes kept as escapes),
    safe for a terminal or XML."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    return escape_text(text.rstrip("\r\n"))
