"""The cache under pressure, through the real CLI: --max-unpacked-size, locked work in
progress that the next run reclaims and `cache prune` leaves alone, prune --all, and
entries made durable (fsync) before they are renamed into place."""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import layerkit as L
from tests.conftest import need
from tests.hostile.cli import PAUSE_POLL, PAUSE_TIMEOUT, paused_vmimg, run_vmimg
from tests.hostile.corpus import ZERO_DIFF_ID, ZSTD_TYPE, bomb, image, raw_layer
from vmimg.errors import CacheError
from vmimg.guest.kernel import BZ_HEADER_MAGIC, BZ_HEADER_MAGIC_OFFSET
from vmimg.image import cache as cache_module
from vmimg.image import unsynced
from vmimg.image.cache import Cache, Flusher
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout

MIB = 1 << 20
LAYER_BYTES = 3 * MIB  # each of the three layers of the `three_layers` image
LAYER_LINE = r"vmimg: error: layer sha256:[0-9a-f]{64}: "
IMAGE_INIT = ("--init", "image")  # a bundle without the agent: the images have no command


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image of three layers of 3 MiB (plus tar headers) each, 9 MiB in all."""
    layout = tmp_path_factory.mktemp("three") / "layout"
    layers = [
        LayerSpec(L.layer(L.file(f"l{i}/data", bytes([i]) * LAYER_BYTES)), c)
        for i, c in enumerate(("gzip", "zstd", "gzip"))
    ]
    write_layout(str(layout), {"t": ImageSpec(layers)})
    return f"oci:{layout}:t"


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image of one 8 MiB layer: unpacked by one thread, so a pause there is the only
    work in progress."""
    layout = tmp_path_factory.mktemp("one") / "layout"
    layer = LayerSpec(L.layer(L.file("data", bytes(range(256)) * (8 * MIB // 256))))
    write_layout(str(layout), {"t": ImageSpec([layer])})
    return f"oci:{layout}:t"


def _limit_error(limit: str) -> re.Pattern[str]:
    return re.compile(
        LAYER_LINE + f"expands the image past --max-unpacked-size {limit}; refusing it\n"
    )


def _entries(cache: Path, area: str) -> list[Path]:
    d = cache / area
    return sorted(d.rglob("*")) if d.is_dir() else []


def _layer_tars(cache: Path) -> list[Path]:
    return [p for p in _entries(cache, "layers") if p.suffix == ".tar"]


# -- --max-unpacked-size --------------------------------------------------------------


@pytest.mark.slow
def test_max_unpacked_size_bounds_the_sum_of_the_layers(three_layers: str, tmp_path: Path) -> None:
    """Each layer fits the limit; the three together do not."""
    out = tmp_path / "root.tar"
    r = run_vmimg(
        tmp_path, "-q", "rootfs", three_layers, "-o", str(out), "--max-unpacked-size", "8M"
    )
    assert r.returncode == 5, r.stderr
    assert _limit_error("8 MiB").fullmatch(r.stderr), r.stderr
    assert not out.exists()
    cache = tmp_path / "cache"
    assert _entries(cache, "tmp") == []  # the partial layer went with the error
    assert sum(p.stat().st_size for p in _layer_tars(cache)) <= 8 * MIB  # whole layers only
    # The environment variable sets it too; the option wins over it.
    env = {"VMIMG_MAX_UNPACKED_SIZE": "4M"}
    r = run_vmimg(tmp_path, "-q", "rootfs", three_layers, "-o", str(out), env=env)
    assert r.returncode == 5 and _limit_error("4 MiB").fullmatch(r.stderr), r.stderr
    r = run_vmimg(
        tmp_path,
        "-q",
        "rootfs",
        three_layers,
        "-o",
        str(out),
        "--max-unpacked-size",
        "10M",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert len(_layer_tars(cache)) == 3


def test_layers_already_in_the_cache_count_too(three_layers: str, tmp_path: Path) -> None:
    """The same image passes or fails the same limit whatever the cache holds."""
    out = tmp_path / "root.tar"
    r = run_vmimg(tmp_path, "-q", "rootfs", three_layers, "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = run_vmimg(
        tmp_path, "-q", "rootfs", three_layers, "-o", str(tmp_path / "again.tar"), "--no-cache",
        "--max-unpacked-size", "8M",
    )  # fmt: skip
    assert r.returncode == 5, r.stderr
    assert _limit_error("8 MiB").fullmatch(r.stderr), r.stderr


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "tmpfs", "64m") as mnt:
        yield mnt


def _fake_bzimage(path: Path, size: int) -> str:
    """Bytes `vmimg build --kernel` takes for an x86 bzImage (never booted here)."""
    data = bytearray(size)
    data[BZ_HEADER_MAGIC_OFFSET : BZ_HEADER_MAGIC_OFFSET + len(BZ_HEADER_MAGIC)] = BZ_HEADER_MAGIC
    path.write_bytes(bytes(data))
    return str(path)


def test_build_is_bounded_and_stops_before_a_full_disk(three_layers: str, tmp_path: Path) -> None:
    kernel = _fake_bzimage(tmp_path / "bzImage", MIB)
    out = tmp_path / "bundle"
    r = run_vmimg(tmp_path, "-q", "build", three_layers, "--kernel", kernel, "-o", str(out),
                  *IMAGE_INIT, "--max-unpacked-size", "8M")  # fmt: skip
    assert r.returncode == 5 and _limit_error("8 MiB").fullmatch(r.stderr), r.stderr
    assert not out.exists() and _entries(tmp_path / "cache", "tmp") == []
    with mounted_tmpfs(tmp_path / "small", "5m") as small:
        # erofs: 9 MiB of file data and the kernel cannot fit; known before writing.
        r = run_vmimg(
            tmp_path,
            "-q",
            "build",
            three_layers,
            "--kernel",
            kernel,
            "-o",
            f"{small}/b",
            *IMAGE_INIT,
        )
        assert r.returncode == 7, r.stderr
        assert re.fullmatch(f"vmimg: error: cannot write {small}/b: it needs at least 10 MiB "
                            f"and {small} has .* free \\(vmimg leaves .* unused\\)\n",
                            r.stderr), r.stderr  # fmt: skip
        assert os.listdir(small) == []
        # A compressed initramfs has no size floor: the disk fills, the error is as clean.
        noise = tmp_path / "noise"
        layer = LayerSpec(L.layer(L.file("noise", random.Random(3).randbytes(6 * MIB))))
        write_layout(str(noise), {"t": ImageSpec([layer])})
        r = run_vmimg(tmp_path, "-q", "build", f"oci:{noise}:t", "--fs", "initramfs", "--kernel",
                      kernel, "-o", f"{small}/b", *IMAGE_INIT)  # fmt: skip
        assert r.returncode == 7, r.stderr
        assert r.stderr == f"vmimg: error: cannot write {small}/b: No space left on device\n"
        assert os.listdir(small) == []


def test_a_bomb_costs_the_cache_at_most_the_limit(tmpfs: Path, tmp_path: Path) -> None:
    """A zstd layer of a few KiB that claims 4 GiB: refused once it reaches 32 MiB, before
    it fills the 64 MiB file system the cache is on, and nothing of it stays."""
    source = image(then=raw_layer(bomb("zstd"), ZSTD_TYPE, ZERO_DIFF_ID))(tmp_path / "bomb")
    env = {"VMIMG_CACHE": str(tmpfs)}
    out = tmp_path / "root.tar"
    r = run_vmimg(
        tmp_path, "-q", "rootfs", source, "-o", str(out), "--max-unpacked-size", "32M", env=env
    )
    assert r.returncode == 5, r.stderr
    assert _limit_error("32 MiB").fullmatch(r.stderr), r.stderr
    assert _entries(tmpfs, "tmp") == [] and _layer_tars(tmpfs) == []
    # Without a limit below the file system's size, the free space check stops it instead.
    r = run_vmimg(tmp_path, "-q", "rootfs", source, "-o", str(out), env=env)
    assert r.returncode == 8, r.stderr
    assert re.fullmatch(LAYER_LINE + f"the cache file system at {tmpfs} is nearly full .*\n",
                        r.stderr), r.stderr  # fmt: skip
    assert _entries(tmpfs, "tmp") == [] and _layer_tars(tmpfs) == []


# -- locked work in progress, prune ----------------------------------------------------------


def _prune(work: Path, *args: str) -> str:
    r = run_vmimg(work, "cache", "prune", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
def test_prune_never_takes_a_live_writers_work_and_the_next_run_reclaims_a_dead_ones(
    one_layer: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "root.tar"
    args = ("rootfs", one_layer, "-o", str(out))
    kept = re.compile(r"^  tmp +0 bytes  0 removed, 1 in use kept$", re.M)
    with paused_vmimg(tmp_path, "layer-unpack-midway", *args) as writer:
        partial = list((cache / "tmp").glob("vmimg-*-layer-*.tar"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        assert kept.search(_prune(tmp_path))
        assert kept.search(_prune(tmp_path, "--all"))
        assert partial[0].exists()
        writer.release()
        code, _out, err = writer.finish()
    assert code == 0, err  # prune --all took nothing it was using
    assert not partial[0].exists()
    # A writer killed mid-unpack: its partial layer stays until the next run reclaims it.
    for area in ("layers", "outputs"):
        subprocess.run(["rm", "-rf", str(cache / area)], check=True)
    with paused_vmimg(tmp_path, "layer-unpack-midway", *args) as writer:
        partial = list((cache / "tmp").glob("vmimg-*-layer-*.tar"))
        writer.proc.kill()
        writer.finish()
    assert len(partial) == 1 and partial[0].exists()
    r = run_vmimg(tmp_path, "cache", "ls")
    assert r.returncode == 0, r.stderr
    assert _entries(cache, "tmp") == []


HOLDER = """
import sys
from vmimg.image.cache import Cache
cache = Cache.open(sys.argv[1])
assert all(cache.pin(p) for p in sys.argv[2:])
with cache.lock("held-by-the-holder"):
    print("ready", flush=True)
    sys.stdin.read()
"""


def _fake_kernel_area(cache: Path) -> dict[str, Path]:
    """What `vmimg kernel build` leaves: a build, an extracted source, its memo, a log."""
    kernels = cache / "kernels"
    paths = {
        "build": kernels / "0123456789abcdef",
        "source": kernels / "sources" / "fedcba9876543210",
        "log": kernels / "logs" / "0123456789abcdef.log",
    }
    (paths["build"]).mkdir(parents=True)
    (paths["build"] / "vmlinux").write_bytes(bytes(MIB))
    for i in range(300):  # more files than are fsynced one by one
        d = paths["source"] / f"dir{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.c").write_bytes(bytes(4096))
    (paths["source"] / "Makefile").write_text("VERSION = 6\n")
    (kernels / "sources" / "fedcba9876543210.stat").write_text("memo\n")
    paths["log"].parent.mkdir(parents=True)
    paths["log"].write_text("make\n")
    return paths


def test_prune_all_removes_everything_but_what_live_processes_hold(
    three_layers: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    r = run_vmimg(tmp_path, "-q", "rootfs", three_layers, "-o", str(tmp_path / "root.tar"))
    assert r.returncode == 0, r.stderr
    kernel = _fake_kernel_area(cache)
    (cache / "accel").mkdir()
    (cache / "accel" / "verdict.json").write_text("{}")
    held_layer = _layer_tars(cache)[0]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cache), str(kernel["source"]), str(held_layer)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        text = _prune(tmp_path, "--all")
        assert kernel["source"].is_dir() and held_layer.exists()
        assert (cache / "locks" / "held-by-the-holder").exists()
    finally:
        holder.communicate("")
    assert re.match(r"pruned .*: freed \d+(\.\d)? MiB\n", text), text
    assert re.search(r"^  kernels +\d+(\.\d)? MiB  \d+ removed, 1 in use kept$", text, re.M), text
    assert not kernel["build"].exists() and not kernel["log"].exists()
    assert _entries(cache, "outputs") == [] and _entries(cache, "accel") == []
    assert len(_layer_tars(cache)) == 1
    # The holder is gone: now everything goes, its kernel source (1.3 GB for real) too.
    text = _prune(tmp_path, "--all")
    assert "in use" not in text
    leftovers = [p for p in cache.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    for area in ("blobs/sha256", "layers/sha256", "outputs", "tmp", "locks", "kernels"):
        assert (cache / area).is_dir(), area  # emptied, not removed: others rename into them


def test_prune_without_all_keeps_layers_and_kernels(three_layers: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = run_vmimg(tmp_path, "-q", "rootfs", three_layers, "-o", str(tmp_path / "root.tar"))
    assert r.returncode == 0, r.stderr
    kernel = _fake_kernel_area(cache)
    text = _prune(tmp_path)
    assert re.search(r"^  outputs +\d+\.\d MiB  1 removed$", text, re.M), text
    assert _entries(cache, "outputs") == []
    assert len(_layer_tars(cache)) == 3 and all(p.exists() for p in kernel.values())


def _wait_until_blocked_on(inode: int) -> None:
    """Until /proc/locks shows a flock request waiting ("->") on the file `inode`."""
    deadline = time.monotonic() + PAUSE_TIMEOUT
    while not re.search(rf"-> FLOCK .*:{inode} ", Path("/proc/locks").read_text()):
        assert time.monotonic() < deadline, "the waiter never blocked on the lock"
        time.sleep(PAUSE_POLL)


def test_a_lock_file_removed_while_waited_on_is_taken_again(tmp_path: Path) -> None:
    """prune --all removes lock files nobody holds; a process that was waiting on one
    then holds a lock on a removed file, notices, and locks the file at the path."""
    cache = Cache.open(str(tmp_path / "cache"))
    path = Path(cache.root) / "locks" / "k"
    waiting, holding = threading.Event(), threading.Event()
    release = threading.Event()

    def waiter() -> None:
        waiting.set()
        with cache.lock("k"):
            holding.set()
            release.wait()

    t = threading.Thread(target=waiter, daemon=True)
    try:
        with cache.lock("k"):
            t.start()
            waiting.wait()
            _wait_until_blocked_on(path.stat().st_ino)
            path.unlink()  # as prune does, holding the lock, to a file it found unheld
        assert holding.wait(PAUSE_TIMEOUT)
        probe = subprocess.run(
            [need("flock"), "--nonblock", str(path), "true"], capture_output=True, check=False
        )
        assert probe.returncode == 1  # the waiter holds the lock on the file at the path
    finally:
        release.set()
        t.join()


# -- durability ----------------------------------------------------------------------------

_CALL = re.compile(r"^\d+ +(fsync|rename|fsetxattr)\((.*?)(\) += |<unfinished)")
_FD_PATH = re.compile(r"^\d+<(.*)>$")
# Committed unsynced, marked as this boot's (image/unsynced.py); the rest fsynced.
_MARKED_KINDS = {"layers/sha256/H.tar", "outputs/H"}


def test_every_cache_entry_is_durable_or_durably_marked_before_its_rename(
    three_layers: str, tmp_path: Path
) -> None:
    """Blobs: fsynced before their rename, their directory after. Layers and outputs: marked
    with this boot's id and the mark fsynced before their rename. Hit records need neither
    (a torn one is no JSON, and is not used)."""
    log = tmp_path / "strace.log"
    cache = tmp_path / "cache"
    r = run_vmimg(tmp_path, "cache", "ls")  # the cache's directories exist before the trace
    assert r.returncode == 0, r.stderr
    env = {"VMIMG_CACHE": str(cache)}
    traced = subprocess.run(
        [need("strace"), "-f", "-y", "-e", "trace=fsync,rename,fsetxattr", "-o", str(log),
         sys.executable, "-m", "vmimg", "rootfs", three_layers, "-o", str(tmp_path / "r.tar")],
        capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"}, check=False,
    )  # fmt: skip
    assert traced.returncode == 0, traced.stderr
    events: list[tuple[str, str]] = []  # (call, path): fsync and fsetxattr by their fd's path
    renames: list[tuple[str, str, int]] = []  # (source, target, index of the next event)
    for line in log.read_text().splitlines():
        m = _CALL.match(line)
        if m and m.group(1) == "rename":
            src, dst = (a.strip().strip('"') for a in m.group(2).split(", "))
            renames.append((src, dst, len(events)))
        elif m:
            if m.group(1) == "fsetxattr" and unsynced.MARK not in m.group(2):
                continue
            fd = _FD_PATH.match(m.group(2).split(",")[0].strip())
            assert fd, line
            events.append((m.group(1), fd.group(1)))
    into_cache = [x for x in renames if x[1].startswith(str(cache) + "/")]
    # digests name the entries (64 hex digits), a checksum of their key the hit records (8)
    hashed = re.compile(r"[0-9a-f]{64}|(?<=^hits/)[0-9a-f]{8}")
    kinds = {}
    for src, dst, after in into_cache:
        kind = hashed.sub("H", dst[len(str(cache)) + 1 :])
        kinds[kind] = kinds.get(kind, 0) + 1
        before, since = events[:after], events[after:]
        if kind in _MARKED_KINDS:
            marked = before.index(("fsetxattr", src))
            assert ("fsync", src) in before[marked:], src  # the mark is on the disk first
        elif kind != "hits/H.hit":
            synced = [p for call, p in before if call == "fsync"]
            assert src in synced or any(p.startswith(src + "/") for p in synced), src
            assert ("fsync", str(Path(dst).parent)) in since, dst
    assert kinds == {"blobs/sha256/H": kinds.get("blobs/sha256/H"), "layers/sha256/H.tar": 3,
                     "outputs/H": 1, "hits/H.hit": 1}, kinds  # fmt: skip
    assert kinds["blobs/sha256/H"]
    marks = [os.getxattr(p, unsynced.MARK) for p in (cache / "layers" / "sha256").iterdir()]
    assert marks == [unsynced.boot_id()] * 3


def test_a_flusher_flushes_the_file_while_it_is_written_and_stops_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        flushed.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    fd = os.open(tmp_path / "entry", os.O_WRONLY | os.O_CREAT)
    try:
        with Flusher(fd, every=0.001):
            os.write(fd, b"x" * (1 << 20))
            deadline = time.monotonic() + 10
            while not flushed and time.monotonic() < deadline:
                time.sleep(0.001)
        after = len(flushed)
        time.sleep(0.02)
    finally:
        os.close(fd)
    assert after > 0 and set(flushed) == {fd}
    assert len(flushed) == after  # nothing once the block is left


def test_a_flusher_on_a_file_that_cannot_be_flushed_ends_quietly() -> None:
    r, w = os.pipe()  # fdatasync(2) on a pipe: EINVAL
    try:
        with Flusher(w, every=0.001) as flusher:
            time.sleep(0.02)
        assert not flusher._thread.is_alive()
    finally:
        os.close(r)
        os.close(w)


def test_space_taken_but_not_yet_written_is_not_counted_free_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two layers stream at once: while one thread's write is in flight, statvfs does not
    show it yet, so a fresh reading by the other must take it off (else both fit in the
    same free space, and the disk fills past vmimg's reserve)."""
    mib = 1 << 20
    monkeypatch.setattr(cache_module, "free_space", lambda path: (10 * mib, mib))  # 9 usable
    guard = cache_module.SpaceGuard(str(tmp_path))
    guard.take(5 * mib, "layer a")  # in flight: the file system still says 10 MiB free
    with pytest.raises(CacheError, match="nearly full"):
        guard.take(4 * mib + 1, "layer b")
    guard.landed(5 * mib)  # written; free_space (unchanged here) would now show it
    guard.take(4 * mib, "layer b")
