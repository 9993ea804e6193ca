"""Kernel artifacts: a kernel vmimg built, pushed as an OCI artifact with kernel.json as
its config, and pulled into the cache's pulled kernels (never under a build key).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from vmimg import __version__
from vmimg.artifact.transfer import (
    ANN_KERNEL_VERSION,
    ANN_PLATFORM,
    ANN_VERSION,
    CompressionMemo,
    Layer,
    PushResult,
    fetch_files,
    get_artifact,
    prepare_layer,
    push_artifact,
    read_config,
    target_for,
)
from vmimg.errors import (
    DigestError,
    KernelError,
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
from vmimg.image.cache import Cache, commit
from vmimg.image.fetch import PhaseStart
from vmimg.image.oci import (
    Descriptor,
    load_json,
)
from vmimg.image.sources import SourceOptions

KERNEL_ARTIFACT = "application/vnd.vmimg.kernel.v1"


KERNEL_CONFIG = "application/vnd.vmimg.kernel.config.v1+json"  # kernel.json


KERNEL_FILE_TYPES = {
    "kernel.json": KERNEL_CONFIG,
    "vmlinux": "application/vnd.vmimg.kernel.vmlinux.v1",
    "bzImage": "application/vnd.vmimg.kernel.bzimage.v1",
    "Image": "application/vnd.vmimg.kernel.arm64-image.v1",
    "config": "application/vnd.vmimg.kernel.kconfig.v1",
}
# Never zstd: already compressed, or the config blob (shared with its layer).
NEVER_COMPRESSED = frozenset({"bzImage", METADATA_FILE})


ANN_KERNEL_KEY = "vmimg.kernel.key"


def push_kernel(
    key: str, ref: str, cache: Cache, options: SourceOptions, phases: PhaseStart | None = None
) -> PushResult:
    """Push a cached kernel (by key or key prefix) as a kernel artifact."""
    start = time.monotonic()
    info = find_kernel(key, cache.root)
    target = target_for(ref, options)
    present = [
        n for n in KERNEL_FILE_TYPES if n != METADATA_FILE and (info.directory / n).is_file()
    ]
    names = [METADATA_FILE, *sorted(present)]
    memo = CompressionMemo(cache)
    with cache.temp_dir() as work:
        layers = [
            prepare_layer(
                target,
                str(info.directory / n),
                n,
                KERNEL_FILE_TYPES[n],
                work,
                memo,
                compress=n not in NEVER_COMPRESSED,
                phases=phases,
            )
            for n in names
        ]
        meta = layers[0]
        config = Layer(
            Descriptor(KERNEL_CONFIG, meta.descriptor.digest, meta.descriptor.size),
            meta.blob_path,
        )
        annotations = {
            ANN_VERSION: __version__,
            ANN_KERNEL_KEY: info.key,
            ANN_KERNEL_VERSION: info.version,
            ANN_PLATFORM: f"linux/{info.arch}",
        }
        return push_artifact(
            target, KERNEL_ARTIFACT, config, layers, None, annotations, start, [], phases
        )


def pull_kernel(
    ref: str, cache: Cache, options: SourceOptions, phases: PhaseStart | None = None
) -> KernelInfo:
    """Pull a kernel artifact into the cache's pulled kernels, keyed by the artifact's
    digest (never under a build key, so it cannot replace a kernel built here); returns
    its KernelInfo. Only known file names are fetched, each checked against kernel.json."""
    target = target_for(ref, options)
    artifact = get_artifact(target, KERNEL_ARTIFACT, KERNEL_CONFIG)
    where = target.pinned(artifact.digest)
    config = read_config(target, artifact.config, f"{where} config")
    meta = check_metadata(load_json(config, f"{where} config"), where)
    final = pulled_kernel_dir(cache, artifact.digest)
    with contextlib.suppress(KernelError):
        return load_kernel(final, check_files=True)
    with cache.lock(f"kernel-{final.name}"), cache.temp_dir() as tmp:
        with contextlib.suppress(KernelError):
            return load_kernel(final, check_files=True)
        files, _total = fetch_files(
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
        commit(tmp, str(final))  # temp_dir's clean-up finds nothing left to remove
    return load_kernel(final)
