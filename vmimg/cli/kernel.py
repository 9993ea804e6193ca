"""`vmimg kernel`: build, list and show the cached guest kernels.

Only option parsing and rendering live here; the work is in vmimg.guest.kernel.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vmimg.arch import ARCHES, Arch
from vmimg.cli.artifact import kernel_pull, kernel_push
from vmimg.cli.options import cache_param, os_error_message
from vmimg.cli.progress import add_verbosity_options, progress
from vmimg.errors import VmimgError
from vmimg.guest import kernel as klib
from vmimg.safetext import escape_text

F = TypeVar("F", bound=Callable[..., Any])
MIB = 1 << 20
# Said when `vmimg build` (or `vmimg kernel build`) really starts building the kernel.
FIRST_KERNEL_NOTE = (
    "vmimg: first use: vmimg builds the guest kernel once (then it is cached); that takes "
    "minutes (about 3 on 2 idle cores). In CI, skip it: `vmimg kernel pull REF` a kernel "
    "pushed with `vmimg kernel push`, then `vmimg build SOURCE -o DIR --kernel PATH` with "
    "the path it prints."
)


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
        except OSError as e:  # a missing tool (tar, make), a path nothing checked
            click.echo(f"vmimg: error: {os_error_message(e)}", err=True)
            sys.exit(VmimgError.exit_code)

    return wrapper  # type: ignore[return-value]


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
@click.option(
    "--arch", type=click.Choice(sorted(a.value for a in ARCHES)), default=Arch.X86_64.value,
    show_default=True,
)  # fmt: skip
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
    with progress({klib.KERNEL_BUILD_PHASE: FIRST_KERNEL_NOTE}) as shown:
        building: list[Callable[[int], None]] = []

        def on_output(_elapsed: float, line: str) -> None:
            if not building:  # the first call: a build really starts
                building.append(shown.phase(klib.KERNEL_BUILD_PHASE, None, ""))
            shown.detail(escape_text(line))

        info = klib.build_kernel(
            source=source, arch=arch, debug=debug, jobs=jobs, progress=on_output,
            cache_dir=cache_dir,
        )  # fmt: skip
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


kernel.add_command(kernel_push)
kernel.add_command(kernel_pull)
add_verbosity_options(kernel)  # -q/-v, also when imported without vmimg.cli.main
