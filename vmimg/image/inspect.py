"""`vmimg inspect`: what an image is, without converting it."""

from __future__ import annotations

import json
from typing import Any

from vmimg.image.image import Image


def describe(image: Image) -> dict[str, Any]:
    """What `vmimg inspect` shows of an image (its JSON form)."""
    return {
        "name": image.name,
        "digest": image.digest,
        "config_digest": image.config_digest,
        "platform": str(image.platform),
        "config": {
            key: image.config.config.get(key)
            for key in ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "ExposedPorts")
        },
        "layers": [
            {
                "digest": desc.digest,
                "diff_id": diff_id,
                "size": desc.size,
                "mediaType": desc.media_type,
            }
            for desc, diff_id in zip(image.layers, image.diff_ids, strict=True)
        ],
    }


def raw_manifest(image: Image) -> bytes:
    """The image's manifest as JSON (`vmimg inspect --raw`); an image from a docker-archive
    or an engine has none (only a config), so its config is shown instead."""
    doc = image.manifest if image.manifest is not None else image.config.raw
    return json.dumps(doc, indent=2).encode() + b"\n"
