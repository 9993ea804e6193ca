"""Image sources: every transport resolves a reference to the same `Image`.

Each transport's module is loaded when a reference first names it (OPENERS): an oci:
source need not load the registry client, nor a registry source the archive readers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from vmimg.errors import ImageRefError
from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.reference import BUNDLE, SUPPORTED_FORMS, ImageRef, parse_reference
from vmimg.image.sources.options import SourceOptions

# Transport -> the module in this package whose `open_ref` opens its references, imported
# on first use: one of the few tables that load modules by name (docs/architecture.md).
OPENERS = {
    "docker": "registry",
    "oci": "layout",
    "oci-archive": "layout",
    "docker-archive": "docker_archive",
    "docker-daemon": "docker_daemon",
    "dir": "dirformat",
}
Opener = Callable[[ImageRef, Cache, SourceOptions], Image]


def open_image(ref: ImageRef | str, cache: Cache, options: SourceOptions) -> Image:
    """Resolve any reference to an `Image` (close it with image.close() when done)."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    if ref.transport == BUNDLE:
        raise ImageRefError(f"{ref} is a vmimg bundle directory, not an image")
    module = OPENERS.get(ref.transport)
    if module is None:
        raise ImageRefError(f"unknown transport in {str(ref)!r}; use {SUPPORTED_FORMS}")
    opener: Opener = importlib.import_module(f"{__name__}.{module}").open_ref
    return opener(ref, cache, options)


__all__ = ["Image", "SourceOptions", "open_image"]
