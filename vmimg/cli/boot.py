"""`vmimg verify` (boot bundles, report) and `vmimg run` (boot one as a container)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from typing import Any

import click

from vmimg.artifact.bundle import resolve_bundle_argument
from vmimg.boot.run import run_bundle
from vmimg.boot.verify import VerifyOptions, junit_xml, verify_bundles
from vmimg.cli.options import (
    RegistryFlags,
    cache_param,
    check_output_file,
    os_error_message,
    run,
    source_options,
    source_params,
    vm_params,
)
from vmimg.cli.progress import VERBOSITY, progress
from vmimg.cli.vms import ContainerFlags, run_options, run_params
from vmimg.errors import VerificationFailed
from vmimg.image.cache import Cache

BOOT_PHASE = "booting bundles"


@click.command()
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


@click.command("run")
@click.argument("bundle", type=click.Path())
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
    memory: int | None, publish: tuple[str, ...], cmd: str | None, container: ContainerFlags,
    persist: bool, timeout: float | None, cache_dir: str | None,
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
            command, container, publish, accel=accel, vcpus=cpus, memory_mib=memory, cmd=cmd,
            persist=persist, timeout=timeout,
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
