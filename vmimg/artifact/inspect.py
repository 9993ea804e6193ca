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

from vmimg.artifact.bundle import BUNDLE_ARTIFACT, BUNDLE_CONFIG, read_bundle_artifact
from vmimg.bundle.format import VM_JSON, VmSpec, parse_vm_json, read_vm_json
from vmimg.digest import digest_bytes
from vmimg.image.cache import Cache
from vmimg.image.reference import BUNDLE, parse_reference
from vmimg.image.sources import SourceOptions


@dataclass(frozen=True)
class BundleInfo:
    location: str  # the directory, or HOST/REPO@DIGEST
    digest: str  # the artifact manifest's digest; for a directory, vm.json's
    vm: VmSpec
    raw: bytes  # what --raw prints: vm.json for a directory, the manifest for a reference


def read_bundle(source: str, options: SourceOptions, cache: Cache) -> BundleInfo | None:
    """The bundle `source` names, or None when it names an image."""
    ref = parse_reference(source)
    if ref.transport == BUNDLE:
        assert ref.path is not None
        return _read_dir(ref.path)
    if ref.registry is None:
        return None
    if ref.registry.digest and _cached_image_manifest(cache, ref.registry.digest):
        return None  # an image pinned by digest and cached: asking the registry is not needed
    found = read_bundle_artifact(source, options)
    if found is None:
        return None
    where, manifest, vm_json = found
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
    if not isinstance(doc, dict):
        return False
    config = doc.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    return doc.get("artifactType") != BUNDLE_ARTIFACT and config_type != BUNDLE_CONFIG


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
