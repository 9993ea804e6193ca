"""docker://HOST/REPO:TAG — an image in a registry, over the OCI distribution API."""

from __future__ import annotations

import io
from typing import BinaryIO

from vmimg.digest import digest_bytes
from vmimg.errors import DigestError, ImageRefError
from vmimg.image.cache import Cache
from vmimg.image.credentials import api_host
from vmimg.image.image import Image
from vmimg.image.oci import ACCEPT_MANIFESTS, INDEX_TYPES, MANIFEST_TYPES, Descriptor
from vmimg.image.reference import ImageRef, RegistryRef
from vmimg.image.registry import RegistryClient, quiet_insecure_warnings
from vmimg.image.sources.base import resolve_image
from vmimg.image.sources.options import SourceOptions

HTTP_NOT_FOUND = 404


def get_manifest(
    client: RegistryClient, repo: str, reference: str, accept: str
) -> tuple[bytes, str]:
    """A manifest's bytes and declared Content-Type; a 404 (no such repository, tag or
    digest) is a missing image, which the user fixes in the reference (exit 3), not a
    failing source."""
    where = f"{client.host}/{repo}{'@' if ':' in reference else ':'}{reference}"
    resp = client.request(
        "GET",
        f"/v2/{repo}/manifests/{reference}",
        headers={"Accept": accept},
        what=f"manifest {where}",
        ok=(200, HTTP_NOT_FOUND),
    )
    if resp.status_code == HTTP_NOT_FOUND:
        resp.close()
        raise ImageRefError(f"{where}: no such image or tag in the registry")
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
    return resp.content, ctype


def registry_client(host: str, options: SourceOptions) -> RegistryClient:
    """A client for `host` with the options' TLS settings and auth file; --creds
    only when they were given for this host."""
    creds = options.creds
    if options.creds_host is None or api_host(options.creds_host) != api_host(host):
        creds = None
    if not options.tls_verify:
        quiet_insecure_warnings()
    return RegistryClient(
        host,
        insecure_hosts=options.insecure_hosts,
        ca_cert=options.ca_cert,
        credentials=creds,
        tls_verify=options.tls_verify,
        authfile=options.authfile,
    )


def open_ref(ref: ImageRef, cache: Cache, options: SourceOptions) -> Image:
    """A docker:// reference (the transport table's entry point)."""
    assert ref.registry is not None
    return open_registry_image(ref.registry, cache, options)


def open_registry_image(ref: RegistryRef, cache: Cache | None, options: SourceOptions) -> Image:
    client = registry_client(ref.registry, options)
    root = cache.read_blob(ref.digest) if (cache is not None and ref.digest) else None
    if root is not None:
        return _image(client, ref, root, None, cache, options)
    root, media_type = get_manifest(client, ref.repository, ref.reference, ACCEPT_MANIFESTS)
    return image_from_manifest(client, ref, root, media_type, cache, options)


def image_from_manifest(
    client: RegistryClient,
    ref: RegistryRef,
    root: bytes,
    media_type: str,
    cache: Cache | None,
    options: SourceOptions,
) -> Image:
    """The image whose manifest or index `root` was just fetched for `ref` with `client`:
    checked against the digest `ref` pins, and kept in the cache."""
    got = digest_bytes(root, ref.digest.split(":", 1)[0] if ref.digest else "sha256")
    if ref.digest and got != ref.digest:
        raise DigestError(f"manifest {ref}: registry sent {got}")
    if cache is not None:
        # Kept so that a later pull by digest needs no request at all.
        cache.put_blob_bytes(got, root, "manifest")
    return _image(client, ref, root, media_type, cache, options)


def _image(
    client: RegistryClient,
    ref: RegistryRef,
    root: bytes,
    media_type: str | None,
    cache: Cache | None,
    options: SourceOptions,
) -> Image:
    def open_blob(desc: Descriptor) -> BinaryIO:
        if desc.media_type in MANIFEST_TYPES + INDEX_TYPES:
            # An index's entries are manifests: registries serve them only from the
            # manifests endpoint, never as blobs. resolve_image checks digest and size.
            data, _ = get_manifest(client, ref.repository, desc.digest, ACCEPT_MANIFESTS)
            return io.BytesIO(data)
        return client.open_blob(ref.repository, desc.digest)  # type: ignore[return-value]

    return resolve_image(str(ref), root, media_type, open_blob, options.platform, cache, ref.digest)
