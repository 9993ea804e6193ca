"""`vmimg kernel`: build, list and show the cached guest kernels.

Only option parsing and rendering live here; the work is in vmimg.guest.kernel.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vmimg.cli.options import cache_param
from vmimg.errors import VmimgError
from vmimg.guest import kernel as klib
from vmimg.safetext import escape_text

F = TypeVar("F", bound=Callable[..., Any])
SPINNER = "|/-\\"
REDRAW_SECONDS = 0.1
MIB = 1 << 20


def _report_errors(fn: F) -> F:
    """Turn a VmimgError into one line on stderr (plus a build log's tail) and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except klib.KernelBuildError as e:
            click.echo("\n".join(e.log_tail), err=True)
            click.echo(f"vmimg: error: {e}", err=True)
            sys.exit(e.exit_code)
        except VmimgError as e:
            click.echo(f"vmimg: error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper  # type: ignore[return-value]


class _Spinner:
    """One status line, redrawn in place: elapsed time and make's latest line."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.turn = 0
        self.last = 0.0

    def __call__(self, elapsed: float, line: str) -> None:
        now = time.monotonic()
        if now - self.last < REDRAW_SECONDS:
            return
        self.last = now
        self.turn += 1
        width = shutil.get_terminal_size().columns - 1
        minutes, seconds = divmod(int(elapsed), 60)
        text = f"{SPINNER[self.turn % len(SPINNER)]} {self.label} {minutes}:{seconds:02d} {line}"
        sys.stderr.write("\r" + text[:width].ljust(width))
        sys.stderr.flush()

    def done(self) -> None:
        if self.turn:
            sys.stderr.write("\r" + " " * (shutil.get_terminal_size().columns - 1) + "\r")
            sys.stderr.flush()


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


@click.group("kernel")
def kernel() -> None:
    """Build and inspect vmimg's guest kernels."""


@kernel.command("build")
@click.option(
    "--source",
    type=click.Path(exists=True),
    default=None,
    help="Kernel source tarball or directory (default: the one kernels/kernel.toml pins).",
)
@click.option("--arch", type=click.Choice(sorted(klib.ARCHES)), default="x86_64", show_default=True)
@click.option("--debug", is_flag=True, help="Add kernels/debug.config (symbols, SysRq).")
@click.option(
    "--jobs", "-j", type=click.IntRange(min=1), default=None, help="make -j (default: CPUs)."
)
@cache_param
@_report_errors
def build_cmd(
    source: str | None, arch: str, debug: bool, jobs: int | None, cache_dir: str | None
) -> None:
    """Build the guest kernel, or find it in the cache."""
    spinner = _Spinner(f"building kernel ({arch})") if sys.stderr.isatty() else None
    try:
        info = klib.build_kernel(
            source=source, arch=arch, debug=debug, jobs=jobs, progress=spinner, cache_dir=cache_dir
        )
    finally:
        if spinner is not None:
            spinner.done()
    meta = info.metadata
    click.echo(f"{info.key}  {info.version}  {info.arch}  {info.image}")
    click.echo(f"  built in {meta['build_seconds']} s at {meta['built_at']}")


@kernel.command("list")
@cache_param
@_report_errors
def list_cmd(cache_dir: str | None) -> None:
    """The cached kernels, newest first: built here, and pulled from registries."""
    kernels = klib.list_kernels(cache_dir, pulled=True)
    if not kernels:
        click.echo("no kernels in the cache")
        return
    click.echo(f"{'KEY':<16}  {'VERSION':<10}  {'ARCH':<7}  {'IMAGE SIZE':>10}  BUILT")
    for k in kernels:
        size = k.metadata["files"][k.metadata["boot_image"]]["size"]
        debug = "  debug" if k.metadata.get("debug") else ""
        origin = f"  pulled, at {k.directory}" if k.directory.parent.name == klib.PULLED_DIR else ""
        built = escape_text(str(k.metadata.get("built_at", "")))[:40]
        click.echo(
            f"{k.key:<16}  {escape_text(k.version)[:20]:<10}  {k.arch:<7}  {_size(size):>10}  "
            f"{built}{debug}{origin}"
        )


@kernel.command("show")
@click.argument("key", required=False)
@cache_param
@_report_errors
def show_cmd(key: str | None, cache_dir: str | None) -> None:
    """A cached kernel's metadata (KEY or a prefix of it; default the newest)."""
    info = klib.find_kernel(key, cache_dir)
    click.echo(json.dumps({**info.metadata, "directory": str(info.directory)}, indent=2))
