"""docker-archive:PATH[:NAME:TAG] — a `docker save` / `podman save` tarball.

Both layouts are read in place: the legacy one (manifest.json naming a
config file and `<id>/layer.tar` files) and the OCI layout Docker 25+ writes
beside it (manifest.json then points into blobs/). Legacy layer files have no
digest of their own, so only their diff_id is checked.
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

from vmimg.digest import Hasher, digest_bytes
from vmimg.errors import ImageRefError, SourceError
from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.oci import (
    MAX_DOCUMENT_BYTES,
    Descriptor,
    ImageConfig,
    Platform,
    normalize_platform,
)
from vmimg.image.reference import ImageRef
from vmimg.image.sources.base import check_platform
from vmimg.image.sources.layout import TarFiles, archive_file, open_layout_image, read_small
from vmimg.image.sources.options import SourceOptions

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
BLOB_PREFIX = "blobs/sha256/"


def _repo_tags(entry: object) -> list[str]:
    """An archive entry's RepoTags (none if it or they are malformed)."""
    tags = entry.get("RepoTags") if isinstance(entry, dict) else None
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _pick_entry(entries: list[Any], name: str, tag: str | None) -> dict[str, Any]:
    if not isinstance(entries, list) or not entries:
        raise SourceError(f"{name}: manifest.json lists no images")
    if tag:
        wanted = {tag, f"localhost/{tag}", f"docker.io/{tag}", f"docker.io/library/{tag}"}
        chosen = [i for i, e in enumerate(entries) if wanted & set(_repo_tags(e))]
        if not chosen:
            raise ImageRefError(f"{name}: no image named {tag!r} in the archive")
        index = chosen[0]
    elif len(entries) > 1:
        tags = ", ".join(t for e in entries for t in _repo_tags(e))
        raise ImageRefError(f"{name}: holds several images; name one ({tags})")
    else:
        index = 0
    if not isinstance(entries[index], dict):
        raise SourceError(f"{name}: manifest.json entry {index} is not an object")
    return dict(entries[index])


def open_ref(ref: ImageRef, cache: Cache, options: SourceOptions) -> Image:
    """A docker-archive: reference (the transport table's entry point)."""
    assert ref.path is not None
    return open_docker_archive(archive_file(ref.path), str(ref), ref.tag, options.platform, cache)


def open_docker_archive(
    path: str, name: str, tag: str | None, platform: Platform, cache: Cache | None
) -> Image:
    files = TarFiles(path)
    if not files.exists("manifest.json"):
        if files.exists("index.json"):
            return open_layout_image(files, name, tag, platform, cache)
        raise SourceError(f"{name}: neither manifest.json nor index.json: not an image archive")
    try:
        entries = json.loads(read_small(files, "manifest.json"))
    except ValueError as e:
        raise SourceError(f"{name}: manifest.json is not valid JSON: {e}") from None
    entry = _pick_entry(entries, name, tag)
    config_path = entry.get("Config")
    layer_paths = entry.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list):
        raise SourceError(f"{name}: manifest.json entry lacks Config or Layers")
    config_bytes = read_small(files, config_path)
    if len(config_bytes) >= MAX_DOCUMENT_BYTES:
        raise SourceError(f"{name}: config {config_path} is too large")
    config_digest = digest_bytes(config_bytes)
    if config_path.startswith(BLOB_PREFIX):
        expected = "sha256:" + config_path[len(BLOB_PREFIX) :]
        h = Hasher()
        h.update(config_bytes)
        h.verify(expected, None, f"{name}: config {config_path}")
    config = ImageConfig.parse(config_bytes, f"{name}: config {config_path}")
    if len(config.diff_ids) != len(layer_paths):
        raise SourceError(
            f"{name}: {len(layer_paths)} layer files but {len(config.diff_ids)} diff_ids in config"
        )
    check_platform(config, platform, name)
    if cache is not None:
        cache.put_blob_bytes(config_digest, config_bytes, "config")
    layers = []
    for lp in layer_paths:
        if not isinstance(lp, str) or not files.exists(lp):
            raise SourceError(f"{name}: layer file {lp!r} is missing from the archive")
        digest = "sha256:" + lp[len(BLOB_PREFIX) :] if lp.startswith(BLOB_PREFIX) else ""
        size = files.members[lp.lstrip("/")][1] if lp.lstrip("/") in files.members else 0
        desc = Descriptor(DOCKER_LAYER_TAR, digest, size, {"path": lp})
        layers.append(desc)

    def open_blob(desc: Descriptor) -> BinaryIO:
        return files.open(desc.annotations["path"])

    return Image(
        name=name,
        digest=config_digest,
        config_digest=config_digest,
        config=config,
        layers=layers,
        platform=normalize_platform(config.platform),
        open_blob=open_blob,
        close=files.close,
    )
