"""Fetching an `Image`'s layers into the cache, in parallel (convert.build_tree flattens them)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from vmimg.image.cache import Cache
from vmimg.image.image import Image
from vmimg.image.layers import LayerFile, unpack_layer_to_cache

Progress = Callable[[int], None]
# Opens a phase of long work: (name, total or None, unit) -> the counter the work calls with
# each amount done. The CLI renders phases (vmimg/cli/progress.py); None means nobody looks.
PhaseStart = Callable[[str, int | None, str], Progress]
BYTES = "B"
LAYERS_PHASE = "fetching layers"


def fetch_layers(
    image: Image, cache: Cache, phases: PhaseStart | None = None, jobs: int | None = None
) -> list[LayerFile]:
    """Every layer of `image` as an uncompressed, verified tar in the cache.

    Layers decompress in parallel threads: hashing, isal and zstd release the
    GIL, so two layers really use two cores. Progress counts the blobs' bytes read,
    against the sizes of the layers not yet in the cache.
    """
    lock = threading.Lock()
    missing = [i for i, d in enumerate(image.diff_ids) if not os.path.exists(cache.layer_path(d))]
    progress = None
    if phases is not None and missing:
        progress = phases(LAYERS_PHASE, sum(image.layers[i].size for i in missing), BYTES)

    def report(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    def one(i: int) -> LayerFile:
        desc = image.layers[i]
        diff_id = image.diff_ids[i]
        path = unpack_layer_to_cache(cache, desc, diff_id, lambda: image.open_blob(desc), report)
        return LayerFile(path, desc.digest or diff_id)

    workers = jobs or min(len(image.layers), os.cpu_count() or 1) or 1
    if workers == 1:
        return [one(i) for i in range(len(image.layers))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(image.layers))))
