"""Image sources: every transport resolves a reference to the same `Image`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmimg.errors import ImageRefError
from vmimg.image.cache import Cache
from vmimg.image.oci import Platform
from vmimg.image.reference import ImageRef, parse_reference
from vmimg.image.registry import Credentials
from vmimg.image.sources.base import Image


@dataclass(frozen=True)
class SourceOptions:
    """Which platform to pick, and how to reach registries (as skopeo's options)."""

    platform: Platform
    insecure_hosts: tuple[str, ...] = ()  # plain http allowed (loopback hosts always are)
    ca_cert: str | None = None
    tls_verify: bool = True  # False: plain http allowed and certificates unchecked, everywhere
    authfile: str | None = None  # the primary auth file (else $REGISTRY_AUTH_FILE, ...)
    creds: Credentials | None = None  # --creds: used for creds_host only
    creds_host: str | None = None


def open_image(ref: ImageRef | str, cache: Cache, options: SourceOptions) -> Image:
    """Resolve any reference to an `Image` (close it with image.close() when done)."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    name = str(ref)
    want = options.platform
    if ref.transport == "docker":
        from vmimg.image.sources.registry import open_registry_image

        assert ref.registry is not None
        return open_registry_image(ref.registry, cache, options)
    if ref.transport in ("oci", "oci-archive"):
        from vmimg.image.sources.layout import DirFiles, TarFiles, open_layout_image

        assert ref.path is not None
        if ref.transport == "oci":
            files: DirFiles | TarFiles = DirFiles(ref.path)
        else:
            if not os.path.isfile(ref.path):
                raise ImageRefError(f"no such file: {ref.path}")
            files = TarFiles(ref.path)
        return open_layout_image(files, name, ref.tag, want, cache)
    if ref.transport == "docker-archive":
        from vmimg.image.sources.docker_archive import open_docker_archive

        assert ref.path is not None
        if not os.path.isfile(ref.path):
            raise ImageRefError(f"no such file: {ref.path}")
        return open_docker_archive(ref.path, name, ref.tag, want, cache)
    if ref.transport == "docker-daemon":
        from vmimg.image.sources.docker_daemon import open_daemon_image

        assert ref.tag is not None
        return open_daemon_image(ref.tag, name, want, cache)
    raise ImageRefError(f"unknown transport in {name!r}")


__all__ = ["Image", "SourceOptions", "open_image"]
