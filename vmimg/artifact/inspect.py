"""`vmimg inspect` of a bundle: a bundle directory, or a registry reference whose manifest
is a vmimg bundle artifact (its config blob is the bundle's vm.json, docs/artifact.md).

Everything shown comes from vm.json, parsed and checked as every reader checks it; the
strings in it are the bundle maker's (or a registry's), so the CLI escapes them to print.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from vmimg.artifact.bundle import is_bundle_manifest, read_bundle_artifact
from vmimg.artifact.transfer import fetch_manifest, target_for
from vmimg.bundle.format import VM_JSON, VmSpec, parse_vm_json, read_vm_json
from vmimg.digest import digest_bytes
from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.oci import load_json
from vmimg.image.reference import BUNDLE, parse_reference
from vmimg.image.sources import SourceOptions, open_image
from vmimg.image.sources.registry import image_from_manifest


@dataclass(frozen=True)
class BundleInfo:
    location: str  # the directory, or HOST/REPO@DIGEST
    digest: str  # the artifact manifest's digest; for a directory, vm.json's
    vm: VmSpec
    raw: bytes  # what --raw prints: vm.json for a directory, the manifest for a reference


def open_source(source: str, options: SourceOptions, cache: Cache) -> BundleInfo | Image:
    """The bundle `source` names, or else the image it names (open: the caller closes it).
    A registry reference's manifest is fetched once and judged by what it is."""
    ref = parse_reference(source)
    if ref.transport == BUNDLE:
        assert ref.path is not None
        return _read_dir(ref.path)
    pinned = ref.registry.digest if ref.registry is not None else None
    if ref.registry is None or (pinned and _cached_image_manifest(cache, pinned)):
        # Not in a registry, or an image pinned by digest and cached: no request needed.
        return open_image(ref, cache, options)
    target = target_for(source, options)
    fetched = fetch_manifest(target)
    if not is_bundle_manifest(load_json(fetched[0], f"manifest {target.ref}")):
        return image_from_manifest(target.client, target.ref, *fetched, cache, options)
    where, manifest, vm_json = read_bundle_artifact(target, fetched)
    vm = parse_vm_json(vm_json, f"{where} vm.json")
    return BundleInfo(where, where.rsplit("@", 1)[1], vm, manifest)


def _cached_image_manifest(cache: Cache, digest: str) -> bool:
    """Whether the cache holds `digest` as a manifest that is no bundle's."""
    data = cache.read_blob(digest)
    if data is None:
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and not is_bundle_manifest(doc)


def _read_dir(path: str) -> BundleInfo:
    vm = read_vm_json(path)  # checks that vm.json is a regular file of sane size
    with open(os.path.join(path, VM_JSON), "rb") as f:
        data = f.read()
    return BundleInfo(path, digest_bytes(data), vm, data)


def describe_bundle(info: BundleInfo) -> dict[str, Any]:
    """What `vmimg inspect` shows of a bundle (its JSON form)."""
    vm = info.vm
    rootfs = vm.files.get(vm.rootfs.file)
    workload = vm.workload
    return {
        "bundle": info.location,
        "digest": info.digest,
        "platform": vm.platform,
        "source": {"reference": vm.source.reference, "digest": vm.source.digest},
        "kernel": {
            "version": vm.kernel.version,
            "key": vm.kernel.key,
            "user_supplied": vm.kernel.user_supplied,
        },
        "rootfs": {
            "type": vm.rootfs.type,
            "file": vm.rootfs.file,
            "size": rootfs.size if rootfs else None,
            "read_only": vm.rootfs.read_only,
        },
        "init": vm.init.type,
        "workload": (
            {
                "argv": list(workload.argv),
                "env": list(workload.env),
                "cwd": workload.cwd,
                "uid": workload.uid,
                "gid": workload.gid,
            }
            if workload
            else None
        ),
        "vcpus": vm.vcpus,
        "memory_mib": vm.memory_mib,
        "build_key": vm.build_key,
        "vmimg": vm.vmimg,
    }
