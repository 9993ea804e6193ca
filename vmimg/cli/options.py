"""Pieces every `vmimg` command module shares: common options, error rendering, sizes.

Every command module imports from here; vmimg.cli.main imports only this, progress and
its COMMANDS table, so that `vmimg X` loads X's module and what it needs, nothing more.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from vmimg.arch import ARCHES, OCI_ARCHITECTURES, Arch
from vmimg.errors import EXIT_INTERRUPTED, ImageRefError, PlatformError, UsageError, VmimgError
from vmimg.image.cache import DEFAULT_MAX_UNPACKED_SIZE
from vmimg.image.credentials import Credentials, api_host
from vmimg.image.fsutil import format_size
from vmimg.image.oci import DEFAULT_PLATFORM, parse_platform
from vmimg.image.reference import parse_reference
from vmimg.image.sources import SourceOptions

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


def os_error_message(e: OSError) -> str:
    """An OSError as one line naming the path(s): `PATH: Permission denied`."""
    what = e.strerror or str(e) or type(e).__name__
    paths = [os.fsdecode(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {what}" if paths else what


def run(as_json: bool, fn: Callable[[], Any]) -> Any:
    """Call `fn`, turning our errors, any OSError and Ctrl-C into one line and an exit code."""
    try:
        return fn()
    except VmimgError as e:
        fail(e, as_json)
    except OSError as e:  # the safety net: a path nothing checked before (exit 1)
        fail(VmimgError(os_error_message(e)), as_json)
    except KeyboardInterrupt:
        click.echo("vmimg: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def check_output_file(path: str, option: str) -> None:
    """Refuse, before any work, an output file that could not be written: its directory
    missing or not writable, or a directory in its place."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory")
    try:  # access() cannot tell a read-only mount, and says yes to root: try it
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".vmimg-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write in {parent}: {e.strerror}") from None


