"""The protocol between the host and the agent: what the host tells the guest on the
kernel command line (`vmimg.*` parameters), and what the agent tells the host back
(marker lines on the console, docs/agent.md). boot/ reads guests only through this.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from vmimg.errors import AgentError

MARKER_PREFIX = "@@vmimg@@"
# What the agent understands, recorded in vm.json's init.protocol: 1 the kernel parameters
# and markers; 2 also the run disk (guest/runconfig.py) and the exec channel
# (guest/channel.py).
AGENT_PROTOCOL = 2
RUN_CONFIG_PROTOCOL = 2
VSOCK_REPORT_PORT = 7301  # the agent sends its exit line to host CID 2 on this port
INIT_PATH = "/.vmimg/init"


# --- escaping ---------------------------------------------------------------

# What escape() rewrites; a regex keeps the common case (plain paths, all the bytes of a
# manifest of a deep tree) at C speed.
_NOT_PLAIN = re.compile(rb"[^\x21-\x24\x26-\x7e]")


def escape(value: bytes) -> bytes:
    """Percent-escape every byte outside 0x21..0x7e, and "%" itself."""
    if b"\0" in value:
        raise AgentError(f"NUL byte in agent value {value!r}")
    return _NOT_PLAIN.sub(lambda m: b"%%%02X" % m[0][0], value)


def unescape(value: bytes) -> bytes:
    """Undo `escape`; raises AgentError on a malformed escape."""
    if b"%" not in value and b"\0" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        b = value[i]
        if b != ord("%"):
            out.append(b)
            i += 1
            continue
        digits = value[i + 1 : i + 3]
        if len(digits) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in digits):
            raise AgentError(f"bad %-escape in {value!r}")
        out.append(int(digits, 16))
        i += 3
    if 0 in out:
        raise AgentError(f"escaped NUL in {value!r}")
    return bytes(out)


@dataclass(frozen=True)
class BootOptions:
    """The vmimg.* kernel parameters the agent reads (docs/agent.md)."""

    mode: str = "run"  # or "verify"
    deep: bool = False  # verify mode: hash file content too
    ip: str | None = None  # "10.0.2.15/24" configures eth0
    gw: str | None = None
    dns: str | None = None
    hostname: str | None = None
    smoke: str | None = None  # verify mode: shell command to run after the check
    cmd: str | None = None  # run mode: shell command instead of the config's argv


QEMU_USER_NET = BootOptions(ip="10.0.2.15/24", gw="10.0.2.2", dns="10.0.2.3")


def _quote_param(key: str, value: str) -> str:
    if '"' in value or "\n" in value:
        raise AgentError(f"kernel parameter {key} cannot hold quotes or newlines: {value!r}")
    return f'{key}="{value}"' if re.search(r"\s", value) else f"{key}={value}"


def kernel_args(initramfs: bool = False, options: BootOptions | None = None) -> list[str]:
    """Kernel command line arguments that boot the agent as init."""
    args = [f"init={INIT_PATH}"]
    if initramfs:
        args.append(f"rdinit={INIT_PATH}")
    o = options or BootOptions()
    if o.mode != "run":
        args.append(f"vmimg.mode={o.mode}")
    if o.deep:
        args.append("vmimg.deep=1")
    for key in ("ip", "gw", "dns", "hostname", "smoke", "cmd"):
        value = getattr(o, key)
        if value is not None:
            args.append(_quote_param(f"vmimg.{key}", value))
    return args


# --- markers --------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """One "@@vmimg@@ <event> key=value ..." line from the agent."""

    event: str
    fields: dict[str, str]

    def number(self, key: str) -> int:
        return int(self.fields[key])


def parse_markers(console: str | bytes) -> list[Marker]:
    """Every marker line in console output (which may have \\r\\n endings and
    kernel messages around)."""
    text = console.decode("utf-8", "replace") if isinstance(console, bytes) else console
    markers = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith(MARKER_PREFIX + " "):
            continue
        words = line.split(" ")[1:]
        if not words:
            continue
        fields = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if sep:
                try:
                    fields[key] = os.fsdecode(unescape(value.encode()))
                except AgentError:  # garbled by interleaved kernel output
                    fields[key] = value
        markers.append(Marker(words[0], fields))
    return markers
