"""`vmimg inspect`: an image, a bundle directory or a pushed bundle."""

from __future__ import annotations

import json
from typing import Any

import click

from vmimg.artifact.inspect import BundleInfo, describe_bundle, open_source
from vmimg.cli.options import RegistryFlags, cache_param, run, source_options, source_params
from vmimg.image.cache import Cache
from vmimg.image.inspect import describe, raw_manifest
from vmimg.safetext import escape_text


@click.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--raw", is_flag=True, help="Print the manifest (a bundle directory: vm.json) as is.")
@source_params
@cache_param
def inspect(
    source: str,
    as_json: bool,
    raw: bool,
    platform: str,
    registry: RegistryFlags,
    cache_dir: str | None,
) -> None:
    """Show an image's digest, platform, config and layers, or a bundle's source, kernel,
    root file system, workload and build key.

    SOURCE is an image (as for rootfs), a bundle directory, or the registry reference of
    a pushed bundle.
    """

    def go() -> None:
        sopts = source_options(platform, registry, [source])
        cache = Cache.open(cache_dir)
        found = open_source(source, sopts, cache)
        if isinstance(found, BundleInfo):
            if raw:
                click.echo(found.raw.decode("utf-8", "replace"), nl=False)
            elif as_json:
                click.echo(json.dumps(describe_bundle(found), indent=2))
            else:
                click.echo(render_bundle(describe_bundle(found)))
            return
        with found as image:
            if raw:
                click.echo(raw_manifest(image).decode("utf-8", "replace"), nl=False)
                return
            info = describe(image)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        click.echo(f"Image:      {info['name']}")
        click.echo(f"Digest:     {info['digest']}")
        click.echo(f"Platform:   {info['platform']}")
        cfg = info["config"]
        for key in ("Entrypoint", "Cmd", "WorkingDir", "User"):
            click.echo(f"{key + ':':<12}{json.dumps(cfg.get(key))}")
        click.echo(f"Env:        {json.dumps(cfg.get('Env') or [])}")
        click.echo(f"Layers:     {len(info['layers'])}")
        for layer in info["layers"]:
            digest = layer["digest"] or layer["diff_id"]
            click.echo(f"  {digest}  {layer['size']:>12}  {layer['mediaType']}")

    run(as_json, go)


def render_bundle(info: dict[str, Any]) -> str:
    """`vmimg inspect BUNDLE` as text; vm.json's strings escaped (they are the maker's)."""

    def text(value: Any) -> str:
        return escape_text(str(value))

    src, kern, root, work = info["source"], info["kernel"], info["rootfs"], info["workload"]
    size = f"{root['size'] / (1 << 20):.1f} MiB" if root["size"] is not None else "?"
    supplied = ", user-supplied" if kern["user_supplied"] else ""
    lines = [
        f"Bundle:     {text(info['bundle'])}",
        f"Digest:     {info['digest']}",
        f"Source:     {text(src['reference'])} ({text(src['digest'])})",
        f"Platform:   {text(info['platform'])}",
        f"Kernel:     {text(kern['version'])} (key {text(kern['key'])}{supplied})",
        f"Root fs:    {root['type']}, {size} ({root['file']}, "
        f"{'read-only' if root['read_only'] else 'read-write'})",
        f"Init:       {info['init']}",
    ]
    if work:
        lines += [
            f"Workload:   {text(json.dumps(work['argv']))}",
            f"Env:        {text(json.dumps(work['env']))}",
            f"WorkingDir: {text(work['cwd'])}  User: {work['uid']}:{work['gid']}",
        ]
    lines += [
        f"Resources:  {info['vcpus']} vCPU, {info['memory_mib']} MiB",
        f"Build key:  {info['build_key'] or '-'}",
    ]
    return "\n".join(lines)
