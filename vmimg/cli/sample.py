"""`vmimg sample`: the built-in sample image, written as an OCI layout (its own module, so
that `vmimg rootfs` does not load the sample's layer builder)."""

from __future__ import annotations

import click

from vmimg.cli.options import run
from vmimg.image.sample import write_sample


@click.command()
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
