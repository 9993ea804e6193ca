"""Pieces every `vmimg` command module shares: common options, error rendering, sizes.

vmimg.cli.main, vmimg.cli.kernel and vmimg.cli.artifact all import from here (and not
from each other), so that any of them can be imported first.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from vmimg.errors import VmimgError
from vmimg.image.cache import DEFAULT_MAX_UNPACKED_SIZE, format_size
from vmimg.image.oci import parse_platform
from vmimg.image.sources import SourceOptions

EXIT_INTERRUPTED = 130
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes (binary units)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise click.BadParameter(f"not a size: {text!r} (examples: 512M, 2G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except click.BadParameter as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def fail(err: VmimgError, as_json: bool) -> NoReturn:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": err.exit_code}))
    else:
        click.echo(f"vmimg: error: {message}", err=True)
    sys.exit(err.exit_code)


def run(as_json: bool, fn: Callable[[], Any]) -> Any:
    """Call `fn`, turning our errors and Ctrl-C into one line and an exit code."""
    try:
        return fn()
    except VmimgError as e:
        fail(e, as_json)
    except KeyboardInterrupt:
        click.echo("vmimg: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def source_options(platform: str, insecure: tuple[str, ...], ca_cert: str | None) -> SourceOptions:
    return SourceOptions(
        platform=parse_platform(platform), insecure_hosts=insecure, ca_cert=ca_cert
    )


def progress_printer(label: str) -> Callable[[int], None] | None:
    """A byte counter on stderr when it is a terminal; None otherwise."""
    if not sys.stderr.isatty():
        return None
    total = 0

    def report(n: int) -> None:
        nonlocal total
        total += n
        click.echo(f"\r{label}: {total / (1 << 20):8.1f} MiB", err=True, nl=False)

    return report


def registry_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach a registry: --insecure-registry and --ca-cert."""
    f = click.option(
        "--ca-cert", type=click.Path(exists=True, dir_okay=False), help="CA bundle for TLS."
    )(f)
    f = click.option(
        "--insecure-registry",
        "insecure",
        multiple=True,
        metavar="HOST",
        help="Allow plain http to HOST (loopback hosts always may).",
    )(f)
    return f


def source_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command that reads an image shares."""
    f = registry_params(f)
    f = click.option(
        "--platform",
        default="linux/amd64",
        show_default=True,
        help="Platform to pick from an image index.",
    )(f)
    return f


def cache_param(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache",
        "cache_dir",
        envvar="VMIMG_CACHE",
        type=click.Path(file_okay=False),
        help="Cache directory (default $XDG_CACHE_HOME/vmimg; env VMIMG_CACHE).",
    )(f)


def unpack_param(f: Callable[..., Any]) -> Callable[..., Any]:
    """--max-unpacked-size, for the commands that unpack an image's layers."""
    return click.option(
        "--max-unpacked-size",
        type=SIZE,
        envvar="VMIMG_MAX_UNPACKED_SIZE",
        default=format_size(DEFAULT_MAX_UNPACKED_SIZE),  # "32 GiB", which SIZE parses
        show_default=True,
        metavar="SIZE",
        help="Refuse an image whose layers expand past SIZE in all (512M, 4G; "
        "env VMIMG_MAX_UNPACKED_SIZE).",
    )(f)


def vm_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the commands that boot a VM (verify, run)."""
    f = click.option(
        "--memory",
        type=click.IntRange(32, 1 << 20),
        default=None,
        help="Memory in MiB (default vm.json).",
    )(f)
    f = click.option(
        "--cpus", type=click.IntRange(1, 256), default=None, help="vCPUs (default vm.json)."
    )(f)
    f = click.option(
        "--accel",
        type=click.Choice(["kvm", "tcg"]),
        default=None,
        help="Force an accelerator (default: KVM if a test boot works, else TCG).",
    )(f)
    return f


bundle_output = click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Bundle directory to write (replaced if it is a bundle).",
)