class _StderrLog(logging.Handler):
    """vmimg's log lines (retries; with -v every registry request) as `vmimg: ...` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"vmimg: {record.getMessage()}", err=True)


def setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("vmimg")
    if not any(isinstance(h, _StderrLog) for h in logger.handlers):
        logger.addHandler(_StderrLog())
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False


@dataclass(frozen=True)
class RegistryFlags:
    """How the user said to reach registries: the options of `registry_params`."""

    insecure: tuple[str, ...] = ()
    ca_cert: str | None = None
    tls_verify: bool = True
    authfile: str | None = None
    creds: str | None = field(default=None, repr=False)


def source_options(
    platform: str, registry: RegistryFlags, refs: Iterable[str] = ()
) -> SourceOptions:
    """SourceOptions from the command line; `refs` are the image or artifact references
    the command names, so that --creds goes to their registry and no other."""
    creds_host = _creds_host(refs) if registry.creds is not None else None
    creds = None
    if registry.creds is not None and creds_host is not None:
        creds = _parse_creds(registry.creds, creds_host)
    return SourceOptions(
        platform=parse_platform(platform),
        insecure_hosts=registry.insecure,
        ca_cert=registry.ca_cert,
        tls_verify=registry.tls_verify,
        authfile=registry.authfile,
        creds=creds,
        creds_host=creds_host,
    )


def _creds_host(refs: Iterable[str]) -> str | None:
    """The one registry host among `refs` (None if they name none)."""
    hosts = set()
    for text in refs:
        try:
            ref = parse_reference(text)
        except ImageRefError:
            continue  # the command reports it
        if ref.transport == "docker" and ref.registry is not None:
            hosts.add(api_host(ref.registry.registry))
    if len(hosts) > 1:
        raise UsageError(
            f"--creds is for one registry, but this command talks to {' and '.join(sorted(hosts))}:"
            " keep the credentials in an auth file instead (--authfile)"
        )
    return hosts.pop() if hosts else None


def _parse_creds(text: str, host: str) -> Credentials:
    """--creds USER[:PASSWORD]; without the password, ask for it at a terminal."""
    user, sep, password = text.partition(":")
    if not user:
        raise UsageError("--creds takes USER[:PASSWORD]")
    if not sep:
        if not sys.stdin.isatty():
            raise UsageError(
                "--creds USER without a password, and no terminal to ask it on: "
                "use --creds USER:PASSWORD or an auth file"
            )
        password = click.prompt(f"Password for {user} at {host}", hide_input=True, err=True)
    return Credentials(user, password)


# Commands whose --platform must be one vmimg boots; the others read any image.
BOOTING_COMMANDS = frozenset({"build", "verify", "pull"})
MULTI_PLATFORM_COMMANDS = frozenset({"build"})


def check_platform(ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """--platform OS/ARCH[/VARIANT] (build: a comma-separated list), with an architecture
    that exists (and, for the commands that boot, that vmimg boots)."""
    items = [p.strip() for p in value.split(",") if p.strip()]
    name = ctx.command.name or ""
    if not items:
        raise click.BadParameter("names no platform")
    if len(items) > 1 and name not in MULTI_PLATFORM_COMMANDS:
        raise click.BadParameter("one platform at a time (build takes several)")
    for item in items:
        try:
            arch = parse_platform(item).architecture
        except PlatformError as e:
            raise click.BadParameter(str(e)) from None
        if name in BOOTING_COMMANDS and Arch.parse(arch) is None:
            booted = ", ".join(f"linux/{a.oci}" for a in ARCHES)
            raise click.BadParameter(f"{item!r}: vmimg boots {booted}")
        if arch not in OCI_ARCHITECTURES:
            raise click.BadParameter(
                f"{item!r}: unknown architecture {arch!r} (known: {', '.join(OCI_ARCHITECTURES)})"
            )
    return value


def registry_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach a registry, as skopeo spells it: --authfile, --creds, --tls-verify,
    --insecure-registry and --ca-cert. The command gets them as one `registry` argument
    (a RegistryFlags)."""

    @functools.wraps(f)
    def command(
        *args: Any,
        insecure: tuple[str, ...],
        ca_cert: str | None,
        tls_verify: bool,
        authfile: str | None,
        creds: str | None,
        **kwargs: Any,
    ) -> Any:
        flags = RegistryFlags(insecure, ca_cert, tls_verify, authfile, creds)
        return f(*args, registry=flags, **kwargs)

    options = [
        click.option(
            "--insecure-registry",
            "insecure",
            multiple=True,
            metavar="HOST",
            help="Allow plain http to HOST (loopback hosts always may).",
        ),
        click.option(
            "--ca-cert", type=click.Path(exists=True, dir_okay=False), help="CA bundle for TLS."
        ),
        click.option(
            "--tls-verify",
            type=click.BOOL,
            default=True,
            show_default=True,
            metavar="BOOL",
            help="--tls-verify=false: allow plain http and skip certificate checks.",
        ),
        click.option(
            "--authfile",
            type=click.Path(exists=True, dir_okay=False),
            help="Registry credentials file (default: $REGISTRY_AUTH_FILE, then the "
            "podman/skopeo and Docker files).",
        ),
        click.option(
            "--creds",
            metavar="USER[:PASS]",
            help="Credentials for the registry the command names (asks for PASS at a terminal).",
        ),
    ]
    wrapped: Callable[..., Any] = command
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped


def source_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command that reads an image shares."""
    f = registry_params(f)
    f = click.option(
        "--platform",
        default=DEFAULT_PLATFORM,
        show_default=True,
        callback=check_platform,
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


def split_words(text: str | None, option: str) -> tuple[str, ...] | None:
    """--entrypoint/--cmd: a JSON list, or words split the way a shell would ("" empties
    it); None when the option was not given."""
    if text is None:
        return None
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise UsageError(f"{option}: not a JSON list: {text}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{option}: not a JSON list of strings: {text}")
        return tuple(value)
    return tuple(shlex.split(text))
