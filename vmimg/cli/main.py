"""The `vmimg` command line: parse options, call the library, render results.

No logic lives here beyond turning options into library calls and results
(or errors) into text, JSON and exit codes.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import click

from vmimg import __version__, pipeline
from vmimg.artifact.bundle import resolve_bundle_argument
from vmimg.artifact.inspect import BundleInfo, describe_bundle, open_source
from vmimg.boot.run import run_bundle
from vmimg.boot.verify import VerifyOptions, junit_xml, verify_bundles
from vmimg.bundle.build import BuildOptions, check_destination
from vmimg.bundle.format import BUNDLE_FORMAT
from vmimg.cli.artifact import register as register_artifact_commands
from vmimg.cli.kernel import FIRST_KERNEL_NOTE, kernel
from vmimg.cli.options import (
    EXIT_INTERRUPTED,
    SIZE,
    RegistryFlags,
    bundle_output,
    cache_param,
    check_output_file,
    os_error_message,
    run,
    setup_logging,
    source_options,
    source_params,
    unpack_param,
    vm_params,
)
from vmimg.cli.progress import VERBOSITY, add_verbosity_options, progress
from vmimg.cli.vms import register as register_vm_commands
from vmimg.cli.vms import run_options, run_params
from vmimg.errors import UsageError, VerificationFailed, VmimgError
from vmimg.guest.agent import CONFIG_VERSION, MANIFEST_VERSION, ConfigOverrides
from vmimg.guest.kernel import KERNEL_BUILD_PHASE, read_pin
from vmimg.image.cache import Cache, format_size
from vmimg.image.inspect import describe, raw_manifest
from vmimg.image.oci import parse_platform
from vmimg.image.prune import prune
from vmimg.image.sample import write_sample
from vmimg.image.sources import SourceOptions
from vmimg.rootfs.convert import convert
from vmimg.rootfs.writers.cpio import CpioOptions
from vmimg.rootfs.writers.erofs import ErofsOptions
from vmimg.rootfs.writers.ext4 import Ext4Options
from vmimg.rootfs.writers.tar import TarOptions
from vmimg.safetext import escape_text


def writer_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """The file system writers' options, shared by rootfs and build."""
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
        f = opt(f)
    return f


def version_message() -> str:
    """`vmimg --version`: the versions of every format vmimg writes or pairs with."""

    pin = read_pin()
    return (
        f"%(prog)s %(version)s (bundle format {BUNDLE_FORMAT}, agent config {CONFIG_VERSION}, "
        f"manifest {MANIFEST_VERSION}, kernel config {pin.config_version} for Linux {pin.version})"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vmimg", message=version_message())
@click.option(
    "-v", "--verbose", is_flag=True, help="Log every registry request (never its credentials)."
)
def main(verbose: bool) -> None:
    """Turn container images into VM-ready, boot-verified artifacts."""
    setup_logging(verbose)


@main.command()
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
    compression: str,
    size: int | None,
    headroom: int | None,
    inodes: int,
    no_journal: bool,
    label: str,
    compress: str,
    compress_level: int | None,
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
        options = writer_options(
            fmt, compression, size, headroom, inodes, no_journal, compress, label, compress_level
        )
        cache = Cache.open(cache_dir, max_unpacked_size)
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
        else:
            state = (
                f"from cache ({result.handed_out})"
                if result.cached
                else f"in {result.seconds:.2f}s"
            )
            click.echo(
                f"{result.output}: {result.format}, {result.size} bytes, "
                f"{result.image} ({result.digest[:19]}, {result.platform}) {state}"
            )

    run(as_json, go)


def writer_options(
    fmt: str,
    compression: str,
    size: int | None,
    headroom: int | None,
    inodes: int,
    no_journal: bool,
    compress: str,
    label: str = "",
    compress_level: int | None = None,
) -> Any:
    """The options object of the chosen writer."""
    if fmt == "tar":
        return TarOptions()
    if fmt == "initramfs":
        return CpioOptions(compression=compression)
    if fmt == "ext4":
        kw: dict[str, Any] = {
            "size": size,
            "extra_inodes": inodes,
            "journal": not no_journal,
            "label": label,
        }
        if headroom is not None:
            kw["headroom"] = headroom
        return Ext4Options(**kw)

    return ErofsOptions(compress=compress, compress_level=compress_level, label=label)


@main.command()
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


BOOT_PHASE = "booting bundles"


def check_output_dir(path: str) -> None:
    """build --platform A,B writes DIR/ARCH: DIR must be a directory we may write in."""
    if not os.path.isdir(path):
        check_output_file(path, "-o")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"-o {path} is not writable")


