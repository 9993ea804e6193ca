"""Bundles and kernels as OCI artifacts: push, pull, discovery by subject, remote cache.

A bundle is an OCI image manifest (v1.1 style) with its own `artifactType`:
vm.json is the config blob, every file of the bundle is one layer named by an
`org.opencontainers.image.title` annotation (so `oras pull` writes the files
back by name), big files are zstd-compressed where that pays, and `subject`
points at the container image the bundle was made from. The format is
documented in docs/artifact.md; this module is its only writer and reader.

    push:  files -> (hash, maybe compress) -> HEAD, upload what is missing
           -> manifest PUT -> referrers fallback tag if the registry has no API
    pull:  manifest -> every blob streamed, digest checked, decompressed,
           uncompressed digest checked -> temp dir -> renamed into place

Discovery goes by the image's digest: the referrers API where the registry has
it, otherwise the OCI fallback tag `sha256-<hex>` (an index of referrers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from vmimg import __version__
from vmimg.boot.launchers import write_launchers
from vmimg.bundle.build import check_destination, install_bundle_dir, new_bundle_dir
from vmimg.bundle.format import (
    LAUNCH_DIR,
    VM_JSON,
    Bundle,
    bundle_file_names,
    load_bundle,
    parse_vm_json,
)
from vmimg.digest import Hasher, split_digest
from vmimg.errors import (
    BundleError,
    DigestError,
    ImageRefError,
    KernelError,
    SourceError,
    UsageError,
)
from vmimg.guest.kernel import (
    METADATA_FILE,
    KernelInfo,
    check_kernel_files,
    check_metadata,
    find_kernel,
    load_kernel,
    pulled_kernel_dir,
)
from vmimg.image.cache import Cache
from vmimg.image.fetch import BYTES, PhaseStart, Progress
from vmimg.image.oci import (
    ACCEPT_MANIFESTS,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    host_platform,
    load_json,
    parse_platform,
    select_platform,
    sniff_media_type,
)
from vmimg.image.reference import RegistryRef, parse_reference
from vmimg.image.registry import RegistryClient, digest_of
from vmimg.image.sources import SourceOptions
from vmimg.image.sources.registry import get_manifest

# -- the format (docs/artifact.md) ------------------------------------------------

BUNDLE_ARTIFACT = "application/vnd.vmimg.bundle.v1"
KERNEL_ARTIFACT = "application/vnd.vmimg.kernel.v1"
BUNDLE_CONFIG = "application/vnd.vmimg.bundle.config.v1+json"  # vm.json
KERNEL_CONFIG = "application/vnd.vmimg.kernel.config.v1+json"  # kernel.json
ZSTD_SUFFIX = "+zstd"  # appended to a layer media type whose blob is zstd-compressed
ZSTD_EXT = ".zst"  # appended to the title of such a layer, so the name says what it holds

# Layer media types by bundle path (launch/ files by directory).
BUNDLE_FILE_TYPES = {
    "vm.json": BUNDLE_CONFIG,
    "kernel": "application/vnd.vmimg.kernel.image.v1",
    "manifest": "application/vnd.vmimg.tree-manifest.v1",
    "rootfs.erofs": "application/vnd.vmimg.rootfs.erofs.v1",
    "rootfs.ext4": "application/vnd.vmimg.rootfs.ext4.v1",
    "initramfs.cpio.gz": "application/vnd.vmimg.rootfs.initramfs.v1",
}
LAUNCH_TYPE = "application/vnd.vmimg.launch.v1"
KERNEL_FILE_TYPES = {
    "kernel.json": KERNEL_CONFIG,
    "vmlinux": "application/vnd.vmimg.kernel.vmlinux.v1",
    "bzImage": "application/vnd.vmimg.kernel.bzimage.v1",
    "Image": "application/vnd.vmimg.kernel.arm64-image.v1",
    "config": "application/vnd.vmimg.kernel.kconfig.v1",
}
# Never zstd: already compressed (zstd would only cost time), or the config blob,
# which the manifest's config descriptor shares with its layer.
NEVER_COMPRESSED = frozenset(
    {
        BUNDLE_FILE_TYPES["initramfs.cpio.gz"],
        KERNEL_FILE_TYPES["bzImage"],
        BUNDLE_CONFIG,
        KERNEL_CONFIG,
    }
)

TITLE = "org.opencontainers.image.title"
ANN_UNCOMPRESSED_DIGEST = "vmimg.uncompressed.digest"
ANN_UNCOMPRESSED_SIZE = "vmimg.uncompressed.size"
ANN_MODE = "vmimg.file.mode"
ANN_BUILD_KEY = "vmimg.build-key"
ANN_SOURCE_DIGEST = "vmimg.source.digest"
ANN_SOURCE_REF = "vmimg.source.reference"
ANN_PLATFORM = "vmimg.platform"
ANN_FS = "vmimg.rootfs.type"
ANN_KERNEL_VERSION = "vmimg.kernel.version"
ANN_KERNEL_KEY = "vmimg.kernel.key"
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
FALLBACK_TAG_MAX = 128  # tag length limit of the distribution spec
MEMO_DIR = "artifacts/zstd"
PULLED_FILE_MODE = 0o666  # less the umask; never executable
UPLOAD_PHASE = "uploading"
DOWNLOAD_PHASE = "downloading"


# -- results -----------------------------------------------------------------------


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
class _Layer:
    """One file prepared for upload: its descriptor and where its blob's bytes are."""

    descriptor: Descriptor
    blob_path: str | None  # None: the registry already has the (compressed) blob


