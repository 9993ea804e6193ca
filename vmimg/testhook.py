"""Test-only: stop the process at a named point, so that a test kills or interrupts it
exactly there instead of after a sleep (which a loaded machine stretches or shrinks).

With VMIMG_TEST_PAUSE_AT=<point> and VMIMG_TEST_PAUSE_FILE=<path> set, the first time the
process reaches `pause_point("<point>")` it creates <path> (holding its pid) and waits
until <path> is removed. Only the tests set these variables; unset, a pause point costs
an environment lookup. The points:

    layer-unpack-midway   a layer's first chunk is in its temporary file in the cache
    layer-committed       a layer tar was renamed into the cache
    output-write-midway   the writer has begun copying file bytes into the temporary output
                          (a new cache entry in tmp/, or beside the output with --no-cache)
    output-cache-store    the image is written and sealed in tmp/, not yet renamed into the
                          cache nor handed out at the destination
    output-renamed        the output is in place
"""

from __future__ import annotations

import _thread  # threading's own lock, without loading threading (cli/quick imports this)
import os
import time

# not typing's (23 ms to import): the warm fast path imports this module; mypy knows the name
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PAUSE_AT_ENV = "VMIMG_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "VMIMG_TEST_PAUSE_FILE"
POLL_SECONDS = 0.01

_fired = _thread.allocate_lock()  # taken by the first thread to reach the point, never released


def pause_point(point: str, before: Callable[[], None] | None = None) -> None:
    """Wait here if the tests asked to (see the module's docstring); else return at once.
    `before`, called only when pausing, brings the process to the state the point promises
    (work handed to another thread, finished)."""
    if os.environ.get(PAUSE_AT_ENV) != point or not _fired.acquire(blocking=False):
        return
    if before is not None:
        before()
    path = os.environ[PAUSE_FILE_ENV]
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(path + ".tmp", path)  # whole when the test sees it
    while os.path.exists(path):
        time.sleep(POLL_SECONDS)
