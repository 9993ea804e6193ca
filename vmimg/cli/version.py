"""`vmimg --version`: vmimg's and its formats' versions (loaded only when asked for)."""

from __future__ import annotations

from vmimg import __version__
from vmimg.bundle.format import BUNDLE_FORMAT
from vmimg.guest.agent import CONFIG_VERSION, MANIFEST_VERSION
from vmimg.guest.kernel import read_pin


def version_message() -> str:
    pin = read_pin()
    return (
        f"vmimg {__version__} (bundle format {BUNDLE_FORMAT}, agent config {CONFIG_VERSION}, "
        f"manifest {MANIFEST_VERSION}, kernel config {pin.config_version} for Linux {pin.version})"
    )
