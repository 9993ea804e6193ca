"""What every image source produces: an `Image`, and how to read its blobs.

A source only has to answer two questions: "what is the root document (a
manifest or an index)?" and "give me the blob with this descriptor". The
resolution from there (index -> platform's manifest -> config) is shared, so
every transport checks digests and platforms the same way.
"""

from __future__ import annotations

from vmimg.digest import Hasher, digest_bytes, split_digest
from vmimg.errors import DigestError, PlatformError, SourceError
from vmimg.image.cache import Cache
from vmimg.image.image import BlobOpener, Image
from vmimg.image.oci import (
    INDEX_TYPES,
    MAX_DOCUMENT_BYTES,
    Descriptor,
    ImageConfig,
    Manifest,
    Platform,
    load_json,
    normalize_platform,
    select_platform,
    sniff_media_type,
)


def read_document(open_blob: BlobOpener, desc: Descriptor, cache: Cache | None, what: str) -> bytes:
    """A small blob (manifest, index, config), verified, via the cache when there is one."""
    if desc.size > MAX_DOCUMENT_BYTES:
        raise SourceError(f"{what} {desc.digest} claims {desc.size} bytes; refusing")
    if cache is None:
        return _fetch_document(open_blob, desc, cache, what)
    cached = cache.read_blob(desc.digest)
    if cached is not None:
        return _check_size(cached, desc, what)
    with cache.lock(f"blob-{desc.digest}"):  # concurrent pulls fetch it once
        cached = cache.read_blob(desc.digest)
        if cached is not None:
            return _check_size(cached, desc, what)
        return _fetch_document(open_blob, desc, cache, what)


def _check_size(data: bytes, desc: Descriptor, what: str) -> bytes:
    """A cached blob has the right digest; a descriptor naming it may still lie about its size."""
    if len(data) != desc.size:
        raise DigestError(
            f"{what} {desc.digest}: size {len(data)} does not match the expected {desc.size}"
        )
    return data


def _fetch_document(
    open_blob: BlobOpener, desc: Descriptor, cache: Cache | None, what: str
) -> bytes:
    with open_blob(desc) as f:
        data = f.read(desc.size + 1)
    algo, _hex = split_digest(desc.digest)
    h = Hasher(algo)
    h.update(data)
    h.verify(desc.digest, desc.size, f"{what} {desc.digest}")
    if cache is not None:
        cache.put_blob_bytes(desc.digest, data, what)
    return data


def resolve_image(
    name: str,
    root: bytes,
    root_media_type: str | None,
    open_blob: BlobOpener,
    want: Platform,
    cache: Cache | None,
    root_digest: str | None = None,
) -> Image:
    """Follow an index to the platform's manifest, read the config, check it all."""
    where = name
    if root_digest:
        got = digest_bytes(root, split_digest(root_digest)[0])
        if got != root_digest:
            raise DigestError(f"manifest of {where}: content is {got}, expected {root_digest}")
    obj = load_json(root, f"manifest of {where}")
    media_type = sniff_media_type(obj, root_media_type)
    digest = root_digest or digest_bytes(root)
    if media_type in INDEX_TYPES:
        desc = select_platform(obj, want, where)
        data = read_document(open_blob, desc, cache, "manifest")
        obj = load_json(data, f"manifest {desc.digest}")
        media_type = sniff_media_type(obj, desc.media_type)
        if media_type in INDEX_TYPES:
            raise SourceError(f"{where}: nested index {desc.digest} is not supported")
        digest = desc.digest
    manifest = Manifest.parse(obj, media_type, f"manifest {digest}")
    config_bytes = read_document(open_blob, manifest.config, cache, "config")
    config = ImageConfig.parse(config_bytes, f"config {manifest.config.digest}")
    if len(config.diff_ids) != len(manifest.layers):
        raise SourceError(
            f"manifest {digest} lists {len(manifest.layers)} layers but its config has "
            f"{len(config.diff_ids)} diff_ids"
        )
    check_platform(config, want, where)
    return Image(
        name=name,
        digest=digest,
        config_digest=manifest.config.digest,
        config=config,
        layers=manifest.layers,
        platform=normalize_platform(config.platform),
        open_blob=open_blob,
        manifest=obj,
    )


def check_platform(config: ImageConfig, want: Platform, where: str) -> None:
    have = normalize_platform(config.platform)
    if (have.os, have.architecture) != (want.os, want.architecture):
        raise PlatformError(f"{where} is for {have}, not {want}")
