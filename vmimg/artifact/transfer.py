"""The generic half of OCI artifacts: push a config and files as one manifest, pull one back.

    push:  files -> (hash, maybe compress) -> HEAD, upload what is missing
           -> manifest PUT -> referrers fallback tag if the registry has no API
    pull:  manifest -> every blob streamed, digest and size checked, decompressed,
           uncompressed digest checked -> files in a directory

Each file is one layer named by an `org.opencontainers.image.title` annotation (so
`oras pull` writes the files back by name); big files are zstd-compressed where that pays.
The formats on top (bundle.py, kernel.py) say which files, which media types, and what a
pulled artifact must hold. docs/artifact.md describes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard

from vmimg.digest import Hasher, split_digest
from vmimg.errors import (
    DigestError,
    ImageRefError,
    SourceError,
    UsageError,
)
from vmimg.image.cache import Cache
from vmimg.image.fetch import BYTES, PhaseStart, Progress
from vmimg.image.oci import (
    ACCEPT_MANIFESTS,
    INDEX_TYPES,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    host_platform,
    load_json,
    select_platform,
)
from vmimg.image.reference import RegistryRef, parse_reference
from vmimg.image.registry import RegistryClient, digest_of
from vmimg.image.sources import SourceOptions
from vmimg.image.sources.registry import get_manifest, registry_client

ZSTD_SUFFIX = "+zstd"  # appended to a layer media type whose blob is zstd-compressed


ZSTD_EXT = ".zst"  # appended to the title of such a layer, so the name says what it holds


TITLE = "org.opencontainers.image.title"


ANN_UNCOMPRESSED_DIGEST = "vmimg.uncompressed.digest"


ANN_UNCOMPRESSED_SIZE = "vmimg.uncompressed.size"


ANN_MODE = "vmimg.file.mode"


ANN_PLATFORM = "vmimg.platform"


ANN_KERNEL_VERSION = "vmimg.kernel.version"


ANN_VERSION = "vmimg.version"


# Compression policy: zstd level 3 in multi-threaded mode. zstd's output with one
# or more workers does not depend on their number, so the same file gives the same
# blob on any machine (and a second push finds it in the registry).
ZSTD_LEVEL = 3


ZSTD_THREADS = -1  # one worker per CPU


MIN_COMPRESS_SIZE = 64 << 10


KEEP_RATIO = 0.9  # keep the compressed blob only if it is at most 90% of the file


# Before compressing a big file, a few samples compressed fast tell whether it is
# already compressed (lz4 erofs, random data): then it goes up as it is.
SAMPLES = 4


SAMPLE_BYTES = 1 << 20


SAMPLE_LEVEL = 1


SAMPLE_RATIO = 0.95


IO_CHUNK = 1 << 20


MAX_CONFIG_BYTES = 4 << 20


MAX_LAYERS = 256


MEMO_DIR = "artifacts/zstd"
PULLED_FILE_MODE = 0o666  # less the umask; never executable
UPLOAD_PHASE = "uploading"
DOWNLOAD_PHASE = "downloading"


@dataclass
class PushResult:
    reference: str  # HOST/REPO:TAG as pushed
    digest: str  # the manifest's digest
    artifact_type: str
    subject: str | None  # the digest the artifact refers to, if any
    referrers: str  # how it is discoverable: "api", "fallback-tag" or "none"
    uploaded: int  # blobs sent
    skipped: int  # blobs the registry already had
    bytes_uploaded: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def pinned(self) -> str:
        """HOST/REPO@DIGEST: the reference that cannot move."""
        base = self.reference.rsplit("@", 1)[0]
        slash = base.rfind("/")
        if ":" in base[slash + 1 :]:
            base = base[: base.rfind(":")]
        return f"{base}@{self.digest}"


@dataclass
class PullResult:
    reference: str  # HOST/REPO@DIGEST that was pulled
    directory: str
    files: dict[str, dict[str, Any]]  # path -> {"sha256", "size"}
    bytes_downloaded: int
    seconds: float
    cached: bool = False


@dataclass
class Layer:
    """One file prepared for upload: its descriptor and where its blob's bytes are."""

    descriptor: Descriptor
    blob_path: str | None  # None: the registry already has the (compressed) blob


