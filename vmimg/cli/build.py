"""`vmimg build`: an image to a bundle (one platform or several, pushed or not)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from typing import Any

import click

from vmimg import pipeline
from vmimg.bundle.build import BuildOptions, check_destination
from vmimg.cli.kernel import FIRST_KERNEL_NOTE
from vmimg.cli.options import (
    RegistryFlags,
    bundle_output,
    cache_param,
    check_output_file,
    run,
    source_options,
    source_params,
    split_words,
    unpack_param,
)
from vmimg.cli.progress import progress
from vmimg.cli.rootfs import WriterFlags, writer_options, writer_params
from vmimg.errors import UsageError
from vmimg.guest.agent import ConfigOverrides
from vmimg.guest.kernel import KERNEL_BUILD_PHASE
from vmimg.image.cache import Cache
from vmimg.image.oci import parse_platform
from vmimg.image.sources import SourceOptions


def _build_platforms(
    source: str, output: str, options: BuildOptions, cache: Cache, platforms: list[str],
    sopts: SourceOptions, use_cache: bool, push_ref: str | None, remote_cache: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """`vmimg build --platform A,B`."""
    pipeline.check_platforms_options(remote_cache)
    with progress({KERNEL_BUILD_PHASE: FIRST_KERNEL_NOTE}) as shown:
        done = pipeline.build_platforms(
            source, output, options, cache,
            {p: replace(sopts, platform=parse_platform(p)) for p in platforms},
            use_cache=use_cache, push=push_ref, phases=shown.phase,
        )  # fmt: skip
    if as_json:
        click.echo(json.dumps({"bundles": [asdict(r) for r in done.bundles],
                               "pushed": done.pushed}, indent=2))  # fmt: skip
        return
    for r in done.bundles:
        state = f"from cache ({r.handed_out})" if r.cached else f"in {r.seconds:.2f}s"
        click.echo(f"{r.bundle}: {r.fs} bundle of {r.image} ({r.digest[:19]}, {r.platform}) "
                   f"{state}")  # fmt: skip
    if done.pushed:
        click.echo(f"pushed index to {done.pushed}")


def check_output_dir(path: str) -> None:
    """build --platform A,B writes DIR/ARCH: DIR must be a directory we may write in."""
    if not os.path.isdir(path):
        check_output_file(path, "-o")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"-o {path} is not writable")


def split_command(text: str | None, option: str) -> list[str] | None:
    """--entrypoint/--cmd as the list vm.json's overrides hold."""
    words = split_words(text, option)
    return None if words is None else list(words)


