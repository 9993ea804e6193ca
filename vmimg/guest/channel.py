"""The exec channel: frames between `vmimg exec` and the agent's exec server, over the
virtio-serial port named `vmimg.exec` (docs/agent.md, "Exec channel"; agent/src/exec.h).

A frame is a type byte, a big-endian 32-bit payload length and the payload. One session per
connection: the host sends an exec frame (a run config with the command), then stdin,
signal and window-size frames; the guest answers with stdout and stderr frames and ends with
the exit frame, or with an error frame when the host broke the protocol.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmimg.errors import AgentError

EXEC_PORT_NAME = "vmimg.exec"
HEADER = struct.Struct(">cI")
MAX_FRAME = 1 << 20
# host -> guest. Every connection opens with HELLO: wherever it appears in the stream, the
# agent drops what came before it and ends the session running, since the host that started
# that session is gone (perhaps mid-frame, perhaps too quickly for the port to look closed).
HELLO_PAYLOAD = b"vmimg-exec-1"
EXEC = b"X"
STDIN = b"I"  # empty: end of input
SIGNAL = b"K"  # one byte: a signal number
WINSIZE = b"W"  # rows, columns: big-endian 16 bits each
# guest -> host
STDOUT = b"O"
STDERR = b"E"
EXIT = b"Q"  # the exit code, big-endian 32 bits
ERROR = b"F"  # a protocol error, as text
GUEST_TYPES = frozenset([STDOUT, STDERR, EXIT, ERROR])
EXIT_CODE = struct.Struct(">I")
WINDOW = struct.Struct(">HH")


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise AgentError(f"an exec frame holds at most {MAX_FRAME} bytes")
    return HEADER.pack(kind, len(payload)) + payload


HELLO = frame(b"H", HELLO_PAYLOAD)


def signal_frame(number: int) -> bytes:
    return frame(SIGNAL, bytes([number]))


def winsize_frame(rows: int, cols: int) -> bytes:
    return frame(WINSIZE, WINDOW.pack(rows, cols))


@dataclass(frozen=True)
class Frame:
    kind: bytes
    payload: bytes

    @property
    def exit_code(self) -> int:
        code: int = EXIT_CODE.unpack(self.payload)[0]
        return code


class FrameReader:
    """Frames from the guest out of a byte stream fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buf)
            if kind not in GUEST_TYPES or length > MAX_FRAME:
                raise AgentError(f"the guest sent a bad exec frame ({kind!r}, {length} bytes)")
            if kind == EXIT and length != EXIT_CODE.size:
                raise AgentError("the guest sent a bad exit frame")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(Frame(kind, self._buf[HEADER.size : end]))
            self._buf = self._buf[end:]
        return out
