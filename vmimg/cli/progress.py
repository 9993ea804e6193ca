"""What a command says while it works, fitted to where stderr goes; and -q/-v.

The library reports work as phases: `phase(name, total, unit)` opens one and returns a
counter the work calls with each amount done (bytes, or bundles). This module renders them:

- at a terminal, one status line redrawn in place (spinner, done/total, percent, rate,
  elapsed); when a phase ends its line stays, with the total and the time it took;
- elsewhere (CI logs, pipes), one line when a phase starts and one every
  HEARTBEAT_SECONDS while it lasts, so a long step never looks hung;
- with -q, nothing.

-v also logs each HTTP request vmimg makes (method, URL without its query, status): the
requests library's own log records, which never hold headers, so never credentials.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

import click

HEARTBEAT_SECONDS = 30.0  # a line at least this often without a terminal
REDRAW_SECONDS = 0.1  # the terminal status line's refresh
SPINNER = "|/-\\"
MIB = 1 << 20
BYTES = "B"
PREFIX = "vmimg: "
# urllib3's request log record: scheme, host, port, method, url, http version, status, length.
_URLLIB3_LOGGER = "urllib3.connectionpool"
_REQUEST_RECORD_ARGS = 8


@dataclass
class Verbosity:
    """-q and -v, set by the options of whichever command runs (one per process)."""

    quiet: bool = False
    verbose: bool = False


VERBOSITY = Verbosity()


def _amount(n: float, unit: str) -> str:
    if unit == BYTES:
        return f"{n / MIB:.1f} MiB"
    return f"{int(n)} {unit}".rstrip()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


@dataclass
class _Phase:
    name: str
    total: int | None
    unit: str
    start: float
    done: int = 0
    said: float = 0.0  # when the last line was written for it (no terminal)
    detail: str = ""  # what the work said last (make's latest line), terminal only

    def status(self, now: float) -> str:
        """name, done/total (percent), rate, elapsed: what is known of it."""
        elapsed = now - self.start
        parts = [self.name]
        if self.total:
            pct = min(100, self.done * 100 // self.total)
            shown = min(self.done, self.total)
            if self.unit == BYTES:
                parts.append(f"{_amount(shown, BYTES)} of {_amount(self.total, BYTES)} ({pct}%)")
            else:
                parts.append(f"{shown} of {_amount(self.total, self.unit)}")
        elif self.done:
            parts.append(_amount(self.done, self.unit))
        if self.done and elapsed > 0 and self.unit == BYTES:
            parts.append(f"{self.done / MIB / elapsed:.1f} MiB/s")
        parts.append(_clock(elapsed))
        return ", ".join(parts)


class Progress:
    """Renders phases on `stream` (stderr); use as a context manager so the last phase
    ends and the status line is cleared before results are printed."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        tty: bool | None = None,
        heartbeat: float = HEARTBEAT_SECONDS,
        notes: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.heartbeat = heartbeat
        self.notes = dict(notes or {})  # said once, when a phase of that name first starts
        self._lock = threading.Lock()
        self._current: _Phase | None = None
        self._turn = 0
        self._drawn = False  # a status line is on the terminal, to be cleared before text
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the library calls ---------------------------------------------------------

    def phase(
        self, name: str, total: int | None = None, unit: str = BYTES
    ) -> Callable[[int], None]:
        """Start a phase (ending the one before); returns its counter."""
        if not self.enabled:
            return _ignore
        now = time.monotonic()
        phase = _Phase(name, total, unit, now, said=now)
        with self._lock:
            self._end_locked(now)
            note = self.notes.pop(name, None)
            if note:
                self._line(note)
            self._current = phase
            if not self.tty:
                what = f" ({_amount(total, unit)})" if total else ""
                self._line(f"{PREFIX}{name}{what}")
        self._start_thread()

        def tick(n: int) -> None:
            with self._lock:  # layers are fetched by several threads at once
                phase.done += n

        return tick

    def detail(self, text: str) -> None:
        """Show `text` after the current phase's status (at a terminal)."""
        with self._lock:
            if self._current is not None:
                self._current.detail = text

    def note(self, text: str) -> None:
        """A line of its own (the status line, if any, is redrawn below it)."""
        if self.enabled:
            with self._lock:
                self._clear_locked()
                self._line(text)

    def close(self, failed: bool = False) -> None:
        """End the last phase: "done" at a terminal, or, when the work `failed`, only the
        status line cleared (the error says the rest)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if failed:
                self._clear_locked()
                self._current = None
            self._end_locked(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc is not None)

    # -- rendering ------------------------------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = REDRAW_SECONDS if self.tty else min(1.0, self.heartbeat)
        while not self._stop.wait(interval):
            with self._lock:
                self._refresh_locked(time.monotonic())

    def _refresh_locked(self, now: float) -> None:
        phase = self._current
        if phase is None:
            return
        if self.tty:
            self._turn += 1
            spin = SPINNER[self._turn % len(SPINNER)]
            self._draw(f"{spin} {phase.status(now)} {phase.detail}".rstrip())
        elif now - phase.said >= self.heartbeat:
            phase.said = now
            self._line(f"{PREFIX}{phase.status(now)}")

    def _end_locked(self, now: float) -> None:
        phase, self._current = self._current, None
        if phase is None:
            return
        if self.tty:
            self._clear_locked()
            self._line(f"{phase.status(now)}, done")

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size().columns - 1)

    def _draw(self, text: str) -> None:
        width = self._width()
        self.stream.write("\r" + text[:width].ljust(width))
        self.stream.flush()
        self._drawn = True

    def _clear_locked(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * self._width() + "\r")
            self._drawn = False

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _ignore(_n: int) -> None:
    pass


def progress(notes: Mapping[str, str] | None = None) -> Progress:
    """The Progress of this command: on stderr, silent with -q."""
    return Progress(enabled=not VERBOSITY.quiet, notes=notes)


# -- -q / -v --------------------------------------------------------------------------------


class _RequestLog(logging.Handler):
    """urllib3's "GET /v2/... 200" records as one line each, the query cut off (it may
    carry a signed URL's signature); urllib3 never logs headers."""

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if not VERBOSITY.verbose or not isinstance(args, tuple):
            return
        if len(args) != _REQUEST_RECORD_ARGS:
            return
        scheme, host, port, method, url, _version, status, _length = args
        path = urllib.parse.urlsplit(str(url)).path
        click.echo(f"{PREFIX}{method} {scheme}://{host}:{port}{path} -> {status}", err=True)


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    # The outermost command's callback runs first on every invocation: it starts afresh
    # (tests invoke commands in-process); a subcommand's -q adds to it.
    VERBOSITY.quiet = value or (ctx.parent is not None and VERBOSITY.quiet)


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    VERBOSITY.verbose = value or (ctx.parent is not None and VERBOSITY.verbose)
    log = logging.getLogger(_URLLIB3_LOGGER)
    if not any(isinstance(h, _RequestLog) for h in log.handlers):
        log.addHandler(_RequestLog())
    log.setLevel(logging.DEBUG if VERBOSITY.verbose else logging.WARNING)
    log.propagate = not VERBOSITY.verbose


QUIET_OPTION: dict[str, Any] = {
    "is_flag": True,
    "expose_value": False,
    "callback": _set_quiet,
    "help": "No progress or notices on stderr (results and errors still print).",
}
VERBOSE_OPTION: dict[str, Any] = {
    "is_flag": True,
    "expose_value": False,
    "callback": _set_verbose,
    "help": "Also log each registry request; `run`: the kernel's and agent's console lines.",
}


def add_verbosity_options(command: click.Command) -> None:
    """-q/--quiet and -v/--verbose on `command` and every command under it."""
    names = {name for p in command.params for name in (*p.opts, *p.secondary_opts)}
    if "--quiet" not in names:
        short = [] if "-q" in names else ["-q"]
        command.params.append(click.Option([*short, "--quiet"], **QUIET_OPTION))
    if "--verbose" not in names:
        # `vmimg run -v` is docker's --volume: there, only --verbose (or `vmimg -v run`).
        short = [] if "-v" in names else ["-v"]
        command.params.append(click.Option([*short, "--verbose"], **VERBOSE_OPTION))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_verbosity_options(sub)
