"""Bundle artifacts: a bundle directory pushed as an OCI artifact, pulled back, found by
the image it was built from.

vm.json is the config blob and a layer; every file vm.json lists is a layer; `subject`
points at the container image the bundle was made from. Discovery goes by the image's
digest: the referrers API where the registry has it, otherwise the OCI fallback tag
`sha256-<hex>` (an index of referrers). A pulled bundle is checked as any bundle is
(bundle/format.py), and its launchers are written anew (boot/launchers.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from vmimg import __version__
from vmimg.artifact.transfer import (
    ANN_KERNEL_VERSION,
    ANN_PLATFORM,
    ANN_UNCOMPRESSED_DIGEST,
    ANN_VERSION,
    Artifact,
    CompressionMemo,
    Layer,
    PullResult,
    PushResult,
    Target,
    fetch_files,
    get_artifact,
    layer_file_name,
    prepare_layer,
    push_artifact,
    read_config,
    safe_path,
    target_for,
)
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
from vmimg.errors import (
    BundleError,
    DigestError,
    SourceError,
    UsageError,
)
from vmimg.image.cache import Cache, commit
from vmimg.image.fetch import PhaseStart
from vmimg.image.oci import (
    ACCEPT_MANIFESTS,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    load_json,
    parse_platform,
    select_platform,
    sniff_media_type,
)
from vmimg.image.registry import digest_of
from vmimg.image.sources import SourceOptions
from vmimg.rootfs.handout import seal_entry

BUNDLE_ARTIFACT = "application/vnd.vmimg.bundle.v1"


BUNDLE_CONFIG = "application/vnd.vmimg.bundle.config.v1+json"  # vm.json


# Layer media types by bundle path (launch/ files by directory).
BUNDLE_FILE_TYPES = {
    "vm.json": BUNDLE_CONFIG,
    "kernel": "application/vnd.vmimg.kernel.image.v1",
    "manifest": "application/vnd.vmimg.tree-manifest.v1",
    "rootfs.erofs": "application/vnd.vmimg.rootfs.erofs.v1",
    "rootfs.ext4": "application/vnd.vmimg.rootfs.ext4.v1",
    "initramfs.cpio.gz": "application/vnd.vmimg.rootfs.initramfs.v1",
    "initramfs.cpio.zst": "application/vnd.vmimg.rootfs.initramfs.v1",
    "initramfs.cpio": "application/vnd.vmimg.rootfs.initramfs.v1",
}
# Never zstd: already compressed (zstd would only cost time), or the config blob, which the
# manifest's config descriptor shares with its layer.
NEVER_COMPRESSED = frozenset({"initramfs.cpio.gz", "initramfs.cpio.zst", VM_JSON})


LAUNCH_TYPE = "application/vnd.vmimg.launch.v1"
# The dm-verity root hash of a bundle's root file system (docs/artifact.md).
ANN_VERITY_ROOT_HASH = "vmimg.rootfs.verity.root-hash"


ANN_BUILD_KEY = "vmimg.build-key"


ANN_SOURCE_DIGEST = "vmimg.source.digest"


ANN_SOURCE_REF = "vmimg.source.reference"


ANN_FS = "vmimg.rootfs.type"


def _bundle_files(bundle: Bundle) -> list[str]:
    """The bundle's files to push, as relative paths in name order: what vm.json lists,
    and the launch/ files (for readers other than vmimg, which writes its own)."""
    names = [n for n in bundle_file_names(bundle.vm) if n != VM_JSON]
    return [n for n in names if n in bundle.vm.files or os.path.isfile(bundle.path_of(n))]


def _check_listed(bundle: Bundle, layers: list[Layer]) -> None:
    """Refuse to push files that changed since load_bundle checked them: their readers
    would reject the artifact."""
    for layer in layers:
        d = layer.descriptor
        want = bundle.vm.files.get(layer_file_name(d))
        plain = d.annotations.get(ANN_UNCOMPRESSED_DIGEST, d.digest)
        if want and plain != f"sha256:{want.sha256}":
            raise UsageError(f"{bundle.dir}/{want.name} does not match its sha256 in vm.json")


def _subject(target: Target, digest: str | None, warnings: list[str]) -> Descriptor | None:
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
    target = target_for(ref, options)
    warnings: list[str] = []
    build_key = build_key or vm.build_key
    memo = CompressionMemo(cache)
    with cache.temp_dir() as work:
        layers = [
            prepare_layer(
                target,
                os.path.join(bundle, name),
                name,
                _bundle_media_type(name),
                work,
                memo,
                compress=name not in NEVER_COMPRESSED,
                phases=phases,
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
        if vm.rootfs.verity is not None:
            annotations[ANN_VERITY_ROOT_HASH] = vm.rootfs.verity.root_hash
        if build_key:
            annotations[ANN_BUILD_KEY] = build_key
        subject = _subject(target, vm.source.digest or None, warnings)
        config_desc = Descriptor(BUNDLE_CONFIG, config.descriptor.digest, config.descriptor.size)
        return push_artifact(
            target,
            BUNDLE_ARTIFACT,
            Layer(config_desc, config.blob_path),
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
    target = target_for(ref, options)
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


def _pull_bundle_into(
    target: Target, artifact: Artifact, work: str, phases: PhaseStart | None = None
) -> PullResult:
    """A bundle artifact into the empty directory `work`: vm.json is read and checked
    first, then only the files it lists are fetched (a registry's launch/ scripts are
    never taken: they are written anew from vm.json), and the result is loaded as any
    bundle is, every file against its size and sha256."""
    start = time.monotonic()
    where = target.pinned(artifact.digest)
    config = read_config(target, artifact.config, f"{where} config")
    vm = parse_vm_json(config, f"{where} vm.json")
    for desc in artifact.layers:
        name = safe_path(layer_file_name(desc), where)
        if name not in vm.files and name != VM_JSON and not name.startswith(LAUNCH_DIR + "/"):
            raise SourceError(f"{where}: layer {name!r} is not a file of a vmimg bundle")
    files, total = fetch_files(
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
    target = target_for(ref, options)
    check_destination(dest)
    artifact = get_artifact(target, BUNDLE_ARTIFACT, BUNDLE_CONFIG)
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
    target: Target,
    artifact: Artifact,
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
            seal_entry(tmp)  # an entry like a local build's: read-only, its seal recorded
            if os.path.isdir(final):  # an incomplete leftover: nothing else has it locked
                shutil.rmtree(final)
            commit(tmp, final)


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
    target = target_for(ref, options)
    artifact = get_artifact(target, BUNDLE_ARTIFACT, BUNDLE_CONFIG)
    final = final or cache.output_dir("artifact-" + artifact.digest.split(":", 1)[1])
    pull_into_cache(target, artifact, cache, final, phases)
    while not cache.pin(final):  # kept by `cache prune` while we boot it; pull again if pruned
        pull_into_cache(target, artifact, cache, final, phases)
    return os.path.join(final, "bundle")


def resolve_bundle_argument(
    arg: str, cache: Cache, options: SourceOptions, phases: PhaseStart | None = None
) -> str:
    """A `vmimg verify` argument: a bundle directory as it is, a registry reference
    pulled into the cache."""
    if os.path.isdir(arg):
        return arg
    if os.path.exists(arg):  # not a reference either: it would be refused as a bad one
        raise BundleError(f"{arg}: a file, not a bundle directory (`vmimg build` makes one)")
    return pull_bundle_to_cache(arg, cache, options, phases=phases)


def is_bundle_manifest(doc: object) -> bool:
    """Whether a manifest (or index) document is a bundle artifact's."""
    if not isinstance(doc, dict):
        return False
    config = doc.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    return doc.get("artifactType") == BUNDLE_ARTIFACT or config_type == BUNDLE_CONFIG


def read_bundle_artifact(target: Target, fetched: tuple[bytes, str]) -> tuple[str, bytes, bytes]:
    """(HOST/REPO@DIGEST, manifest, vm.json) of the bundle artifact whose manifest (a bundle
    index: the entry for the target's platform) fetch_manifest returned as `fetched`."""
    artifact = get_artifact(target, BUNDLE_ARTIFACT, BUNDLE_CONFIG, fetched)
    where = target.pinned(artifact.digest)
    vm_json = read_config(target, artifact.config, f"{where} config")
    manifest = json.dumps(artifact.raw, indent=2).encode() + b"\n"
    return where, manifest, vm_json


def _image_digests(target: Target, options: SourceOptions) -> list[str]:
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
    target = target_for(image_ref, options)
    want_platform = str(options.platform)
    for digest in _image_digests(target, options):
        found = None
        for desc in target.client.referrers(target.repo, digest, BUNDLE_ARTIFACT):
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
