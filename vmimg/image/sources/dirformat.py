"""dir:PATH — skopeo's directory format (containers-transports(5), `skopeo copy ... dir:PATH`).

The directory holds `version` ("Directory Transport Version: 1.x"), `manifest.json` (the
image's manifest, or with `--all` an index whose manifests are `HEX.manifest.json`), and
every other blob as a file named by the hex of its sha256 digest. Everything is read in
place and checked against its digest, as every source's blobs are.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from vmimg.digest import split_digest
from vmimg.errors import ImageRefError, SourceError
from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Platform
from vmimg.image.reference import ImageRef
from vmimg.image.sources.base import resolve_image
from vmimg.image.sources.layout import DirFiles, read_small
from vmimg.image.sources.options import SourceOptions

VERSION_FILE = "version"
VERSION_PREFIX = b"Directory Transport Version: 1."
MANIFEST_FILE = "manifest.json"
INSTANCE_SUFFIX = ".manifest.json"  # a platform's manifest when manifest.json is an index


def _blob_name(desc: Descriptor) -> str:
    algo, hexd = split_digest(desc.digest)
    if algo != "sha256":
        raise SourceError(f"blob {desc.digest}: the dir: format names only sha256 blobs")
    if desc.media_type in INDEX_TYPES or desc.media_type in MANIFEST_TYPES:
        return hexd + INSTANCE_SUFFIX
    return hexd


def open_ref(ref: ImageRef, cache: Cache, options: SourceOptions) -> Image:
    """A dir: reference (the transport table's entry point)."""
    assert ref.path is not None
    return open_dir_image(ref.path, str(ref), options.platform, cache)


def open_dir_image(path: str, name: str, platform: Platform, cache: Cache | None) -> Image:
    if not os.path.isdir(path):
        raise ImageRefError(f"no such directory: {path}")
    files = DirFiles(path)
    if not files.exists(MANIFEST_FILE):
        raise SourceError(f"{name}: not a dir: image (no {MANIFEST_FILE})")
    version = read_small(files, VERSION_FILE) if files.exists(VERSION_FILE) else b""
    if not version.startswith(VERSION_PREFIX):
        raise SourceError(f"{name}: not a dir: image ({VERSION_FILE} is not version 1.x)")
    root = read_small(files, MANIFEST_FILE)

    def open_blob(desc: Descriptor) -> BinaryIO:
        blob = _blob_name(desc)
        if not files.exists(blob) and blob.endswith(INSTANCE_SUFFIX):
            blob = blob[: -len(INSTANCE_SUFFIX)]  # a manifest copied as a plain blob
        return files.open(blob)

    image = resolve_image(name, root, None, open_blob, platform, cache)
    image.close = files.close
    return image
