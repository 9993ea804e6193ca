"""The `vmimg` command line: parse options, call the library, render results.

No logic lives here beyond turning options into library calls and results (or errors)
into text, JSON and exit codes. Each command lives in the module named in COMMANDS, loaded
when the command is looked up: start-up is most of a warm run, and `vmimg rootfs` need not
load the boot, bundle and artifact stages.
"""

from __future__ import annotations

import importlib
import sys

import click

from vmimg.cli.options import os_error_message, setup_logging
from vmimg.cli.progress import add_verbosity_options
from vmimg.errors import EXIT_INTERRUPTED, VmimgError

# Command name -> "module:attribute" of its click command.
COMMANDS = {
    "build": "vmimg.cli.build:build",
    "cache": "vmimg.cli.cache:cache",
    "exec": "vmimg.cli.vms:exec_cmd",
    "inspect": "vmimg.cli.inspect:inspect",
    "kernel": "vmimg.cli.kernel:kernel",
    "logs": "vmimg.cli.vms:logs",
    "ps": "vmimg.cli.vms:ps",
    "pull": "vmimg.cli.artifact:pull",
    "push": "vmimg.cli.artifact:push",
    "rm": "vmimg.cli.vms:rm",
    "rootfs": "vmimg.cli.rootfs:rootfs",
    "run": "vmimg.cli.boot:run_cmd",
    "sample": "vmimg.cli.sample:sample",
    "stop": "vmimg.cli.vms:stop",
    "verify": "vmimg.cli.boot:verify",
}
VERSION_MESSAGE = "vmimg.cli.version:version_message"


def load(target: str) -> object:
    """The object a "module:attribute" string names, its module imported now."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class Commands(click.Group):
    """A group whose commands come from COMMANDS, each loaded when first looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        command = load(target)
        assert isinstance(command, click.Command), target
        add_verbosity_options(command)  # -q/-v on every command
        return command


def show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: the versions of every format vmimg writes or pairs with."""
    if not value or ctx.resilient_parsing:
        return
    message = load(VERSION_MESSAGE)
    assert callable(message)
    click.echo(message())
    ctx.exit()


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=show_version,
    help="Show the version and exit.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Log every registry request (never its credentials)."
)
def main(verbose: bool) -> None:
    """Turn container images into VM-ready, boot-verified artifacts."""
    setup_logging(verbose)


def click_error_line(e: click.ClickException) -> str:
    """A usage error in one line, like every other error, with where the help is."""
    message = " ".join(e.format_message().splitlines())
    if isinstance(e, click.UsageError):
        message += f" (`{command_words(e.ctx)} --help`)"
    return message


def command_words(ctx: click.Context | None) -> str:
    """`vmimg` and the (sub)commands `ctx` is in: how a user types it, however vmimg was
    started (click's command_path says `python -m vmimg` then)."""
    words = []
    while ctx is not None and ctx.parent is not None:
        words.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["vmimg", *reversed(words)])


def entry() -> None:
    """The console script: click's handling, but Ctrl-C anywhere is one line and exit 130."""
    try:
        main.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("vmimg: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.NoArgsIsHelpError as e:  # `vmimg` alone: the help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"vmimg: error: {click_error_line(e)}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:  # outside a command's own net (an option's callback, kernel commands)
        click.echo(f"vmimg: error: {os_error_message(e)}", err=True)
        sys.exit(VmimgError.exit_code)


add_verbosity_options(main)