@dataclass(frozen=True)
class _Target:
    client: RegistryClient
    ref: RegistryRef
    platform: Platform | None = None  # which entry of a multi-platform index to take

    @property
    def repo(self) -> str:
        return self.ref.repository

    def pinned(self, digest: str) -> str:
        return f"{self.ref.registry}/{self.ref.repository}@{digest}"


def _target(ref: str, options: SourceOptions) -> _Target:
    """A registry reference (docker://HOST/REPO:TAG or HOST/REPO:TAG) and its client."""
    parsed = parse_reference(ref)
    if parsed.transport != "docker" or parsed.registry is None:
        raise ImageRefError(f"{ref} is not a registry reference (HOST/REPO:TAG)")
    client = RegistryClient(
        parsed.registry.registry, insecure_hosts=options.insecure_hosts, ca_cert=options.ca_cert
    )
    return _Target(client, parsed.registry, options.platform)


# -- hashing and compression ----------------------------------------------------------


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


class _CompressionMemo:
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


def _prepare_layer(
    target: _Target,
    path: str,
    name: str,
    media_type: str,
    work: str,
    memo: _CompressionMemo,
    phases: PhaseStart | None = None,
) -> _Layer:
    """The layer for one file: compressed when big and compressible, else as it is."""
    plain_digest, plain_size = _hash_file(path)
    annotations = {TITLE: name, ANN_MODE: _mode_text(path)}
    plain = _Layer(Descriptor(media_type, plain_digest, plain_size, annotations), path)
    if plain_size < MIN_COMPRESS_SIZE or media_type in NEVER_COMPRESSED:
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
        return _Layer(Descriptor(media_type + ZSTD_SUFFIX, known[0], known[1], packed_ann), None)
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
    return _Layer(Descriptor(media_type + ZSTD_SUFFIX, digest, size, packed_ann), dest)


# -- pushing ---------------------------------------------------------------------------


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


def fallback_tag(digest: str) -> str:
    """The referrers tag scheme's tag for a subject: `<alg>-<hex>`."""
    algo, hexd = split_digest(digest)
    return f"{algo}-{hexd}"[:FALLBACK_TAG_MAX]


def _read_index(target: _Target, reference: str) -> dict[str, Any] | None:
    resp = target.client.request(
        "GET",
        f"/v2/{target.repo}/manifests/{reference}",
        headers={"Accept": OCI_INDEX},
        ok=(200, 404),
        what=f"referrers index {target.ref.registry}/{target.repo}:{reference}",
    )
    if resp.status_code == 404:
        return None
    return load_json(resp.content, f"referrers index {reference}")


