"""`vmimg rootfs`: an image to one root file system image."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import click

from vmimg.cli.options import (
    SIZE,
    RegistryFlags,
    cache_param,
    check_output_file,
    run,
    source_options,
    source_params,
    unpack_param,
)
from vmimg.cli.progress import progress
from vmimg.cli.quick import HitRecord, default_cache_root, record_hit, result_line, stamp
from vmimg.errors import VmimgError
from vmimg.image.cache import Cache
from vmimg.image.reference import parse_reference
from vmimg.rootfs.convert import ConvertResult, convert
from vmimg.rootfs.writers import WriterOptions, get_format
from vmimg.rootfs.writers.options import CpioOptions, ErofsOptions, Ext4Options, TarOptions


@dataclass(frozen=True)
class WriterFlags:
    """The writers' options as given (`writer_params`); `writer_options` picks a format's."""

    compression: str = "gzip"
    size: int | None = None
    headroom: int | None = None
    inodes: int = 0
    no_journal: bool = False
    label: str = ""
    compress: str = "none"
    compress_level: int | None = None


def writer_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """The file system writers' options, shared by rootfs and build; the command gets them
    as one `writer` argument (a WriterFlags)."""

    @functools.wraps(f)
    def command(
        *args: Any,
        compression: str,
        size: int | None,
        headroom: int | None,
        inodes: int,
        no_journal: bool,
        label: str,
        compress: str,
        compress_level: int | None,
        **kwargs: Any,
    ) -> Any:
        flags = WriterFlags(
            compression, size, headroom, inodes, no_journal, label, compress, compress_level
        )
        return f(*args, writer=flags, **kwargs)

    for opt in reversed(
        [
            click.option(
                "--compression",
                type=click.Choice(["gzip", "zstd", "none"]),
                default="gzip",
                show_default=True,
                help="initramfs: compression of the cpio archive.",
            ),
            click.option("--size", type=SIZE, default=None, help="ext4: exact image size (2G)."),
            click.option("--headroom", type=SIZE, default=None, help="ext4: free space to add."),
            click.option("--inodes", type=int, default=0, help="ext4: extra inodes."),
            click.option("--no-journal", is_flag=True, help="ext4: no journal (read-only use)."),
            click.option("--label", default="", help="ext4/erofs: volume label."),
            click.option(
                "--compress",
                type=click.Choice(["none", "lz4", "lz4hc"]),
                default="none",
                show_default=True,
                help="erofs: data compression.",
            ),
            click.option(
                "--compress-level",
                type=click.IntRange(1, 12),
                default=None,
                help="erofs: lz4hc level.",
            ),
        ]
    ):
        command = opt(command)
    return command


@click.command()
@click.argument("source")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["tar", "initramfs", "ext4", "erofs"]),
    default="tar",
    show_default=True,
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
@writer_params
@click.option("--no-cache", is_flag=True, help="Convert again even if a finished result is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@unpack_param
@source_params
@cache_param
def rootfs(
    source: str,
    fmt: str,
    output: str,
    writer: WriterFlags,
    no_cache: bool,
    as_json: bool,
    max_unpacked_size: int,
    platform: str,
    registry: RegistryFlags,
    cache_dir: str | None,
) -> None:
    """Flatten SOURCE into one root file system image.

    SOURCE is docker://HOST/REPO:TAG (or HOST/REPO:TAG), oci:DIR[:TAG],
    oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], docker-daemon:NAME[:TAG],
    dir:DIR, or a local path (an OCI layout, a dir: image or an archive).
    """

    def go() -> None:
        check_output_file(output, "-o")
        options = writer_options(fmt, writer)
        cache = Cache.open(cache_dir, max_unpacked_size)
        deciding = source_stamps(source)
        with progress() as shown:
            result = convert(
                source,
                fmt,
                output,
                options,
                cache,
                source_options(platform, registry, [source]),
                use_cache=not no_cache,
                phases=shown.phase,
            )
        for w in result.warnings:
            click.echo(f"vmimg: warning: {w}", err=True)
        if as_json:
            click.echo(json.dumps(asdict(result), indent=2))
            return
        record = hit_record(result, deciding)
        state = (
            f"from cache ({result.handed_out})" if result.cached else f"in {result.seconds:.2f}s"
        )
        click.echo(result_line(result.output, result.size, record, state))
        # The next identical command line may be served without loading all this (cli/quick):
        # only in the default cache, with the source's files as they were before we began.
        if (
            not no_cache
            and cache.root == default_cache_root()
            and result.cache_entry is not None
            and deciding is not None
            and deciding == source_stamps(source)
        ):
            record_hit(sys.argv[1:], output, record)

    run(as_json, go)


def source_stamps(source: str) -> dict[str, list[int]] | None:
    """The stamps of the local files that decide what `source` names, or None when it
    has none (a registry, a daemon) or they cannot be read (open_image then says why)."""
    try:
        files = parse_reference(source).deciding_files()
        return None if files is None else {os.path.abspath(f): stamp(f) for f in files}
    except (VmimgError, OSError):
        return None


def hit_record(result: ConvertResult, stamps: dict[str, list[int]] | None) -> HitRecord:
    """What the fast path needs to answer this run's command line again (cli/quick)."""
    entry = result.cache_entry or ""
    return HitRecord(
        entry_dir=os.path.dirname(entry),
        file=os.path.basename(entry),
        linkable=get_format(result.format).read_only,
        stamps=stamps or {},
        format=result.format,
        image=result.image,
        digest=result.digest,
        platform=result.platform,
    )


def writer_options(fmt: str, flags: WriterFlags) -> WriterOptions:
    """The options object of the chosen writer."""
    if fmt == "tar":
        return TarOptions()
    if fmt == "initramfs":
        return CpioOptions(compression=flags.compression)
    if fmt == "ext4":
        ext4 = Ext4Options(
            size=flags.size, extra_inodes=flags.inodes, journal=not flags.no_journal,
            label=flags.label,
        )  # fmt: skip
        return ext4 if flags.headroom is None else replace(ext4, headroom=flags.headroom)
    return ErofsOptions(
        compress=flags.compress, compress_level=flags.compress_level, label=flags.label
    )
