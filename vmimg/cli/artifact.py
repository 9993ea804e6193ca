"""`vmimg push`, `vmimg pull`, `vmimg kernel push` and `vmimg kernel pull`.

Only option parsing and rendering live here; the work is in vmimg.artifact.
vmimg.cli.main loads push and pull, vmimg.cli.kernel adds the kernel ones to its group;
shared options come from vmimg.cli.options.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from vmimg.artifact.bundle import pull_bundle, push_bundle
from vmimg.artifact.kernel import pull_kernel, push_kernel
from vmimg.bundle.build import boot_kernel_file, check_destination
from vmimg.cli.options import (
    RegistryFlags,
    bundle_output,
    cache_param,
    check_platform,
    run,
    source_options,
)
from vmimg.cli.options import registry_params as reach_registry
from vmimg.cli.progress import add_verbosity_options, progress
from vmimg.image.cache import Cache
from vmimg.image.oci import DEFAULT_PLATFORM

MIB = 1 << 20


def registry_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach the registry (--authfile, --creds, --tls-verify, ...) and --cache, as the
    image commands have them."""
    return cache_param(reach_registry(f))


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MIB:.1f} MiB in {seconds:.2f}s"


def _echo_push(result: Any, as_json: bool) -> None:
    for w in result.warnings:
        click.echo(f"vmimg: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({**asdict(result), "pinned": result.pinned}, indent=2))
        return
    click.echo(
        f"{result.pinned}: pushed as {result.reference} "
        f"({result.uploaded} blobs uploaded, {result.skipped} already there, "
        f"{_rate(result.bytes_uploaded, result.seconds)})"
    )
    if result.subject:
        click.echo(f"  subject {result.subject} (referrers: {result.referrers})")


@click.command("push")
@click.argument("bundle", type=click.Path())
@click.argument("ref")
@click.option(
    "--build-key",
    default=None,
    help="The build key to annotate (default: vm.json's build_key, if any).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@registry_params
def push(
    bundle: str,
    ref: str,
    build_key: str | None,
    as_json: bool,
    registry: RegistryFlags,
    cache_dir: str | None,
) -> None:
    """Push the bundle directory BUNDLE to REF (HOST/REPO:TAG) as an OCI artifact.

    Pushed next to the image the bundle was built from (same repository), the
    artifact names that image as its subject, so `vmimg pull --from-image`
    and `vmimg build --remote-cache` find it.
    """

    def go() -> None:
        opts = source_options(DEFAULT_PLATFORM, registry, [ref])
        with progress() as shown:
            result = push_bundle(bundle, ref, Cache.open(cache_dir), opts, build_key, shown.phase)
        _echo_push(result, as_json)

    run(as_json, go)


@click.command("pull")
@click.argument("ref")
@bundle_output
@click.option(
    "--from-image",
    is_flag=True,
    help="REF is a container image: pull the newest bundle made from it.",
)
@click.option(
    "--fs",
    type=click.Choice(["erofs", "ext4", "initramfs"]),
    default=None,
    help="With --from-image: only a bundle with this root file system.",
)
@click.option(
    "--platform",
    default=DEFAULT_PLATFORM,
    show_default=True,
    callback=check_platform,
    help="With --from-image: the platform to pick from an image index.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@registry_params
def pull(
    ref: str,
    output: str,
    from_image: bool,
    fs: str | None,
    platform: str,
    as_json: bool,
    registry: RegistryFlags,
    cache_dir: str | None,
) -> None:
    """Pull the bundle artifact at REF into the directory OUTPUT.

    Every blob is checked against its digest while it streams; OUTPUT appears
    only when the whole bundle is there and verified.
    """

    def go() -> None:
        check_destination(output)  # before anything is fetched
        with progress() as shown:
            result = pull_bundle(
                ref, output, source_options(platform, registry, [ref]), from_image=from_image,
                fs=fs, phases=shown.phase,
            )  # fmt: skip
        if as_json:
            click.echo(json.dumps(asdict(result), indent=2))
            return
        click.echo(
            f"{result.directory}: {len(result.files)} files from {result.reference} "
            f"({_rate(result.bytes_downloaded, result.seconds)})"
        )

    run(as_json, go)


@click.command("push")
@click.argument("key")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@registry_params
def kernel_push(
    key: str,
    ref: str,
    as_json: bool,
    registry: RegistryFlags,
    cache_dir: str | None,
) -> None:
    """Push the cached kernel KEY (or a prefix of it) to REF as an OCI artifact."""

    def go() -> None:
        opts = source_options(DEFAULT_PLATFORM, registry, [ref])
        with progress() as shown:
            result = push_kernel(key, ref, Cache.open(cache_dir), opts, shown.phase)
        _echo_push(result, as_json)

    run(as_json, go)


@click.command("pull")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@registry_params
def kernel_pull(ref: str, as_json: bool, registry: RegistryFlags, cache_dir: str | None) -> None:
    """Pull the kernel artifact at REF into the kernel cache."""

    def go() -> None:
        with progress() as shown:
            info = pull_kernel(
                ref, Cache.open(cache_dir), source_options(DEFAULT_PLATFORM, registry, [ref]),
                shown.phase,
            )  # fmt: skip
        boot_file = boot_kernel_file(info)  # the file a bundle boots: what --kernel takes
        if as_json:
            click.echo(json.dumps({**info.metadata, "directory": str(info.directory),
                                   "kernel": str(boot_file)}, indent=2))  # fmt: skip
            return
        click.echo(f"{info.key}  {info.version}  {info.arch}  {info.directory}")
        click.echo(f"  use it: vmimg build SOURCE -o DIR --kernel {boot_file}")

    run(as_json, go)


for _command in (push, pull, kernel_push, kernel_pull):
    add_verbosity_options(_command)  # -q/-v, also when imported without vmimg.cli.main