@dataclass(frozen=True)
class Target:
    client: RegistryClient
    ref: RegistryRef
    platform: Platform | None = None  # which entry of a multi-platform index to take

    @property
    def repo(self) -> str:
        return self.ref.repository

    def pinned(self, digest: str) -> str:
        return f"{self.ref.registry}/{self.ref.repository}@{digest}"


def target_for(ref: str, options: SourceOptions) -> Target:
    """A registry reference (docker://HOST/REPO:TAG or HOST/REPO:TAG) and its client."""
    parsed = parse_reference(ref)
    if parsed.transport != "docker" or parsed.registry is None:
        raise ImageRefError(f"{ref} is not a registry reference (HOST/REPO:TAG)")
    client = registry_client(parsed.registry.registry, options)
    return Target(client, parsed.registry, options.platform)


class _HashingReader:
    """Wraps a readable, hashing and counting what passes, refusing to pass `limit` bytes."""

    def __init__(
        self, f: Any, hasher: Hasher, limit: int | None = None, progress: Progress | None = None
    ) -> None:
        self._f = f
        self.hasher = hasher
        self.limit = limit
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)
        self.hasher.update(data)
        if self.progress is not None:
            self.progress(len(data))
        if self.limit is not None and self.hasher.size > self.limit:
            raise DigestError(f"more than the expected {self.limit} bytes")
        return data


def _hash_file(path: str) -> tuple[str, int]:
    h = Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(IO_CHUNK):
            h.update(chunk)
    return h.digest, h.size


def _compress(src: str, dest: str, progress: Progress | None = None) -> tuple[str, int, str, int]:
    """zstd-compress `src` into `dest`: (compressed digest, size, plain digest, size)."""
    plain, packed = Hasher(), Hasher()
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS, write_content_size=True)
    size = os.path.getsize(src)
    with (
        open(src, "rb") as fin,
        open(dest, "wb") as fout,
        cctx.stream_writer(fout, size=size, closefd=False) as writer,
    ):
        while chunk := fin.read(IO_CHUNK):
            plain.update(chunk)
            writer.write(chunk)
            if progress is not None:
                progress(len(chunk))
    with open(dest, "rb") as f:  # hashed on a second read: stream_writer hides its output
        while chunk := f.read(IO_CHUNK):
            packed.update(chunk)
    return packed.digest, packed.size, plain.digest, plain.size


