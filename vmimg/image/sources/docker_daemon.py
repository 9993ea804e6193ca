"""docker-daemon:NAME[:TAG] — an image in a Docker-API engine (Docker, or podman's service).

The engine is asked for the image's ID and layer diff_ids first: when the
config and every layer are already in our cache, nothing is exported. Else
the image is exported once (`docker save`) into the cache's tmp area and
read as a docker-archive.
"""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO

from vmimg.errors import ImageRefError, SourceError, root_cause
from vmimg.image import unsynced
from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.oci import Descriptor, ImageConfig, Platform, normalize_platform
from vmimg.image.reference import ImageRef
from vmimg.image.sources.base import check_platform
from vmimg.image.sources.docker_archive import DOCKER_LAYER_TAR, open_docker_archive
from vmimg.image.sources.options import SourceOptions

SAVE_CHUNK = 4 << 20
# Where the Docker SDK looks for the engine (docker.from_env), to name it in errors.
DOCKER_HOST_ENV = "DOCKER_HOST"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
UNIX_SCHEME = "unix://"
MAX_REASON = 200  # characters of the SDK's message kept in ours


def _cached_image(
    name: str, attrs: dict[str, object], platform: Platform, cache: Cache
) -> Image | None:
    image_id = str(attrs.get("Id") or "")
    if not image_id.startswith("sha256:"):
        return None
    config_bytes = cache.read_blob(image_id)
    if config_bytes is None:
        return None
    config = ImageConfig.parse(config_bytes, f"{name}: config {image_id}")
    # Each layer must be there, and usable as it is (not from before a crash: image/unsynced)
    paths = [cache.layer_path(d) for d in config.diff_ids]
    if not all(os.path.exists(p) and unsynced.trusted(p) for p in paths):
        return None
    check_platform(config, platform, name)

    def open_blob(desc: Descriptor) -> BinaryIO:
        raise SourceError(f"{name}: layer {desc.digest} expected in the cache")

    return Image(
        name=name,
        digest=image_id,
        config_digest=image_id,
        config=config,
        layers=[Descriptor(DOCKER_LAYER_TAR, "", 0) for _ in config.diff_ids],
        platform=normalize_platform(config.platform),
        open_blob=open_blob,
    )


def open_ref(ref: ImageRef, cache: Cache, options: SourceOptions) -> Image:
    """A docker-daemon: reference (the transport table's entry point)."""
    assert ref.tag is not None
    return open_daemon_image(ref.tag, str(ref), options.platform, cache)


def _unreachable(error: Exception) -> str:
    """Why the engine did not answer, and where vmimg looked for it (the Docker SDK's own
    message is a nest of exception reprs)."""
    where = os.environ.get(DOCKER_HOST_ENV) or DEFAULT_DOCKER_HOST
    socket_path = where.removeprefix(UNIX_SCHEME) if where.startswith(UNIX_SCHEME) else None
    if socket_path is not None and not os.path.exists(socket_path):
        why = "no such socket"
    else:
        cause = root_cause(error)  # e.g. the ConnectionRefusedError the SDK wraps twice over
        if isinstance(cause, OSError) and cause.strerror:
            why = cause.strerror.lower()
        else:
            why = " ".join(str(cause).split())[:MAX_REASON] or type(cause).__name__
    return (
        f"cannot reach the Docker engine at {where} ({why}); start one, or set "
        f"{DOCKER_HOST_ENV} to where it listens (podman: `podman system service`)"
    )


def open_daemon_image(image_name: str, name: str, platform: Platform, cache: Cache) -> Image:
    # The Docker SDK costs ~10 MB and ~0.2 s to import: only docker-daemon: sources pay it.
    import docker
    import docker.errors

    try:
        client = docker.from_env()
        img = client.images.get(image_name)
    except docker.errors.ImageNotFound:
        raise ImageRefError(f"{name}: no such image in the engine") from None
    except docker.errors.DockerException as e:
        raise SourceError(f"{name}: {_unreachable(e)}") from None
    cached = _cached_image(name, img.attrs, platform, cache)
    if cached is not None:
        return cached
    with contextlib.ExitStack() as stack:
        f, tmp = stack.enter_context(cache.temp_file(".tar"))
        try:
            for chunk in img.save(chunk_size=SAVE_CHUNK, named=True):
                f.write(chunk)
        except docker.errors.DockerException as e:
            raise SourceError(f"{name}: export from the engine failed: {e}") from None
        f.flush()
        image = open_docker_archive(tmp, name, None, platform, cache)
        files_close = image.close
        keep = stack.pop_all()

        def close() -> None:
            files_close()
            keep.close()

        image.close = close
        return image
    raise AssertionError("unreachable")
