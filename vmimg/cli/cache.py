"""`vmimg cache ls|prune`."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from vmimg.cli.options import cache_param, run
from vmimg.image.cache import Cache
from vmimg.image.fsutil import format_size
from vmimg.image.prune import prune


@click.group()
def cache() -> None:
    """Look at and clean the cache."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@cache_param
def cache_ls(as_json: bool, cache_dir: str | None) -> None:
    """Show the cache directory and the bytes each area uses."""

    def go() -> None:
        c = Cache.open(cache_dir)
        usage = c.usage()
        if as_json:
            click.echo(json.dumps({"root": c.root, "bytes": usage}, indent=2))
            return
        click.echo(f"{c.root}")
        for area, n in usage.items():
            click.echo(f"  {area:<8} {n / (1 << 20):10.1f} MiB")

    run(as_json, go)


@cache.command("prune")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also remove blobs, layers, kernels and their sources, logs and unheld locks.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was freed as JSON.")
@cache_param
def cache_prune(everything: bool, as_json: bool, cache_dir: str | None) -> None:
    """Remove finished conversions and stale temporary files (with --all, everything).

    Work in progress of running vmimg processes, and entries they are reading, stay.
    """

    def go() -> None:
        c = Cache.open(cache_dir)
        freed = prune(c, everything)
        total = sum(f.bytes for f in freed.values())
        if as_json:
            areas = {a: asdict(f) for a, f in freed.items()}
            click.echo(json.dumps({"root": c.root, "bytes": total, "areas": areas}, indent=2))
            return
        click.echo(f"pruned {c.root}: freed {format_size(total)}")
        for area, f in freed.items():
            if f.entries or f.kept:
                kept = f", {f.kept} in use kept" if f.kept else ""
                click.echo(f"  {area:<8} {format_size(f.bytes):>10}  {f.entries} removed{kept}")

    run(as_json, go)
