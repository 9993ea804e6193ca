"""Image sources: every transport resolves a reference to the same `Image`."""

from __future__ import annotations

import os

from vmimg.errors import ImageRefError
from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.reference import BUNDLE, SUPPORTED_FORMS, ImageRef, parse_reference
from vmimg.image.sources.dirformat import open_dir_image
from vmimg.image.sources.docker_archive import open_docker_archive
from vmimg.image.sources.docker_daemon import open_daemon_image
from vmimg.image.sources.layout import DirFiles, TarFiles, open_layout_image
from vmimg.image.sources.options import SourceOptions
from vmimg.image.sources.registry import open_registry_image


def open_image(ref: ImageRef | str, cache: Cache, options: SourceOptions) -> Image:
    """Resolve any reference to an `Image` (close it with image.close() when done)."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    name = str(ref)
    want = options.platform
    if ref.transport == "docker":
        assert ref.registry is not None
        return open_registry_image(ref.registry, cache, options)
    if ref.transport in ("oci", "oci-archive"):
        assert ref.path is not None
        if ref.transport == "oci":
            files: DirFiles | TarFiles = DirFiles(ref.path)
        else:
            if not os.path.isfile(ref.path):
                raise ImageRefError(f"no such file: {ref.path}")
            files = TarFiles(ref.path)
        return open_layout_image(files, name, ref.tag, want, cache)
    if ref.transport == "docker-archive":
        assert ref.path is not None
        if not os.path.isfile(ref.path):
            raise ImageRefError(f"no such file: {ref.path}")
        return open_docker_archive(ref.path, name, ref.tag, want, cache)
    if ref.transport == "docker-daemon":
        assert ref.tag is not None
        return open_daemon_image(ref.tag, name, want, cache)
    if ref.transport == "dir":
        assert ref.path is not None
        return open_dir_image(ref.path, name, want, cache)
    if ref.transport == BUNDLE:
        raise ImageRefError(f"{name} is a vmimg bundle directory, not an image")
    raise ImageRefError(f"unknown transport in {name!r}; use {SUPPORTED_FORMS}")


__all__ = ["Image", "SourceOptions", "open_image"]