class CompressionMemo:
    """What compressing a file gave last time, by the file's digest: lets a second push
    find its compressed blob in the registry without compressing again."""

    def __init__(self, cache: Cache) -> None:
        self.dir = os.path.join(cache.root, MEMO_DIR)

    def _path(self, plain_digest: str) -> str:
        _algo, hexd = split_digest(plain_digest)
        return os.path.join(self.dir, f"{hexd}-l{ZSTD_LEVEL}-mt")

    def get(self, plain_digest: str) -> tuple[str, int] | None:
        """(compressed digest, size), or ("", 0) when compression did not pay, or None."""
        try:
            with open(self._path(plain_digest)) as f:
                digest, size = f.read().split()
            return ("", 0) if digest == "none" else (digest, int(size))
        except (OSError, ValueError):
            return None

    def put(self, plain_digest: str, digest: str, size: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        path = self._path(plain_digest)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{digest or 'none'} {size}\n")
        os.replace(tmp, path)


def _looks_compressible(path: str, size: int) -> bool:
    """Whether evenly spaced samples of the file shrink under fast zstd."""
    if size <= SAMPLES * SAMPLE_BYTES * 2:
        return True  # small enough to simply try
    cctx = zstandard.ZstdCompressor(level=SAMPLE_LEVEL)
    plain = packed = 0
    with open(path, "rb") as f:
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            data = f.read(SAMPLE_BYTES)
            plain += len(data)
            packed += len(cctx.compress(data))
    return packed <= plain * SAMPLE_RATIO


def _mode_text(path: str) -> str:
    return f"{stat.S_IMODE(os.stat(path).st_mode):04o}"


def prepare_layer(
    target: Target,
    path: str,
    name: str,
    media_type: str,
    work: str,
    memo: CompressionMemo,
    compress: bool = True,
    phases: PhaseStart | None = None,
) -> Layer:
    """The layer for one file: compressed when big and compressible, else as it is."""
    plain_digest, plain_size = _hash_file(path)
    annotations = {TITLE: name, ANN_MODE: _mode_text(path)}
    plain = Layer(Descriptor(media_type, plain_digest, plain_size, annotations), path)
    if plain_size < MIN_COMPRESS_SIZE or not compress:
        return plain
    packed_ann = {
        **annotations,
        TITLE: name + ZSTD_EXT,
        ANN_UNCOMPRESSED_DIGEST: plain_digest,
        ANN_UNCOMPRESSED_SIZE: str(plain_size),
    }
    known = memo.get(plain_digest)
    if known == ("", 0):
        return plain
    if known and target.client.blob_exists(target.repo, known[0]):
        return Layer(Descriptor(media_type + ZSTD_SUFFIX, known[0], known[1], packed_ann), None)
    if not _looks_compressible(path, plain_size):
        memo.put(plain_digest, "", 0)
        return plain
    dest = os.path.join(work, plain_digest.split(":", 1)[1] + ZSTD_EXT)
    progress = phases(f"compressing {name}", plain_size, BYTES) if phases else None
    digest, size, again, _n = _compress(path, dest, progress)
    if again != plain_digest:
        raise UsageError(f"{path} changed while it was being pushed")
    if size > plain_size * KEEP_RATIO:
        memo.put(plain_digest, "", 0)
        os.unlink(dest)
        return plain
    memo.put(plain_digest, digest, size)
    return Layer(Descriptor(media_type + ZSTD_SUFFIX, digest, size, packed_ann), dest)


def _manifest_doc(
    artifact_type: str,
    config: Descriptor,
    layers: list[Descriptor],
    subject: Descriptor | None,
    annotations: dict[str, str],
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    if subject is not None:
        doc["subject"] = subject.to_json()
    doc["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(doc, separators=(",", ":")).encode()


def push_artifact(
    target: Target,
    artifact_type: str,
    config: Layer,
    layers: list[Layer],
    subject: Descriptor | None,
    annotations: dict[str, str],
    start: float,
    warnings: list[str],
    phases: PhaseStart | None = None,
) -> PushResult:
    uploaded = skipped = sent = 0
    unique = list({x.descriptor.digest: x for x in [config, *layers]}.values())
    todo = [x for x in unique if x.blob_path is not None]
    progress = None
    if phases is not None and todo:
        progress = phases(UPLOAD_PHASE, sum(x.descriptor.size for x in todo), BYTES)
    for item in unique:
        d = item.descriptor
        if item.blob_path is None:
            skipped += 1
            continue
        if target.client.upload_blob(target.repo, item.blob_path, d.digest, d.size):
            uploaded += 1
            sent += d.size
        else:
            skipped += 1
        if progress is not None:  # blob by blob: the registry client streams it whole
            progress(d.size)
    descs = [x.descriptor for x in layers]
    data = _manifest_doc(artifact_type, config.descriptor, descs, subject, annotations)
    tag = target.ref.tag or target.ref.digest or "latest"
    if target.ref.digest and target.ref.digest != digest_of(data):
        raise UsageError(f"cannot push to {target.ref}: the manifest's digest is {digest_of(data)}")
    put = target.client.put_manifest(target.repo, tag, data, OCI_MANIFEST)
    referrers = "none"
    if subject is not None:
        referrers = "api"
        if put.subject is None:  # no referrers API: maintain the fallback tag ourselves
            entry = Descriptor(
                OCI_MANIFEST, put.digest, len(data), annotations, None, artifact_type
            )
            target.client.add_to_fallback_index(target.repo, subject.digest, entry)
            referrers = "fallback-tag"
    return PushResult(
        reference=str(target.ref),
        digest=put.digest,
        artifact_type=artifact_type,
        subject=subject.digest if subject else None,
        referrers=referrers,
        uploaded=uploaded,
        skipped=skipped,
        bytes_uploaded=sent,
        seconds=time.monotonic() - start,
        warnings=warnings,
    )


def layer_file_name(desc: Descriptor) -> str:
    """The file a layer holds: its title, less the .zst of a compressed layer."""
    title = desc.annotations.get(TITLE, "")
    return title.removesuffix(ZSTD_EXT) if desc.media_type.endswith(ZSTD_SUFFIX) else title


def safe_path(title: str, where: str) -> str:
    """A layer title as a relative path that stays inside the output directory."""
    parts = title.split("/")
    if (
        not title
        or "\0" in title
        or "\\" in title
        or any(p in ("", ".", "..") for p in parts)
        or len(parts) > 2
    ):
        raise SourceError(f"{where}: unacceptable file name {title!r}")
    return title


@dataclass(frozen=True)
class Artifact:
    digest: str
    artifact_type: str
    config: Descriptor
    layers: list[Descriptor]
    raw: dict[str, Any]


def fetch_manifest(target: Target) -> tuple[bytes, str]:
    """The bytes and declared media type of the manifest (or index) at the target reference."""
    return get_manifest(
        target.client, target.repo, target.ref.reference, f"{OCI_MANIFEST}, {ACCEPT_MANIFESTS}"
    )


def get_artifact(
    target: Target,
    expected_type: str,
    config_type: str,
    fetched: tuple[bytes, str] | None = None,
) -> Artifact:
    """The artifact manifest at the target reference, checked to be of `expected_type`;
    `fetched`: that manifest as fetch_manifest returned it already."""
    where = str(target.ref)
    data, ctype = fetched or fetch_manifest(target)
    digest = digest_of(data)
    if target.ref.digest and digest != target.ref.digest:
        raise DigestError(f"manifest {where}: registry sent {digest}")
    obj = load_json(data, f"manifest {where}")
    if ctype in INDEX_TYPES or "manifests" in obj:
        if obj.get("artifactType") != expected_type:
            raise SourceError(f"{where} is an index, not a vmimg artifact")
        # A multi-platform bundle: the entry for the platform asked for (or the host's).
        entry = select_platform(obj, target.platform or host_platform(), where)
        pinned = RegistryRef(target.ref.registry, target.ref.repository, None, entry.digest)
        return get_artifact(
            Target(target.client, pinned, target.platform), expected_type, config_type
        )
    config = Descriptor.from_json(obj.get("config"), f"{where} config")
    kind = obj.get("artifactType") or (
        expected_type if config.media_type == config_type else config.media_type
    )
    if kind != expected_type:
        hint = " (to find an image's bundle, use --from-image)" if "image" in kind else ""
        raise SourceError(f"{where} is not a {expected_type} artifact: it is {kind}{hint}")
    raw_layers = obj.get("layers")
    if not isinstance(raw_layers, list) or len(raw_layers) > MAX_LAYERS:
        raise SourceError(f"{where}: layers missing or too many")
    layers = [Descriptor.from_json(d, f"{where} layers[{i}]") for i, d in enumerate(raw_layers)]
    return Artifact(digest, kind, config, layers, obj)


def _fetch_blob(
    target: Target, desc: Descriptor, dest: str, what: str, progress: Progress | None = None
) -> tuple[str, int]:
    """Stream a blob into `dest`, decompressing a zstd layer, checking the blob's digest
    and size and, for compressed layers, the annotated uncompressed digest and size.
    Returns the file's sha256 digest and size."""
    what = f"{what} (blob {desc.digest})"
    algo, _hex = split_digest(desc.digest)
    packed = Hasher(algo)
    plain = Hasher()
    compressed = desc.media_type.endswith(ZSTD_SUFFIX)
    limit = None
    if compressed:
        size_text = desc.annotations.get(ANN_UNCOMPRESSED_SIZE, "")
        if not size_text.isdigit() or ANN_UNCOMPRESSED_DIGEST not in desc.annotations:
            raise SourceError(f"{what}: compressed layer without its uncompressed digest and size")
        limit = int(size_text)
    with target.client.open_blob(target.repo, desc.digest) as stream:
        reader = _HashingReader(stream, packed, desc.size, progress)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PULLED_FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            try:
                if compressed:
                    _decompress(reader, out, plain, limit, what)
                else:
                    while chunk := reader.read(IO_CHUNK):
                        plain.update(chunk)
                        out.write(chunk)
            except (DigestError, zstandard.ZstdError) as e:
                # Corrupt bytes usually show as a bad frame first: name the digest instead.
                with contextlib.suppress(DigestError):
                    while reader.read(IO_CHUNK):
                        pass
                packed.verify(desc.digest, desc.size, what)
                raise SourceError(f"{what}: {e}") from None
    packed.verify(desc.digest, desc.size, what)
    if compressed:
        plain.verify(desc.annotations[ANN_UNCOMPRESSED_DIGEST], limit, f"{what} uncompressed")
    return plain.digest, plain.size


def _decompress(
    reader: _HashingReader, out: BinaryIO, plain: Hasher, limit: int | None, what: str
) -> None:
    dctx = zstandard.ZstdDecompressor()
    source: Any = reader  # duck-typed: zstandard only calls read()
    with dctx.stream_reader(source, read_size=IO_CHUNK, read_across_frames=True) as z:
        while chunk := z.read(IO_CHUNK):
            plain.update(chunk)
            if limit is not None and plain.size > limit:
                raise DigestError(f"decompresses past its annotated {limit} bytes")
            out.write(chunk)
    while reader.read(IO_CHUNK):  # whatever follows the frame still counts for the digest
        pass


def read_config(target: Target, desc: Descriptor, what: str) -> bytes:
    if desc.size > MAX_CONFIG_BYTES:
        raise SourceError(f"{what} claims {desc.size} bytes; refusing")
    with target.client.open_blob(target.repo, desc.digest) as stream:
        data = stream.read(desc.size + 1)
    h = Hasher(split_digest(desc.digest)[0])
    h.update(data)
    h.verify(desc.digest, desc.size, f"{what} (blob {desc.digest})")
    return data


FileFilter = Callable[[str], bool]


def fetch_files(
    target: Target,
    artifact: Artifact,
    work: str,
    config_name: str,
    config: bytes,
    wanted: FileFilter,
    phases: PhaseStart | None = None,
) -> tuple[dict[str, dict[str, Any]], int]:
    """The layers `wanted` accepts (by title, less .zst) into `work`, and the config as
    `config_name`; returns the files and the bytes read. Files are written 0666 less the
    umask whatever the artifact says: nothing pulled is ever executable."""
    where = target.pinned(artifact.digest)
    files: dict[str, dict[str, Any]] = {}
    total = artifact.config.size
    progress = None
    if phases is not None:
        names = [(d, layer_file_name(d)) for d in artifact.layers]
        size = sum(d.size for d, n in names if n != config_name and wanted(n))
        progress = phases(DOWNLOAD_PHASE, size, BYTES)
    for desc in artifact.layers:
        name = safe_path(layer_file_name(desc), where)
        if name in files:
            raise SourceError(f"{where}: two layers are named {name}")
        if name == config_name or not wanted(name):
            continue
        path = os.path.join(work, name)
        digest, size = _fetch_blob(target, desc, path, f"{where} {name}", progress)
        total += desc.size
        files[name] = {"sha256": digest.split(":", 1)[1], "size": size}
    with open(os.path.join(work, config_name), "xb") as f:
        f.write(config)
    files[config_name] = {"sha256": digest_of(config).split(":", 1)[1], "size": len(config)}
    return files, total
