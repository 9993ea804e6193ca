"""Fetching an `Image`'s layers into the cache, in parallel (convert.build_tree flattens them)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from vmimg.image.cache import Cache, SpaceGuard
from vmimg.image.image import Image
from vmimg.image.layers import (
    LayerFile,
    UnpackAborted,
    UnpackBudget,
    settle_quietly,
    unpack_layer_to_cache,
)

Progress = Callable[[int], None]
# Opens a phase of long work: (name, total or None, unit) -> the counter the work calls with
# each amount done. The CLI renders phases (vmimg/cli/progress.py); None means nobody looks.
PhaseStart = Callable[[str, int | None, str], Progress]
BYTES = "B"
LAYERS_PHASE = "fetching layers"
# Layers whose commits may run in the background at once (each holds a thread, a flushing
# thread, its temporary file and its lock until it ends); the others are committed in place.
COMMITS_UNDER_WAY = 4


def fetch_layers(
    image: Image,
    cache: Cache,
    phases: PhaseStart | None = None,
    jobs: int | None = None,
    background: bool = False,
) -> list[LayerFile]:
    """Every layer of `image` as an uncompressed, verified tar in the cache.

    Layers decompress in parallel threads: hashing, isal and zstd release the
    GIL, so two layers really use two cores. Together they may expand to
    `cache.max_unpacked_size`; the first failure (that limit, a bad layer, a
    full disk, Ctrl-C) stops the other threads at their next chunk. Progress counts
    the blobs' bytes read, against the sizes of the layers not yet in the cache.

    With `background`, layers unpacked now may still be committing (unpack_layer_to_cache),
    COMMITS_UNDER_WAY of them at most: the caller settles them (settle_layers) before reading
    their tars. On a failure, every layer is settled before it is raised.
    """
    lock = threading.Lock()
    commits = threading.BoundedSemaphore(COMMITS_UNDER_WAY) if background else None
    budget = UnpackBudget(cache.max_unpacked_size)
    space = SpaceGuard(cache.root)
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
        return unpack_layer_to_cache(
            cache, desc, diff_id, lambda: image.open_blob(desc), report, budget, space,
            commits,
        )  # fmt: skip

    workers = jobs or min(len(image.layers), os.cpu_count() or 1) or 1
    if workers == 1:
        done: list[LayerFile] = []
        try:
            for i in range(len(image.layers)):
                done.append(one(i))
        except BaseException:
            settle_quietly(done)
            raise
        return done
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, i) for i in range(len(image.layers))]
        try:
            _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C while waiting
            budget.abort()
            wait(futures)
            settle_quietly(_results(futures))
            raise
        if pending:
            budget.abort()
            wait(pending)
        try:
            _raise_first_failure(futures, budget)
        except BaseException:
            settle_quietly(_results(futures))
            raise
        return [f.result() for f in futures]


def _results(futures: list[Future[LayerFile]]) -> list[LayerFile]:
    """The layers of the futures that finished well."""
    return [f.result() for f in futures if f.done() and not f.cancelled() and not f.exception()]


def _raise_first_failure(futures: list[Future[LayerFile]], budget: UnpackBudget) -> None:
    """The failure that stopped the fetch: the budget's, else the first layer's in order
    (never the UnpackAborted of a layer that was only stopped)."""
    if budget.error is not None:
        raise budget.error
    for f in futures:
        exc = f.exception()
        if exc is not None and not isinstance(exc, UnpackAborted):
            raise exc
