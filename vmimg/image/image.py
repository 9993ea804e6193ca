"""`Image`: what every image source produces, whatever the transport.

An Image is a resolved image: its identity (the reference as written, the manifest and
config digests), its config, its layers' descriptors and platform, and a way to read its
blobs. It holds open what its source needs (an archive, a connection): use it as a context
manager, `with open_image(...) as image:`, so that is closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from vmimg.image.oci import Descriptor, ImageConfig, Platform

BlobOpener = Callable[[Descriptor], BinaryIO]


@dataclass
class Image:
    """A resolved image: its identity, config and layers, and a way to read them."""

    name: str  # the reference as the user wrote it
    digest: str  # manifest digest (config digest where there is no manifest)
    config_digest: str
    config: ImageConfig
    layers: list[Descriptor]
    platform: Platform
    open_blob: BlobOpener
    manifest: dict[str, object] | None = None
    close: Callable[[], None] = lambda: None

    @property
    def diff_ids(self) -> list[str]:
        return self.config.diff_ids

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
