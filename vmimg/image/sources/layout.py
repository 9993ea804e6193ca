"""oci:PATH[:TAG] and oci-archive:PATH[:TAG] — OCI image layouts, as a directory or a tar.

Both are read in place: a blob in an archive is a byte range of the tar file,
so nothing is unpacked to read it.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import BinaryIO, Protocol

from vmimg.digest import split_digest
from vmimg.errors import ImageRefError, PlatformError, SourceError
from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.oci import MAX_DOCUMENT_BYTES, Descriptor, Platform, load_json
from vmimg.image.reference import ImageRef
from vmimg.image.sources.base import read_document, resolve_image
from vmimg.image.sources.options import SourceOptions

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"


class Files(Protocol):
    """Read-only access to files by relative path, in a directory or a tar."""

    def open(self, path: str) -> BinaryIO: ...

    def exists(self, path: str) -> bool: ...

    def close(self) -> None: ...


class DirFiles:
    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise ImageRefError(f"no such directory: {root}")
        self.root = root

    def open(self, path: str) -> BinaryIO:
        try:
            return open(os.path.join(self.root, path), "rb")
        except OSError as e:
            raise SourceError(f"{self.root}: cannot read {path}: {e.strerror}") from None

    def exists(self, path: str) -> bool:
        return os.path.isfile(os.path.join(self.root, path))

    def close(self) -> None:
        pass


class _Section(io.RawIOBase):
    """A read-only window [start, start+size) of a file."""

    def __init__(self, path: str, start: int, size: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._start = start
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class TarFiles:
    """Files inside an (uncompressed) tar, located once by scanning its headers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for info in tf:
                    if info.isfile():
                        name = os.path.normpath(info.name).lstrip("/")
                        self.members[name] = (info.offset_data, info.size)
        except FileNotFoundError:
            raise ImageRefError(f"no such file: {path}") from None
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"{path}: not a readable tar archive: {e}") from None

    def open(self, path: str) -> BinaryIO:
        key = os.path.normpath(path).lstrip("/")
        if key not in self.members:
            raise SourceError(f"{self.path}: has no {path}")
        start, size = self.members[key]
        return io.BufferedReader(_Section(self.path, start, size))

    def exists(self, path: str) -> bool:
        return os.path.normpath(path).lstrip("/") in self.members

    def close(self) -> None:
        pass


def blob_path(digest: str) -> str:
    algo, hexd = split_digest(digest)
    return f"blobs/{algo}/{hexd}"


def read_small(files: Files, path: str) -> bytes:
    """A small file with no descriptor (index.json, manifest.json), refused past 4 MiB."""
    with files.open(path) as f:
        data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise SourceError(f"{path} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB; refusing it")
    return data


def open_ref(ref: ImageRef, cache: Cache, options: SourceOptions) -> Image:
    """An oci: or oci-archive: reference (the transport table's entry point)."""
    assert ref.path is not None
    files: Files = (
        DirFiles(ref.path) if ref.transport == "oci" else TarFiles(archive_file(ref.path))
    )
    return open_layout_image(files, str(ref), ref.tag, options.platform, cache)


def archive_file(path: str) -> str:
    """`path`, if it is a file (an archive); else the error saying so."""
    if not os.path.isfile(path):
        raise ImageRefError(f"no such file: {path}")
    return path


def _annotation(entry: object, key: str) -> str:
    """An index entry's annotation `key` ("" if it has none, or the entry is malformed: the
    entry itself is checked when it is chosen)."""
    annotations = entry.get("annotations") if isinstance(entry, dict) else None
    value = annotations.get(key) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else ""


def _tags(manifests: list[object]) -> list[str]:
    """The tags (ref names) the index's entries carry, in its order."""
    tags: list[str] = []
    for entry in manifests:
        tag = _annotation(entry, REF_NAME_ANNOTATION)
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def open_layout_image(
    files: Files, name: str, tag: str | None, platform: Platform, cache: Cache | None
) -> Image:
    if not files.exists("index.json"):
        raise SourceError(f"{name}: not an OCI layout (no index.json)")
    index_bytes = read_small(files, "index.json")
    index = load_json(index_bytes, f"{name} index.json")
    manifests = index.get("manifests") or []
    if not isinstance(manifests, list):
        raise SourceError(f"{name} index.json: manifests is not a list")
    chosen = None
    if tag:
        for i, d in enumerate(manifests):
            if _annotation(d, REF_NAME_ANNOTATION) == tag or _annotation(
                d, CONTAINERD_NAME_ANNOTATION
            ).endswith(f":{tag}"):
                chosen = Descriptor.from_json(d, f"{name} index.json manifests[{i}]")
                break
        if chosen is None:
            raise ImageRefError(f"{name}: no image tagged {tag!r}")
    elif len(manifests) == 1:
        chosen = Descriptor.from_json(manifests[0], f"{name} index.json manifests[0]")

    def open_blob(desc: Descriptor) -> BinaryIO:
        return files.open(blob_path(desc.digest))

    if chosen is None:
        # Several images and no tag: index.json itself is the platform index.
        try:
            image = resolve_image(name, index_bytes, None, open_blob, platform, None)
        except PlatformError as e:
            tags = _tags(manifests)
            if not tags:
                raise
            raise PlatformError(
                f"{e}; its images are tagged {', '.join(tags)}: name one, as {name}:{tags[0]}"
            ) from None
    else:
        # Checked against the entry's size and digest like every other blob.
        root = read_document(open_blob, chosen, None, "manifest")
        image = resolve_image(
            name, root, chosen.media_type, open_blob, platform, cache, chosen.digest
        )
    image.close = files.close
    return image