def _add_to_fallback_index(target: _Target, subject: str, entry: Descriptor) -> None:
    """Add `entry` to the index under the subject's fallback tag (read, append, PUT)."""
    tag = fallback_tag(subject)
    index = _read_index(target, tag) or {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [],
    }
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise SourceError(f"{target.ref.registry}/{target.repo}:{tag} is not an index")
    if any(isinstance(m, dict) and m.get("digest") == entry.digest for m in manifests):
        return
    manifests.append(entry.to_json())
    data = json.dumps(index, separators=(",", ":")).encode()
    target.client.put_manifest(target.repo, tag, data, OCI_INDEX)


def _push_artifact(
    target: _Target,
    artifact_type: str,
    config: _Layer,
    layers: list[_Layer],
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
            _add_to_fallback_index(target, subject.digest, entry)
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


def _bundle_files(bundle: Bundle) -> list[str]:
    """The bundle's files to push, as relative paths in name order: what vm.json lists,
    and the launch/ files (for readers other than vmimg, which writes its own)."""
    names = [n for n in bundle_file_names(bundle.vm) if n != VM_JSON]
    return [n for n in names if n in bundle.vm.files or os.path.isfile(bundle.path_of(n))]


def _check_listed(bundle: Bundle, layers: list[_Layer]) -> None:
    """Refuse to push files that changed since load_bundle checked them: their readers
    would reject the artifact."""
    for layer in layers:
        d = layer.descriptor
        want = bundle.vm.files.get(_file_name(d))
        plain = d.annotations.get(ANN_UNCOMPRESSED_DIGEST, d.digest)
        if want and plain != f"sha256:{want.sha256}":
            raise UsageError(f"{bundle.dir}/{want.name} does not match its sha256 in vm.json")


def _subject(target: _Target, digest: str | None, warnings: list[str]) -> Descriptor | None:
    """The descriptor of the source image if the target repository holds it."""
    if not digest:
        warnings.append("vm.json names no source digest: pushed without a subject")
        return None
    head = target.client.head_manifest(target.repo, digest, ACCEPT_MANIFESTS)
    if head is None:
        warnings.append(
            f"the source image {digest} is not in {target.ref.registry}/{target.repo}: "
            "pushed without a subject (push next to the image to link them)"
        )
        return None
    return Descriptor(head.media_type or OCI_MANIFEST, digest, head.size)


def push_bundle(
    bundle: str,
    ref: str,
    cache: Cache,
    options: SourceOptions,
    build_key: str | None = None,
    phases: PhaseStart | None = None,
) -> PushResult:
    """Push a bundle directory to `ref` as a bundle artifact whose subject is its source
    image (when the target repository holds that image)."""
    start = time.monotonic()
    try:
        loaded = load_bundle(bundle)
    except BundleError as e:  # e.g. an ext4 root a --persist run changed behind vm.json's back
        raise UsageError(f"cannot push {bundle}: {e}") from None
    vm = loaded.vm
    target = _target(ref, options)
    warnings: list[str] = []
    build_key = build_key or vm.build_key
    memo = _CompressionMemo(cache)
    with cache.temp_dir() as work:
        layers = [
            _prepare_layer(
                target,
                os.path.join(bundle, name),
                name,
                _bundle_media_type(name),
                work,
                memo,
                phases,
            )
            for name in [VM_JSON, *_bundle_files(loaded)]
        ]
        _check_listed(loaded, layers)
        config = layers[0]  # vm.json is the config, and a layer too (same blob) for oras
        annotations = {
            ANN_VERSION: __version__,
            ANN_SOURCE_DIGEST: vm.source.digest,
            ANN_SOURCE_REF: vm.source.reference,
            ANN_PLATFORM: vm.platform,
            ANN_FS: vm.rootfs.type,
            ANN_KERNEL_VERSION: vm.kernel.version,
        }
        if build_key:
            annotations[ANN_BUILD_KEY] = build_key
        subject = _subject(target, vm.source.digest or None, warnings)
        config_desc = Descriptor(BUNDLE_CONFIG, config.descriptor.digest, config.descriptor.size)
        return _push_artifact(
            target,
            BUNDLE_ARTIFACT,
            _Layer(config_desc, config.blob_path),
            layers,
            subject,
            annotations,
            start,
            warnings,
            phases,
        )


def push_bundle_index(
    bundles: list[str],
    ref: str,
    cache: Cache,
    options: SourceOptions,
    phases: PhaseStart | None = None,
) -> PushResult:
    """Push one bundle per platform (each also tagged TAG-ARCH) and an OCI index over them
    at `ref`, so that a pull picks the bundle of its platform."""
    start = time.monotonic()
    target = _target(ref, options)
    tag = target.ref.tag or "latest"
    entries: list[dict[str, Any]] = []
    pushed: list[PushResult] = []
    for bundle in bundles:
        vm = load_bundle(bundle, check_files=False).vm  # push_bundle checks the files
        plat = parse_platform(vm.platform)
        one = push_bundle(bundle, f"{target.ref.registry}/{target.repo}:{tag}-{plat.architecture}",
                          cache, options, phases=phases)  # fmt: skip
        pushed.append(one)
        head = target.client.head_manifest(target.repo, one.digest, OCI_MANIFEST)
        if head is None:
            raise SourceError(f"{one.pinned}: the registry lost the manifest just pushed")
        size = head.size
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "artifactType": BUNDLE_ARTIFACT,
                "digest": one.digest,
                "size": size,
                "platform": {"os": plat.os, "architecture": plat.architecture},
                "annotations": {
                    ANN_PLATFORM: str(plat),
                    ANN_FS: vm.rootfs.type,
                },
            }
        )
    entries.sort(key=lambda e: e["annotations"][ANN_PLATFORM])
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": BUNDLE_ARTIFACT,
        "manifests": entries,
        "annotations": {ANN_VERSION: __version__},
    }
    data = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
    put = target.client.put_manifest(target.repo, tag, data, OCI_INDEX)
    return PushResult(
        reference=f"{target.ref.registry}/{target.repo}:{tag}",
        digest=put.digest,
        artifact_type=BUNDLE_ARTIFACT,
        subject=None,
        referrers="per platform",
        uploaded=sum(p.uploaded for p in pushed),
        skipped=sum(p.skipped for p in pushed),
        bytes_uploaded=sum(p.bytes_uploaded for p in pushed),
        seconds=time.monotonic() - start,
        warnings=[w for p in pushed for w in p.warnings],
    )


