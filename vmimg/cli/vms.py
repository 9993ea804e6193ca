"""`vmimg ps`, `logs`, `stop`, `exec` and `rm`, and the parsing of `vmimg run`'s
container-style options (docs/run.md). The work is in vmimg.boot (state, control, run)."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import click

from vmimg.boot import state as vmstate
from vmimg.boot.control import ExecOptions, copy_logs, exec_in_vm, remove_vm, stop_vm
from vmimg.boot.devices import parse_data, parse_disk, parse_publish, parse_secret, parse_volume
from vmimg.boot.run import RunOptions
from vmimg.cli.options import parse_size, run, split_words
from vmimg.errors import AgentError, UsageError
from vmimg.guest.agent import parse_signal

SECONDS_PER = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def _env_item(item: str, where: str) -> str | None:
    """K=V as it is; K alone takes the value vmimg has (and is left out when it has none)."""
    key, sep, _ = item.partition("=")
    if not key or any(c.isspace() for c in key):
        raise UsageError(f"{where}: {item!r} is not KEY=VALUE or KEY")
    if sep:
        return item
    value = os.environ.get(key)
    return None if value is None else f"{key}={value}"


def parse_env(values: tuple[str, ...], env_files: tuple[str, ...]) -> tuple[str, ...]:
    """--env-file entries (KEY=VALUE or KEY lines; blank lines and # comments skipped), then
    -e ones, which win."""
    out: list[str] = []
    for path in env_files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--env-file {path}: {e}") from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                item = _env_item(line, f"--env-file {path} line {n}")
                out += [item] if item else []
    for value in values:
        item = _env_item(value, "--env")
        out += [item] if item else []
    return tuple(out)


@dataclass(frozen=True)
class ContainerFlags:
    """`vmimg run`'s container-style options as given (`run_params`)."""

    entrypoint: str | None = None
    env: tuple[str, ...] = ()
    env_file: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    network: str = "user"
    name: str | None = None
    remove: bool = False
    interactive: bool = False
    tty: bool = False
    detach: bool = False
    volume: tuple[str, ...] = ()
    disk: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    secret: tuple[str, ...] = field(default=(), repr=False)
    stop_signal: str | None = None
    stop_timeout: int | None = None


def run_options(
    command: tuple[str, ...], flags: ContainerFlags, publish: tuple[str, ...], **rest: Any
) -> RunOptions:
    """RunOptions from `vmimg run`'s option values (`rest`: RunOptions fields as they are)."""
    try:
        stop_signal = parse_signal(flags.stop_signal) if flags.stop_signal is not None else None
    except AgentError:
        raise UsageError(f"--stop-signal: {flags.stop_signal!r} is not a signal") from None
    return RunOptions(
        command=command or None,
        entrypoint=split_words(flags.entrypoint, "--entrypoint"),
        env=parse_env(flags.env, flags.env_file),
        workdir=flags.workdir,
        user=flags.user,
        hostname=flags.hostname,
        network=flags.network,
        name=flags.name,
        remove=flags.remove,
        interactive=flags.interactive,
        tty=flags.tty,
        detach=flags.detach,
        publish=tuple(parse_publish(p) for p in publish),
        volumes=tuple(parse_volume(v) for v in flags.volume),
        disks=tuple(parse_disk(d) for d in flags.disk),
        data=tuple(parse_data(d, parse_size) for d in flags.data),
        secrets=tuple(parse_secret(s) for s in flags.secret),
        stop_signal=stop_signal,
        stop_timeout=flags.stop_timeout,
        **rest,
    )


def run_params(f: Callable[..., Any]) -> Callable[..., Any]:
    """`vmimg run`'s container-style options (docs/run.md maps them to docker run's); the
    command gets them as one `container` argument (a ContainerFlags)."""

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        flags = ContainerFlags(**{name: kwargs.pop(name) for name in CONTAINER_FLAGS})
        return f(*args, container=flags, **kwargs)

    for opt in reversed(
        [
            click.option("--entrypoint", default=None,
                         help="Replace the image's entrypoint (words or a JSON list; \"\" "
                         "empties it); COMMAND follows it."),
            click.option("-e", "--env", multiple=True, metavar="K=V",
                         help="Set a variable in the workload's environment (K alone: "
                         "vmimg's value)."),
            click.option("--env-file", multiple=True, type=click.Path(dir_okay=False),
                         help="Read KEY=VALUE lines from a file."),
            click.option("-w", "--workdir", default=None, help="The workload's directory."),
            click.option("-u", "--user", default=None,
                         help="Run as USER[:GROUP] (names from the guest's /etc/passwd, or ids)."),
            click.option("--hostname", default=None, help="The guest's hostname."),
            click.option("--network", type=click.Choice(["user", "none"]), default="user",
                         show_default=True,
                         help="user: QEMU's user network (NAT); none: loopback only."),
            click.option("--name", default=None, help="Name the VM (ps, logs, stop, exec)."),
            click.option("--rm", "remove", is_flag=True,
                         help="Forget the VM (its state and log) when it ends."),
            click.option("-i", "--interactive", is_flag=True,
                         help="Send stdin to the workload."),
            click.option("-t", "--tty", is_flag=True,
                         help="The console is a terminal for the workload."),
            click.option("-d", "--detach", is_flag=True,
                         help="Run in the background and print the VM's name."),
            click.option("-v", "--volume", multiple=True, metavar="HOSTDIR:GUESTDIR[:ro]",
                         help="Share a host directory (virtio-9p)."),
            click.option("--disk", multiple=True, metavar="FILE[:GUESTDIR][:ro]",
                         help="Attach a disk image; mount it (ext4, erofs) at GUESTDIR."),
            click.option("--data", multiple=True, metavar="SIZE:GUESTDIR",
                         help="A persistent ext4 disk in BUNDLE.data/, made on first use."),
            click.option("--secret", multiple=True, metavar="id=NAME,src=FILE",
                         help="FILE's bytes at /run/secrets/NAME (tmpfs), off the command "
                         "line and out of logs."),
            click.option("--stop-signal", default=None, metavar="SIGNAL",
                         help="What a stop request sends the workload (default: the image's "
                         "STOPSIGNAL, else SIGTERM)."),
            click.option("--stop-timeout", type=click.IntRange(0, 2**32 - 2), default=None,
                         metavar="SECONDS",
                         help="Seconds from the stop signal to SIGKILL [default: 10]."),
        ]
    ):  # fmt: skip
        command = opt(command)
    return command


CONTAINER_FLAGS = [f.name for f in fields(ContainerFlags)]


# -- ps, logs, stop, exec, rm --------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in SECONDS_PER:
        if seconds >= size or unit == "s":
            return f"{seconds // size}{unit}"
    return "0s"


def _describe(state: vmstate.VmState) -> dict[str, Any] | None:
    try:
        rec = state.load()
    except Exception:
        return None
    running = state.running(rec)
    return {
        "name": rec.name,
        "bundle": rec.bundle,
        "state": "running" if running else "exited",
        "exit_code": None if running else state.exit_code(rec),
        "started_at": rec.started_at,
        "uptime": time.time() - rec.started_at if running else None,
        "ports": rec.ports,
        "detached": rec.detached,
    }


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also the VMs that have ended.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def ps(show_all: bool, as_json: bool) -> None:
    """List the VMs `vmimg run` started (running ones; -a: all)."""

    def go() -> None:
        rows = [d for s in vmstate.list_all() if (d := _describe(s))]
        rows = [r for r in rows if show_all or r["state"] == "running"]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(f"{'NAME':<16} {'STATE':<12} {'UPTIME':>7}  {'PORTS':<28} BUNDLE")
        for r in rows:
            status = r["state"]
            if status == "exited":
                code = r["exit_code"]
                status = f"exited({'?' if code is None else code})"
            up = _duration(r["uptime"]) if r["uptime"] is not None else "-"
            ports = ",".join(r["ports"]) or "-"
            click.echo(f"{r['name']:<16} {status:<12} {up:>7}  {ports:<28} {r['bundle']}")

    run(as_json, go)


@click.command("logs")
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the VM ends.")
def logs(name: str, follow: bool) -> None:
    """Print a VM's console (kernel, agent markers, the workload's output)."""
    run(False, lambda: copy_logs(vmstate.get(name), sys.stdout.buffer, follow))


@click.command("stop")
@click.argument("names", nargs=-1, required=True)
@click.option("-t", "--time", "timeout", type=click.FloatRange(0), default=10.0,
              show_default=True,
              help="Seconds between the power button and a kill.")  # fmt: skip
def stop(names: tuple[str, ...], timeout: float) -> None:
    """Stop VMs: the power button (the workload gets its stop signal), then a kill."""

    def go() -> None:
        for name in names:
            stop_vm(vmstate.get(name), timeout)
            click.echo(name)

    run(False, go)


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Kill a running VM first.")
def rm(names: tuple[str, ...], force: bool) -> None:
    """Forget ended VMs: their state and console logs (data disks stay)."""

    def go() -> None:
        for name in names:
            remove_vm(vmstate.get(name), force)
            click.echo(name)

    run(False, go)


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("-i", "--interactive", is_flag=True, help="Send stdin to the process.")
@click.option("-t", "--tty", is_flag=True, help="Run the process on a terminal (a pty).")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set a variable.")
@click.option("-u", "--user", default=None, help="Run as USER[:GROUP].")
@click.option("-w", "--workdir", default=None, help="The process's directory.")
def exec_cmd(name: str, command: tuple[str, ...], interactive: bool, tty: bool,
             env: tuple[str, ...], user: str | None, workdir: str | None) -> None:  # fmt: skip
    """Run COMMAND in the running VM NAME; exit with its exit code.

    The process gets the workload's environment, user and directory unless told
    otherwise. Options go before NAME; everything after NAME is the command.
    """

    def go() -> int:
        opts = ExecOptions(argv=command, env=parse_env(env, ()), user=user,
                           workdir=workdir, interactive=interactive, tty=tty)  # fmt: skip
        return exec_in_vm(vmstate.get(name), opts)

    sys.exit(run(False, go))