def check_env(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> Any:
    """-e K=V: a name, then '=' (the value may be empty)."""
    for v in values:
        name, sep, _value = v.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE")
    return values


@click.command()
@click.argument("source")
@bundle_output
@click.option(
    "--fs",
    type=click.Choice(["erofs", "ext4", "initramfs"]),
    default=None,
    help="Root file system (default erofs; ext4 with --writable-root).",
)
@click.option(
    "--writable-root", is_flag=True, help="A read-write ext4 root instead of erofs with an overlay."
)
@click.option(
    "--verity/--no-verity",
    default=None,
    help="Put a dm-verity tree over the root, so the guest kernel checks every block it reads "
    "(default: on for erofs; on for ext4 makes the root read-only).",
)
@click.option(
    "--kernel",
    "kernel_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Use this kernel (vmlinux, bzImage) instead of vmimg's tuned one.",
)
@click.option(
    "--init",
    "init_mode",
    type=click.Choice(["agent", "image"]),
    default="agent",
    show_default=True,
    help="image: boot the image's own init, no agent.",
)
@click.option("--entrypoint", default=None, help="Override the entrypoint (words or JSON list).")
@click.option("--cmd", default=None, help="Override the command (words or JSON list).")
@click.option(
    "-e", "--env", multiple=True, metavar="K=V", callback=check_env,
    help="Set an environment variable.",
)  # fmt: skip
@click.option("-w", "--workdir", default=None, help="Override the working directory.")
@click.option("-u", "--user", default=None, help="Run as USER[:GROUP] (names or ids).")
@click.option("--hostname", default=None, help="The guest's hostname.")
@click.option(
    "--cpus",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Suggested vCPUs, recorded in vm.json.",
)
@click.option(
    "--memory",
    type=click.IntRange(32, 1 << 20),
    default=256,
    show_default=True,
    help="Suggested memory in MiB, recorded in vm.json.",
)
@writer_params
@click.option("--no-cache", is_flag=True, help="Build again even if the bundle is cached.")
@click.option(
    "--push",
    "push_ref",
    default=None,
    metavar="REF",
    help="Push the bundle to REF (HOST/REPO:TAG; next to the image to link them).",
)
@click.option(
    "--remote-cache",
    is_flag=True,
    help="Pull a bundle built with the same settings from the image's registry instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@unpack_param
@source_params
@cache_param
def build(
    source: str, output: str, fs: str | None, writable_root: bool, verity: bool | None,
    kernel_path: str | None, init_mode: str, entrypoint: str | None, cmd: str | None,
    env: tuple[str, ...], workdir: str | None, user: str | None, hostname: str | None,
    cpus: int, memory: int,
    writer: WriterFlags, no_cache: bool,
    push_ref: str | None, remote_cache: bool, as_json: bool, max_unpacked_size: int,
    platform: str, registry: RegistryFlags, cache_dir: str | None,
) -> None:  # fmt: skip
    """Turn SOURCE into a VM-ready bundle: root fs, agent, kernel, vm.json, launchers."""

    def go() -> None:
        if env:
            click.echo("vmimg: warning: -e values are baked into vm.json and the root file "
                       "system, and pushed with the bundle: give secrets at run time "
                       "(vmimg run -e, --secret)", err=True)  # fmt: skip
        fs_type = fs or ("ext4" if writable_root else "erofs")
        if writable_root and fs_type != "ext4":
            raise click.BadParameter("--writable-root needs --fs ext4")
        if verity and (writable_root or fs_type == "initramfs"):
            raise click.BadParameter("--verity needs a read-only erofs or ext4 root")
        fmt = fs_type
        options = BuildOptions(
            fs=fs_type,
            writer_options=writer_options(fmt, writer),
            init=init_mode,
            overrides=ConfigOverrides(
                entrypoint=split_command(entrypoint, "--entrypoint"),
                cmd=split_command(cmd, "--cmd"), env=list(env),
                workdir=workdir, user=user, hostname=hostname,
            ),
            kernel_path=kernel_path,
            vcpus=cpus,
            memory_mib=memory,
            verity=verity,
        )  # fmt: skip
        cache = Cache.open(cache_dir, max_unpacked_size)
        platforms = [p.strip() for p in platform.split(",") if p.strip()]
        refs = [source, *([push_ref] if push_ref else [])]
        sopts = source_options(platforms[0] if platforms else platform, registry, refs)
        if len(platforms) > 1:
            check_output_dir(output)
            _build_platforms(source, output, options, cache, platforms, sopts,
                             not no_cache, push_ref, remote_cache, as_json)  # fmt: skip
            return
        check_destination(output)  # before the kernel, the layers, the registry
        extra: dict[str, Any] = {}
        shown = progress({KERNEL_BUILD_PHASE: FIRST_KERNEL_NOTE})
        if push_ref or remote_cache:
            with shown:
                remote = pipeline.build_bundle_remote(
                    source, output, options, cache, sopts, use_cache=not no_cache,
                    remote_cache=remote_cache, push=push_ref, phases=shown.phase,
                )  # fmt: skip
            result = remote.build
            extra = {
                "build_key": remote.key,
                "pulled_from": remote.pulled_from,
                "pushed": remote.pushed.pinned if remote.pushed else None,
            }
            for w in remote.pushed.warnings if remote.pushed else []:
                click.echo(f"vmimg: warning: {w}", err=True)
        else:
            with shown:
                result = pipeline.build_one(
                    source, output, options, cache, sopts, use_cache=not no_cache,
                    phases=shown.phase,
                )  # fmt: skip
        for w in result.warnings:
            click.echo(f"vmimg: warning: {w}", err=True)
        if as_json:
            click.echo(json.dumps({**asdict(result), **extra}, indent=2))
            return
        if extra.get("pulled_from"):
            state = f"pulled from {extra['pulled_from']}"
        elif result.cached:
            state = f"from cache ({result.handed_out})"
        else:
            state = f"in {result.seconds:.2f}s"
        click.echo(f"{result.bundle}: {result.fs} bundle of {result.image} "
                   f"({result.digest[:19]}, {result.platform}) {state}")  # fmt: skip
        if extra.get("pushed"):
            click.echo(f"pushed to {extra['pushed']}")

    run(as_json, go)
