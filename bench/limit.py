"""The physical limit of a cold conversion: the work no converter can skip.

    python -m bench.limit LAYOUT_DIR TAG IMAGE_BYTES OUT

Every layer of the image TAG in the OCI layout LAYOUT_DIR is decompressed to nowhere (isal
for gzip, zstandard for zstd) while sha256 runs over its compressed and its decompressed
stream, one after the other in one thread; then IMAGE_BYTES (what the converted image really
occupies) are written to OUT, without fsync, as vmimg writes its output. bench.run times this
as a contender, in the same run as the conversions it bounds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from typing import IO, Any

import zstandard
from isal import igzip

CHUNK = 1 << 20
GZIP_SUFFIX = "gzip"
ZSTD_SUFFIX = "zstd"


def _blob(root: str, digest: str) -> IO[bytes]:
    return open(os.path.join(root, "blobs", *digest.split(":", 1)), "rb")


def layers(root: str, tag: str) -> list[dict[str, Any]]:
    """The layer descriptors of the manifest tagged ``tag``."""
    with open(os.path.join(root, "index.json")) as f:
        index = json.load(f)
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            with _blob(root, desc["digest"]) as f:
                return list(json.load(f)["layers"])
    raise SystemExit(f"bench.limit: no manifest tagged {tag!r} in {root}")


class _Hashing(io.RawIOBase):
    """A read-only file that hashes what is read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self.f, self.sha = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.f.read(len(view))
        view[: len(data)] = data
        self.sha.update(data)
        return len(data)


def decompress_and_hash(root: str, layer: dict[str, Any]) -> tuple[str, str]:
    """Decompress one layer to nowhere; the sha256 of its compressed and decompressed bytes."""
    with _blob(root, layer["digest"]) as raw:
        compressed = _Hashing(raw)
        media = str(layer["mediaType"])
        reader: Any
        if media.endswith(GZIP_SUFFIX):
            reader = igzip.IGzipFile(fileobj=compressed)
        elif media.endswith(ZSTD_SUFFIX):
            reader = zstandard.ZstdDecompressor().stream_reader(compressed)
        else:
            reader = compressed
        plain = hashlib.sha256()
        while chunk := reader.read(CHUNK):
            plain.update(chunk)
        while compressed.read(CHUNK):  # the trailer the decompressor did not need
            pass
    return compressed.sha.hexdigest(), plain.hexdigest()


def write_bytes(out: str, count: int) -> None:
    zeros = bytes(CHUNK)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = count
        while left > 0:
            left -= os.write(fd, zeros[: min(left, CHUNK)])
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root, tag, count, out = argv
    for layer in layers(root, tag):
        decompress_and_hash(root, layer)
    write_bytes(out, int(count))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