def split_command(text: str | None) -> list[str] | None:
    """--entrypoint/--cmd: a JSON list, or words split the way a shell would."""
    if text is None:
        return None
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise click.BadParameter(f"not a JSON list: {text}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise click.BadParameter(f"not a JSON list of strings: {text}")
        return value

    return shlex.split(text)


def check_env(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> Any:
    """-e K=V: a name, then '=' (the value may be empty)."""
    for v in values:
        name, sep, _value = v.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE")
    return values


@main.command()
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
    compression: str, size: int | None, headroom: int | None, inodes: int, no_journal: bool,
    label: str, compress: str, compress_level: int | None, no_cache: bool,
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
            writer_options=writer_options(
                fmt, compression, size, headroom, inodes, no_journal, compress, label,
                compress_level,
            ),
            init=init_mode,
            overrides=ConfigOverrides(
                entrypoint=split_command(entrypoint), cmd=split_command(cmd), env=list(env),
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


@main.command()
@click.argument("bundles", nargs=-1, required=True)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds before a VM is killed and reported.",
)
@click.option(
    "--expect-exit",
    type=int,
    default=0,
    show_default=True,
    help="The exit code the workload must end with.",
)
@click.option("--cmd", default=None, help="Run this shell command instead of the entrypoint.")
@click.option("--smoke", default=None, help="A shell command that must exit 0 before the run.")
@click.option("--deep", is_flag=True, help="Also check every file's content hash (slower).")
@click.option("--no-run", is_flag=True, help="Verify the tree only; do not run the workload.")
@vm_params
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=None,
    help="Bundles to boot at once (default: cores).",
)
@click.option(
    "--junit", type=click.Path(dir_okay=False), default=None, help="Write a JUnit XML report here."
)
@click.option("--json", "as_json", is_flag=True, help="Print reports as JSON.")
@source_params
@cache_param
def verify(
    bundles: tuple[str, ...], timeout: float, expect_exit: int, cmd: str | None,
    smoke: str | None, deep: bool, no_run: bool, accel: str | None, cpus: int | None,
    memory: int | None, jobs: int | None, junit: str | None, as_json: bool,
    platform: str, registry: RegistryFlags, cache_dir: str | None,
) -> None:  # fmt: skip
    """Boot each BUNDLE, check its tree and run its workload; report per bundle.

    A BUNDLE is a directory, or a registry reference to a bundle artifact (pulled once
    into the cache).
    """

    def go() -> None:
        opts = VerifyOptions(
            timeout=timeout, expect_exit=expect_exit, cmd=cmd, smoke=smoke, deep=deep,
            run=not no_run, accel=accel, vcpus=cpus, memory_mib=memory,
        )  # fmt: skip

        if junit:
            check_output_file(junit, "--junit")  # not after minutes of booting
        cache = Cache.open(cache_dir)
        refs = [b for b in bundles if not os.path.isdir(b)]
        sopts = source_options(platform, registry, refs)
        with progress() as shown:
            paths = [resolve_bundle_argument(b, cache, sopts, shown.phase) for b in bundles]
            booted = shown.phase(BOOT_PHASE, len(paths), "")
            reports = verify_bundles(paths, opts, cache, jobs, on_done=lambda _r: booted(1))
        if junit:
            try:
                with open(junit, "wb") as f:
                    f.write(junit_xml(reports))
            except OSError as e:  # the reports still print: the boots were not for nothing
                click.echo(f"vmimg: error: --junit {os_error_message(e)}", err=True)
        if as_json:
            click.echo(json.dumps([r.to_json() for r in reports], indent=2))
        else:
            click.echo(render_reports(reports))
        failed = [r for r in reports if not r.passed]
        # A bundle that could not even be booted (malformed, QEMU missing) exits with that
        # error's own code; bundles that booted and failed, with VerificationFailed's.
        setup = [r.error_code for r in failed if r.error_code is not None]
        code = setup[0] if setup else VerificationFailed.exit_code
        if failed and as_json:
            sys.exit(code)  # the reports say it all: one JSON document
        if failed and setup:
            click.echo(f"vmimg: error: {failed[0].message}", err=True)
            sys.exit(code)
        if failed:
            raise VerificationFailed(f"{len(failed)} of {len(reports)} bundles failed")

    run(as_json, go)


def _fit(text: str, width: int) -> str:
    """`text` in `width` columns: its end, marked as cut, when it is longer."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def render_reports(reports: list[Any]) -> str:
    """The human table of verify reports, with details under each failure."""

    def secs(v: float | None) -> str:
        return f"{v:.2f}" if v is not None else "-"

    head = f"{'BUNDLE':<28} {'RESULT':<6} {'ACCEL':<5} {'FS':<9} {'EXIT':>4} " \
        f"{'KERNEL s':>8} {'READY s':>7} {'DONE s':>6}"  # fmt: skip
    lines = [head]
    for r in reports:
        t = r.timings
        lines.append(
            f"{_fit(r.bundle, 28):<28} {'pass' if r.passed else 'FAIL':<6} {r.accel:<5} "
            f"{r.rootfs:<9} {r.exit_code if r.exit_code is not None else '-':>4} "
            f"{secs(t.vmm_to_kernel):>8} {secs(t.to_agent_ready):>7} {secs(t.to_workload_exit):>6}"
        )  # fmt: skip
    accels = {(r.accel, r.accel_reason) for r in reports if r.accel}
    for name, reason in sorted(accels):
        lines.append(f"accel {name}: {reason}")
    for r in reports:
        if not r.passed:
            lines.append(f"{r.bundle}: failed in stage {r.stage}: {r.message}")
            lines.extend(f"  | {line}" for line in r.console_tail)
            if r.console_log:
                lines.append(f"  console log: {r.console_log}")
    return "\n".join(lines)


@main.command("run")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("command", nargs=-1)
@vm_params
@click.option(
    "-p",
    "--publish",
    multiple=True,
    metavar="[IP:]HOST:GUEST[/udp]",
    help="Forward HOST (on IP, default 127.0.0.1) to the guest's GUEST port, TCP or UDP.",
)
@click.option("--cmd", default=None, help="Run this shell command instead of the image's.")
@run_params
@click.option("--persist", is_flag=True, help="Keep the guest's writes in the bundle's ext4 image.")
@click.option("--timeout", type=float, default=None, help="Kill the VM after this many seconds.")
@cache_param
def run_cmd(
    bundle: str, command: tuple[str, ...], accel: str | None, cpus: int | None,
    memory: int | None, publish: tuple[str, ...], cmd: str | None, entrypoint: str | None,
    env: tuple[str, ...], env_file: tuple[str, ...], workdir: str | None, user: str | None,
    hostname: str | None, network: str, name: str | None, remove: bool, interactive: bool,
    tty: bool, detach: bool, volume: tuple[str, ...], disk: tuple[str, ...],
    data: tuple[str, ...], secret: tuple[str, ...], stop_signal: str | None,
    stop_timeout: int | None, persist: bool, timeout: float | None, cache_dir: str | None,
) -> None:  # fmt: skip
    """Boot BUNDLE as `docker run` starts a container; exit with the workload's exit code.

    COMMAND [ARG...] replaces the image's Cmd (put `--` before it when it has options).
    With -it, Ctrl-] asks the guest to shut down (the workload gets its stop signal); press
    it twice to kill the VM. SIGINT and SIGTERM to vmimg ask the guest to shut down. -d runs
    the VM in the background: see `vmimg ps`, `logs`, `exec`, `stop`. docs/run.md maps
    docker run's options to these.
    """

    def go() -> None:
        opts = run_options(
            command, entrypoint, env, env_file, publish, volume, disk, data, secret, stop_signal,
            stop_timeout=stop_timeout, accel=accel, vcpus=cpus, memory_mib=memory, cmd=cmd,
            workdir=workdir, user=user, hostname=hostname, network=network, name=name,
            remove=remove, interactive=interactive, tty=tty, detach=detach, persist=persist,
            timeout=timeout,
        )  # fmt: skip
        opts = replace(opts, console_all=VERBOSITY.verbose)
        result = run_bundle(bundle, opts, Cache.open(cache_dir))
        for w in result.warnings:
            click.echo(f"vmimg: warning: {w}", err=True)
        if result.detached:
            click.echo(result.name)
            return
        if not result.reported:
            click.echo("vmimg: the VM stopped without reporting an exit code", err=True)
        sys.exit(result.exit_code)

    run(False, go)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--platform",
    "platforms",
    default=None,
    help="Comma-separated platforms for a multi-platform index (default: the host's).",
)
def sample(directory: str, platforms: str | None) -> None:
    """Write the built-in sample image (busybox) as an OCI layout in DIRECTORY.

    Prints its reference, ready for `vmimg rootfs` or `vmimg build`.
    """

    def go() -> str:
        if platforms:
            return write_sample(directory, tuple(p.strip() for p in platforms.split(",")))
        return write_sample(directory)

    click.echo(run(False, go))


@main.group()
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


def entry() -> None:
    """The console script: click's handling, but Ctrl-C anywhere is one line and exit 130."""
    try:
        main.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("vmimg: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:  # outside a command's own net (an option's callback, kernel commands)
        click.echo(f"vmimg: error: {os_error_message(e)}", err=True)
        sys.exit(VmimgError.exit_code)


main.add_command(kernel)
register_artifact_commands(main, kernel)  # vmimg push/pull, vmimg kernel push/pull
register_vm_commands(main)  # vmimg ps/logs/stop/exec/rm
add_verbosity_options(main)  # last: -q/-v on every command registered above