def _bundle_media_type(name: str) -> str:
    if name.startswith(LAUNCH_DIR + "/"):
        return LAUNCH_TYPE
    return BUNDLE_FILE_TYPES.get(name, "application/vnd.vmimg.file.v1")


def push_kernel(
    key: str, ref: str, cache: Cache, options: SourceOptions, phases: PhaseStart | None = None
) -> PushResult:
    """Push a cached kernel (by key or key prefix) as a kernel artifact."""
    start = time.monotonic()
    info = find_kernel(key, cache.root)
    target = _target(ref, options)
    present = [
        n for n in KERNEL_FILE_TYPES if n != METADATA_FILE and (info.directory / n).is_file()
    ]
    names = [METADATA_FILE, *sorted(present)]
    memo = _CompressionMemo(cache)
    with cache.temp_dir() as work:
        layers = [
            _prepare_layer(
                target, str(info.directory / n), n, KERNEL_FILE_TYPES[n], work, memo, phases
            )
            for n in names
        ]
        meta = layers[0]
        config = _Layer(
            Descriptor(KERNEL_CONFIG, meta.descriptor.digest, meta.descriptor.size),
            meta.blob_path,
        )
        annotations = {
            ANN_VERSION: __version__,
            ANN_KERNEL_KEY: info.key,
            ANN_KERNEL_VERSION: info.version,
            ANN_PLATFORM: f"linux/{info.arch}",
        }
        return _push_artifact(
            target, KERNEL_ARTIFACT, config, layers, None, annotations, start, [], phases
        )


# -- pulling ---------------------------------------------------------------------------


def _file_name(desc: Descriptor) -> str:
    """The file a layer holds: its title, less the .zst of a compressed layer."""
    title = desc.annotations.get(TITLE, "")
    return title.removesuffix(ZSTD_EXT) if desc.media_type.endswith(ZSTD_SUFFIX) else title


def _safe_path(title: str, where: str) -> str:
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
class _Artifact:
    digest: str
    artifact_type: str
    config: Descriptor
    layers: list[Descriptor]
    raw: dict[str, Any]


_ARTIFACT_OF_CONFIG = {BUNDLE_CONFIG: BUNDLE_ARTIFACT, KERNEL_CONFIG: KERNEL_ARTIFACT}


