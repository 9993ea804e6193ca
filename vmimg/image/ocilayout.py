"""Writing OCI image layouts: used for the built-in sample image and by tests.

Small and in memory on purpose: it makes images from layer tars that fit in
memory (samples, fixtures), not real-world images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import zstandard
from isal import isal_zlib

from vmimg.digest import digest_bytes
from vmimg.image.oci import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Platform

LAYER_MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
GZIP_WBITS = 31
ISAL_LEVEL = 2  # isal levels run 0..3
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        c = isal_zlib.compressobj(ISAL_LEVEL, isal_zlib.DEFLATED, GZIP_WBITS)
        return bytes(c.compress(data) + c.flush())
    if compression == "zstd":
        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return data


@dataclass
class LayerSpec:
    tar: bytes
    compression: str = "gzip"
    media_type: str | None = None  # override, to make lying manifests in tests


@dataclass
class ImageSpec:
    layers: list[LayerSpec]
    config: dict[str, Any] = field(default_factory=dict)  # the "config" object (Cmd, Env...)
    platform: Platform = field(default_factory=Platform)
    created: str = "1970-01-01T00:00:00Z"


def _put_blob(root: str, data: bytes) -> str:
    digest = digest_bytes(data)
    path = os.path.join(root, "blobs", "sha256", digest.split(":", 1)[1])
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return digest


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def add_image(root: str, spec: ImageSpec) -> dict[str, Any]:
    """Write an image's blobs into a layout; return its manifest descriptor (no index entry)."""
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    layer_descs = []
    diff_ids = []
    for layer in spec.layers:
        blob = compress(layer.tar, layer.compression)
        layer_descs.append(
            {
                "mediaType": layer.media_type or LAYER_MEDIA_TYPES[layer.compression],
                "digest": _put_blob(root, blob),
                "size": len(blob),
            }
        )
        diff_ids.append("sha256:" + hashlib.sha256(layer.tar).hexdigest())
    config = {
        "created": spec.created,
        "architecture": spec.platform.architecture,
        "os": spec.platform.os,
        "config": spec.config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": spec.created, "created_by": "vmimg"} for _ in spec.layers],
    }
    if spec.platform.variant:
        config["variant"] = spec.platform.variant
    config_bytes = _dumps(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _put_blob(root, config_bytes),
            "size": len(config_bytes),
        },
        "layers": layer_descs,
    }
    manifest_bytes = _dumps(manifest)
    plat = {"os": spec.platform.os, "architecture": spec.platform.architecture}
    if spec.platform.variant:
        plat["variant"] = spec.platform.variant
    return {
        "mediaType": OCI_MANIFEST,
        "digest": _put_blob(root, manifest_bytes),
        "size": len(manifest_bytes),
        "platform": plat,
    }


def write_layout(root: str, images: dict[str, ImageSpec | list[ImageSpec]]) -> dict[str, str]:
    """Write an OCI layout with one entry per tag; a list makes a multi-platform index.

    Returns the digest of each tag's manifest (or index).
    """
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(root, "oci-layout"), "wb") as f:
        f.write(_dumps(LAYOUT_VERSION))
    entries = []
    digests = {}
    for tag, spec in sorted(images.items()):
        if isinstance(spec, list):
            index = {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [add_image(root, s) for s in spec],
            }
            data = _dumps(index)
            desc: dict[str, Any] = {
                "mediaType": OCI_INDEX,
                "digest": _put_blob(root, data),
                "size": len(data),
            }
        else:
            desc = add_image(root, spec)
            desc.pop("platform")
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
        entries.append(desc)
        digests[tag] = desc["digest"]
    with open(os.path.join(root, "index.json"), "wb") as f:
        f.write(_dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
    return digests