def _get_artifact(target: _Target, expected_type: str) -> _Artifact:
    """The artifact manifest at the target reference, checked to be of `expected_type`."""
    where = str(target.ref)
    data, ctype = get_manifest(
        target.client, target.repo, target.ref.reference, f"{OCI_MANIFEST}, {ACCEPT_MANIFESTS}"
    )
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
        return _get_artifact(_Target(target.client, pinned, target.platform), expected_type)
    config = Descriptor.from_json(obj.get("config"), f"{where} config")
    kind = obj.get("artifactType") or _ARTIFACT_OF_CONFIG.get(config.media_type, config.media_type)
    if kind != expected_type:
        hint = " (to find an image's bundle, use --from-image)" if "image" in kind else ""
        raise SourceError(f"{where} is not a {expected_type} artifact: it is {kind}{hint}")
    raw_layers = obj.get("layers")
    if not isinstance(raw_layers, list) or len(raw_layers) > MAX_LAYERS:
        raise SourceError(f"{where}: layers missing or too many")
    layers = [Descriptor.from_json(d, f"{where} layers[{i}]") for i, d in enumerate(raw_layers)]
    return _Artifact(digest, kind, config, layers, obj)


def _fetch_blob(
    target: _Target, desc: Descriptor, dest: str, what: str, progress: Progress | None = None
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


def _read_config(target: _Target, desc: Descriptor, what: str) -> bytes:
    if desc.size > MAX_CONFIG_BYTES:
        raise SourceError(f"{what} claims {desc.size} bytes; refusing")
    with target.client.open_blob(target.repo, desc.digest) as stream:
        data = stream.read(desc.size + 1)
    h = Hasher(split_digest(desc.digest)[0])
    h.update(data)
    h.verify(desc.digest, desc.size, f"{what} (blob {desc.digest})")
    return data


FileFilter = Callable[[str], bool]


def _fetch_files(
    target: _Target,
    artifact: _Artifact,
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
        names = [(d, _file_name(d)) for d in artifact.layers]
        size = sum(d.size for d, n in names if n != config_name and wanted(n))
        progress = phases(DOWNLOAD_PHASE, size, BYTES)
    for desc in artifact.layers:
        name = _safe_path(_file_name(desc), where)
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


def _pull_bundle_into(
    target: _Target, artifact: _Artifact, work: str, phases: PhaseStart | None = None
) -> PullResult:
    """A bundle artifact into the empty directory `work`: vm.json is read and checked
    first, then only the files it lists are fetched (a registry's launch/ scripts are
    never taken: they are written anew from vm.json), and the result is loaded as any
    bundle is, every file against its size and sha256."""
    start = time.monotonic()
    where = target.pinned(artifact.digest)
    config = _read_config(target, artifact.config, f"{where} config")
    vm = parse_vm_json(config, f"{where} vm.json")
    for desc in artifact.layers:
        name = _safe_path(_file_name(desc), where)
        if name not in vm.files and name != VM_JSON and not name.startswith(LAUNCH_DIR + "/"):
            raise SourceError(f"{where}: layer {name!r} is not a file of a vmimg bundle")
    files, total = _fetch_files(
        target, artifact, work, VM_JSON, config, vm.files.__contains__, phases
    )
    for name in vm.files:
        if name not in files:
            raise SourceError(f"{where}: vm.json lists {name}, which the artifact lacks")
    try:
        bundle = load_bundle(work)
    except BundleError as e:
        raise DigestError(f"{where}: {e}") from None
    write_launchers(work, bundle.vm)
    return PullResult(where, work, files, total, time.monotonic() - start)


def pull_bundle(
    ref: str,
    dest: str,
    options: SourceOptions,
    from_image: bool = False,
    fs: str | None = None,
    phases: PhaseStart | None = None,
) -> PullResult:
    """Pull the bundle artifact at `ref` (or, with `from_image`, the newest bundle that
    refers to the image at `ref`) into the directory `dest`, atomically."""
    start = time.monotonic()
    if from_image:
        found = find_bundle(ref, options, fs=fs)
        if found is None:
            raise SourceError(f"no vmimg bundle refers to {ref}")
        ref = found
    target = _target(ref, options)
    check_destination(dest)
    artifact = _get_artifact(target, BUNDLE_ARTIFACT)
    work = new_bundle_dir(dest)
    try:
        result = _pull_bundle_into(target, artifact, work, phases)
        install_bundle_dir(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result.directory = dest
    result.seconds = time.monotonic() - start
    return result


def pull_into_cache(
    target: _Target,
    artifact: _Artifact,
    cache: Cache,
    final: str,
    phases: PhaseStart | None = None,
) -> None:
    """Pull a bundle into `final`/bundle in the cache (the layout of bundle.py's outputs)."""
    if os.path.isfile(os.path.join(final, "bundle", "vm.json")):
        return
    with cache.lock(f"artifact-{os.path.basename(final)}"):
        if os.path.isfile(os.path.join(final, "bundle", "vm.json")):
            return
        with cache.temp_dir() as tmp:
            work = os.path.join(tmp, "bundle")
            os.mkdir(work)
            _pull_bundle_into(target, artifact, work, phases)
            if os.path.isdir(final):  # an incomplete leftover: nothing else has it locked
                shutil.rmtree(final)
            os.rename(tmp, final)


def pull_bundle_to_cache(
    ref: str,
    cache: Cache,
    options: SourceOptions,
    final: str | None = None,
    phases: PhaseStart | None = None,
) -> str:
    """The bundle artifact at `ref` as a directory in the cache: in `final` (the remote
    build cache's place for a build key), or pulled once per manifest digest (for
    `vmimg verify REF`)."""
    target = _target(ref, options)
    artifact = _get_artifact(target, BUNDLE_ARTIFACT)
    final = final or cache.output_dir("artifact-" + artifact.digest.split(":", 1)[1])
    pull_into_cache(target, artifact, cache, final, phases)
    return os.path.join(final, "bundle")


def resolve_bundle_argument(
    arg: str, cache: Cache, options: SourceOptions, phases: PhaseStart | None = None
) -> str:
    """A `vmimg verify` argument: a bundle directory as it is, a registry reference
    pulled into the cache."""
    if os.path.isdir(arg):
        return arg
    return pull_bundle_to_cache(arg, cache, options, phases=phases)


def read_bundle_artifact(ref: str, options: SourceOptions) -> tuple[str, bytes, bytes] | None:
    """(HOST/REPO@DIGEST, manifest, vm.json) of the bundle artifact at `ref` (a bundle index
    gives the entry for options.platform), or None when `ref` names anything else."""
    target = _target(ref, options)
    data, _ctype = get_manifest(
        target.client, target.repo, target.ref.reference, f"{OCI_MANIFEST}, {ACCEPT_MANIFESTS}"
    )
    obj = load_json(data, f"manifest {target.ref}")
    config = obj.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if obj.get("artifactType") != BUNDLE_ARTIFACT and config_type != BUNDLE_CONFIG:
        return None
    artifact = _get_artifact(target, BUNDLE_ARTIFACT)
    where = target.pinned(artifact.digest)
    vm_json = _read_config(target, artifact.config, f"{where} config")
    manifest = json.dumps(artifact.raw, indent=2).encode() + b"\n"
    return where, manifest, vm_json


def pull_kernel(
    ref: str, cache: Cache, options: SourceOptions, phases: PhaseStart | None = None
) -> KernelInfo:
    """Pull a kernel artifact into the cache's pulled kernels, keyed by the artifact's
    digest (never under a build key, so it cannot replace a kernel built here); returns
    its KernelInfo. Only known file names are fetched, each checked against kernel.json."""
    target = _target(ref, options)
    artifact = _get_artifact(target, KERNEL_ARTIFACT)
    where = target.pinned(artifact.digest)
    config = _read_config(target, artifact.config, f"{where} config")
    meta = check_metadata(load_json(config, f"{where} config"), where)
    final = pulled_kernel_dir(cache, artifact.digest)
    with contextlib.suppress(KernelError):
        return load_kernel(final, check_files=True)
    with cache.lock(f"kernel-{final.name}"), cache.temp_dir() as tmp:
        with contextlib.suppress(KernelError):
            return load_kernel(final, check_files=True)
        files, _total = _fetch_files(
            target, artifact, tmp, METADATA_FILE, config, meta["files"].__contains__, phases
        )
        for name in meta["files"]:
            if name not in files:
                raise DigestError(f"{where}: kernel.json lists {name}, which the artifact lacks")
        try:
            check_kernel_files(Path(tmp), meta)
        except KernelError as e:
            raise DigestError(f"{where}: {e}") from None
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a damaged earlier copy: nothing else has it locked
            shutil.rmtree(final)
        os.rename(tmp, final)  # temp_dir's clean-up finds nothing left to remove
    return load_kernel(final)


# -- discovery ---------------------------------------------------------------------------


def referrers(target: _Target, digest: str, artifact_type: str | None = None) -> list[Descriptor]:
    """The manifests whose subject is `digest`: the referrers API, or the fallback tag
    where the registry has no API (it answers 404, as the spec says it must)."""
    query = f"?artifactType={urllib.parse.quote(artifact_type)}" if artifact_type else ""
    resp = target.client.request(
        "GET",
        f"/v2/{target.repo}/referrers/{digest}{query}",
        headers={"Accept": OCI_INDEX},
        ok=(200, 404),
        what=f"referrers of {target.ref.registry}/{target.repo}@{digest}",
    )
    index: dict[str, Any] | None = None
    if resp.status_code == 200:
        with contextlib.suppress(SourceError):
            index = load_json(resp.content, "referrers")
    if index is None or not isinstance(index.get("manifests"), list):
        index = _read_index(target, fallback_tag(digest)) or {"manifests": []}
    out = []
    for i, d in enumerate(index.get("manifests") or []):
        desc = Descriptor.from_json(d, f"referrers of {digest} [{i}]")
        if artifact_type is None or desc.artifact_type == artifact_type:
            out.append(desc)
    return out


def _image_digests(target: _Target, options: SourceOptions) -> list[str]:
    """The digests a bundle of this image may name as its subject: the platform's
    manifest first, then the index it came from."""
    if target.ref.digest and target.ref.tag is None:
        head = target.client.head_manifest(target.repo, target.ref.digest, ACCEPT_MANIFESTS)
        if head is not None and head.media_type not in INDEX_TYPES:
            return [target.ref.digest]
    data, ctype = target.client.get_manifest(target.repo, target.ref.reference, ACCEPT_MANIFESTS)
    top = digest_of(data)
    obj = load_json(data, f"manifest of {target.ref}")
    if sniff_media_type(obj, ctype) in INDEX_TYPES:
        return [select_platform(obj, options.platform, str(target.ref)).digest, top]
    return [top]


def find_bundle(
    image_ref: str,
    options: SourceOptions,
    build_key: str | None = None,
    fs: str | None = None,
) -> str | None:
    """HOST/REPO@DIGEST of the newest bundle artifact whose subject is the image at
    `image_ref` (for its platform), optionally with this build key or root fs type."""
    target = _target(image_ref, options)
    want_platform = str(options.platform)
    for digest in _image_digests(target, options):
        found = None
        for desc in referrers(target, digest, BUNDLE_ARTIFACT):
            ann = desc.annotations
            if build_key is not None and ann.get(ANN_BUILD_KEY) != build_key:
                continue
            if fs is not None and ann.get(ANN_FS) != fs:
                continue
            if ann.get(ANN_PLATFORM, want_platform) != want_platform:
                continue
            found = desc  # later entries are newer in a fallback index
        if found is not None:
            return target.pinned(found.digest)
    return None


def find_remote_bundle(image_ref: str, build_key: str, options: SourceOptions) -> str | None:
    """A bundle in the registry built from this image with this build key (see
    bundle.bundle_key: same source digest, options, kernel, agent, vmimg version), or None.
    `image_ref` should be pinned (HOST/REPO@DIGEST) to the digest the key was made from."""
    return find_bundle(image_ref, options, build_key=build_key)


__all__ = [
    "BUNDLE_ARTIFACT",
    "KERNEL_ARTIFACT",
    "PullResult",
    "PushResult",
    "find_bundle",
    "find_remote_bundle",
    "pull_bundle",
    "pull_bundle_to_cache",
    "pull_kernel",
    "push_bundle",
    "push_kernel",
    "read_bundle_artifact",
    "resolve_bundle_argument",
]
