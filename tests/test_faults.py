"""Faults: a flaky registry (through a fault-injecting proxy), kills, Ctrl-C, a full disk,
and concurrent conversions sharing one cache. All through the real CLI. Kills and
interrupts land at named points of the test hook (vmimg/testhook.py), not after sleeps.

The registry is the real docker-registry (fixture `registry`); the proxy in
tests/hostile/faultproxy.py drops, stalls or refuses chosen requests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import layerkit as L
from tests.conftest import skopeo_copy
from tests.hostile.cli import confined_command, confined_env, paused_vmimg, run_vmimg
from tests.hostile.faultproxy import Rule, fault_proxy
from vmimg.image.fsutil import MIN_FREE_SHARE
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout
from vmimg.rootfs.handout import SEAL_RECORD, entry_untouched

TAGS = ("a", "b", "c", "d")
BASE_BYTES = 3 << 20  # random, so its gzip blob is as large
REPO = "faults/img"
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Images:
    layout: Path
    registry: str
    base_blob: str  # digest of the shared base layer blob
    configs: dict[str, str]  # tag -> config digest
    expected: dict[str, bytes]  # tag -> the tar vmimg makes from the local layout


def _manifest(layout: Path, digest: str) -> dict[str, object]:
    data = (layout / "blobs" / "sha256" / digest[7:]).read_bytes()
    obj: dict[str, object] = json.loads(data)
    return obj


@pytest.fixture(scope="module")
def images(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Four images sharing a 3 MiB base layer, pushed to the registry, with reference outputs."""
    root = tmp_path_factory.mktemp("fault-images")
    layout = root / "layout"
    base = LayerSpec(L.layer(L.file("base/blob", random.Random(1).randbytes(BASE_BYTES))))
    specs = {
        tag: ImageSpec([base, LayerSpec(L.layer(L.file(f"own/{tag}", tag.encode() * 1000)))])
        for tag in TAGS
    }
    digests = write_layout(str(layout), dict(specs))
    configs = {}
    base_blob = ""
    for tag, digest in digests.items():
        man = _manifest(layout, digest)
        configs[tag] = man["config"]["digest"]  # type: ignore[index]
        base_blob = man["layers"][0]["digest"]  # type: ignore[index]
        skopeo_copy(f"oci:{layout}:{tag}", f"docker://{registry}/{REPO}:{tag}")
    expected = {}
    for tag in TAGS:
        out = root / f"{tag}.tar"
        r = run_vmimg(root / "ref", "rootfs", f"oci:{layout}:{tag}", "-o", str(out))
        assert r.returncode == 0, r.stderr
        expected[tag] = out.read_bytes()
    return Images(layout, registry, base_blob, configs, expected)


def pull(
    work: Path, proxy: str, tag: str, out: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_vmimg(
        work, "rootfs", f"docker://{proxy}/{REPO}:{tag}", "-o", str(out), "-q", env=env
    )


FAST_RETRIES = {"VMIMG_REGISTRY_RETRIES": "3"}


def test_dropped_blob_resumes_with_range(images: Images, tmp_path: Path) -> None:
    rules = [Rule(f"GET .*/blobs/{images.base_blob}", "drop", times=2)]
    with fault_proxy(images.registry, rules) as proxy:
        r = pull(tmp_path, proxy.address, "a", tmp_path / "a.tar", FAST_RETRIES)
        gets = proxy.gets(f"/blobs/{images.base_blob}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.tar").read_bytes() == images.expected["a"]
    # The first GET and one resume were cut; the resumes asked for the rest only.
    assert [g.fault for g in gets] == ["drop", "drop", None]
    assert gets[0].range is None
    starts = [int(g.range.split("=")[1].rstrip("-")) for g in gets[1:] if g.range]
    assert len(starts) == 2 and 0 < starts[0] < starts[1] < BASE_BYTES + 4096


@pytest.mark.slow  # seconds of retries and timeouts: full run only
def test_5xx_and_429_with_retry_after_are_retried(images: Images, tmp_path: Path) -> None:
    rules = [
        Rule("GET .*/manifests/", 500, times=2),
        Rule(f"GET .*/blobs/{images.configs['b']}", 503),
        Rule(f"GET .*/blobs/{images.base_blob}", 429, retry_after=1),
    ]
    with fault_proxy(images.registry, rules) as proxy:
        start = time.monotonic()
        r = pull(tmp_path, proxy.address, "b", tmp_path / "b.tar", FAST_RETRIES)
        elapsed = time.monotonic() - start
        faults = [s.fault for s in proxy.seen if s.fault is not None]
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b.tar").read_bytes() == images.expected["b"]
    assert sorted(faults, key=str) == [429, 500, 500, 503]
    assert elapsed >= 1.0  # Retry-After was honoured


@pytest.mark.slow  # seconds of retries and timeouts: full run only
def test_persistent_500_is_a_clear_error_in_bounded_time(images: Images, tmp_path: Path) -> None:
    with fault_proxy(images.registry, [Rule("GET .*/manifests/", 500, times=100)]) as proxy:
        start = time.monotonic()
        r = pull(tmp_path, proxy.address, "a", tmp_path / "a.tar", {"VMIMG_REGISTRY_RETRIES": "2"})
        elapsed = time.monotonic() - start
        address = proxy.address
    assert r.returncode == 4
    *retries, last = r.stderr.splitlines()
    assert last == (
        f"vmimg: error: manifest {address}/{REPO}:a: 500 Internal Server Error (injected fault)"
    )
    # One line per retry, then the error.
    assert retries == [
        f"vmimg: manifest {address}/{REPO}:a: 500 Internal Server Error; retry {n} of 2 in {d} s"
        for n, d in ((1, "0.5"), (2, "1"))
    ]
    assert elapsed < 20
    assert not (tmp_path / "a.tar").exists()


def test_stall_resumes_after_the_read_timeout(images: Images, tmp_path: Path) -> None:
    rules = [Rule(f"GET .*/blobs/{images.base_blob}", "stall", stall=20)]
    env = {"VMIMG_REGISTRY_TIMEOUT": "1", **FAST_RETRIES}
    with fault_proxy(images.registry, rules) as proxy:
        start = time.monotonic()
        r = pull(tmp_path, proxy.address, "c", tmp_path / "c.tar", env)
        elapsed = time.monotonic() - start
        gets = proxy.gets(f"/blobs/{images.base_blob}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.tar").read_bytes() == images.expected["c"]
    assert elapsed < 15 and gets[-1].range is not None


@pytest.mark.slow  # seconds of retries and timeouts: full run only
def test_endless_stall_fails_in_bounded_time(images: Images, tmp_path: Path) -> None:
    rules = [Rule(f"GET .*/blobs/{images.base_blob}", "stall", times=100, stall=20)]
    env = {"VMIMG_REGISTRY_TIMEOUT": "1", "VMIMG_REGISTRY_RETRIES": "2"}
    with fault_proxy(images.registry, rules) as proxy:
        start = time.monotonic()
        r = pull(tmp_path, proxy.address, "d", tmp_path / "d.tar", env)
        elapsed = time.monotonic() - start
    assert r.returncode == 4, r.stderr
    *resumes, last = DIGEST_RE.sub("DIGEST", r.stderr).splitlines()
    assert last == "vmimg: error: blob DIGEST: download failed: ReadTimeoutError"
    # One line per resume, then the error.
    assert [re.sub(r"byte \d+", "byte N", line) for line in resumes] == [
        f"vmimg: blob DIGEST: ReadTimeoutError at byte N; resuming ({n} of 2)" for n in (1, 2)
    ]
    assert elapsed < 30
    assert not (tmp_path / "d.tar").exists()
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_four_conversions_at_once_share_one_cache(images: Images, tmp_path: Path) -> None:
    """Overlapping images converted concurrently: all correct, every blob fetched once."""
    with fault_proxy(images.registry) as proxy:
        procs = {
            tag: subprocess.Popen(
                confined_command(
                    "rootfs", f"docker://{proxy.address}/{REPO}:{tag}", "-o", str(tmp_path / tag)
                ),
                cwd=tmp_path,
                env=confined_env(tmp_path / "shared"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for tag in TAGS
        }
        results = {tag: (p.communicate(timeout=120), p.returncode) for tag, p in procs.items()}
        blob_gets = proxy.gets("/blobs/")
    for tag, ((_out, err), code) in results.items():
        assert code == 0, err
        assert (tmp_path / tag).read_bytes() == images.expected[tag]
    fetched = [g.path.rsplit("/", 1)[1] for g in blob_gets]
    assert fetched.count(images.base_blob) == 1
    assert len(fetched) == len(set(fetched)) == 1 + 2 * len(TAGS)  # base + config + own layer


# -- kills, Ctrl-C, full disk (local layouts: no registry needed) -----------------------


@pytest.fixture(scope="module")
def busy_layout(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image that takes a second or so to convert: three layers of random data."""
    layout = tmp_path_factory.mktemp("busy") / "layout"
    rng = random.Random(7)
    layers = [
        LayerSpec(L.layer(*[L.file(f"l{i}/f{j}", rng.randbytes(2 << 20)) for j in range(6)]), c)
        for i, c in enumerate(("gzip", "zstd", "gzip"))
    ]
    write_layout(str(layout), {"busy": ImageSpec(layers)})
    return f"oci:{layout}:busy"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_cache_consistent(cache: Path, expected: dict[str, bytes]) -> None:
    """Every file under a final name is whole: blobs and layers hash to their names,
    finished outputs equal the reference bytes of their format."""

    def files(*parts: str) -> list[Path]:
        d = cache.joinpath(*parts)
        return sorted(d.iterdir()) if d.is_dir() else []

    for blob in files("blobs", "sha256"):
        assert _sha256(blob) == blob.name, blob
    for f in files("layers", "sha256"):
        if f.suffix == ".tar":
            assert _sha256(f) == f.stem, f
        else:
            raise AssertionError(f"{f}: the layers area holds only layer tars")
    for key in files("outputs"):
        assert entry_untouched(str(key)), key  # complete, with its seal record
        for out in key.iterdir():
            if out.name != SEAL_RECORD:
                fmt = out.name.split(".", 1)[1]
                assert out.read_bytes() == expected[fmt], out


@pytest.fixture(scope="module")
def busy_expected(busy_layout: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("busy-ref")
    expected = {}
    for fmt in ("tar", "ext4", "erofs"):
        out = root / f"root.{fmt}"
        r = run_vmimg(root, "rootfs", busy_layout, "--format", fmt, "-o", str(out))
        assert r.returncode == 0, r.stderr
        expected[fmt] = out.read_bytes()
    return expected


# Where a SIGKILL lands, and the temporary entry the killed run leaves there (a glob under
# the work directory; None: nothing of its own in progress at that point).
KILL_POINTS: dict[str, str | None] = {
    "layer-unpack-midway": "cache/tmp/vmimg-*-layer-*.tar",
    "layer-committed": None,
    "output-write-midway": "cache/tmp/vmimg-*-output-*",  # written as a cache entry first
    "output-renamed": None,
    "output-cache-store": "cache/tmp/vmimg-*-output-*",
}
FORMATS = ("tar", "ext4", "erofs")


def _rootfs_args(source: str, fmt: str, out: Path) -> tuple[str, ...]:
    return ("rootfs", source, "--format", fmt, "-o", str(out), "-q")  # -q: errors only


# Each kill point once in the fast tier, in one format (rotating); the others in the slow one.
KILL_RUNS = [
    pytest.param(point, fmt, marks=() if fmt == FORMATS[i % len(FORMATS)] else (pytest.mark.slow,))
    for i, point in enumerate(KILL_POINTS)
    for fmt in FORMATS
]


@pytest.mark.parametrize(("point", "fmt"), KILL_RUNS)
def test_sigkill_at_each_point_keeps_the_cache_consistent(
    point: str, fmt: str, busy_layout: str, busy_expected: dict[str, bytes], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cache = tmp_path / "cache"
    out = out_dir / f"root.{fmt}"
    with paused_vmimg(tmp_path, point, *_rootfs_args(busy_layout, fmt, out)) as paused:
        paused.proc.kill()
        code, _out, err = paused.finish()
    assert code == -signal.SIGKILL, err
    left = KILL_POINTS[point]
    assert left is None or list(tmp_path.glob(left)), f"{point}: nothing in progress there"
    check_cache_consistent(cache, busy_expected)
    if out.exists():  # appears only complete
        assert out.read_bytes() == busy_expected[fmt]
    # The next run reclaims what the killed one left in the cache and does the work.
    r = run_vmimg(tmp_path, *_rootfs_args(busy_layout, fmt, out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == busy_expected[fmt]
    assert os.listdir(cache / "tmp") == []
    check_cache_consistent(cache, busy_expected)


@pytest.mark.parametrize(
    "point",
    [
        pytest.param(p, marks=(pytest.mark.slow,) if p == "output-cache-store" else ())
        for p in KILL_POINTS
        if p != "layer-committed"
    ],
)
def test_sigint_leaves_no_temporary_files(
    point: str, busy_layout: str, busy_expected: dict[str, bytes], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "root.ext4"
    with paused_vmimg(tmp_path, point, *_rootfs_args(busy_layout, "ext4", out)) as paused:
        paused.proc.send_signal(signal.SIGINT)
        paused.release()  # a worker thread waits there: the interrupt stops it next
        code, _out, err = paused.finish()
    assert (code, err) == (130, "vmimg: interrupted\n")
    # Nothing, or (interrupted after the rename) the whole output: never a temporary.
    if point == "output-renamed":
        assert os.listdir(out_dir) == ["root.ext4"]
        assert out.read_bytes() == busy_expected["ext4"]
    else:
        assert os.listdir(out_dir) == []
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    check_cache_consistent(tmp_path / "cache", busy_expected)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 5 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _refused_for_room(r: subprocess.CompletedProcess[str], out: Path, mib: str) -> bool:
    """Did vmimg refuse to write `out` up front, saying it needs `mib` (a regex) MiB?"""
    free = r"[0-9.]+ (bytes|KiB|MiB)"
    return r.returncode == 7 and bool(
        re.fullmatch(
            f"vmimg: error: cannot write {out}: it needs at least {mib} MiB and "
            f"{out.parent} has {free} free \\(vmimg leaves {free} unused\\)\n",
            r.stderr,
        )
    )


@pytest.mark.slow
def test_full_disk_while_writing_the_image(
    busy_layout: str, small_disk: Path, tmp_path: Path
) -> None:
    for fmt in ("tar", "ext4", "erofs"):  # checked before writing: 36 MiB of file data
        out = small_disk / f"root.{fmt}"
        r = run_vmimg(tmp_path, "rootfs", busy_layout, "--format", fmt, "-o", str(out), "-q")
        assert _refused_for_room(r, out, "36[.0-9]*"), r.stderr
        assert os.listdir(small_disk) == []
    # A compressed initramfs has no known size: the disk fills while it is written (with
    # --no-cache: it is written at its destination) ...
    out = small_disk / "root.cpio.gz"
    gz = ("rootfs", busy_layout, "--format", "initramfs", "-o", str(out), "-q")
    r = run_vmimg(tmp_path, *gz, "--no-cache")
    assert r.returncode == 7, r.stderr
    assert r.stderr == f"vmimg: error: cannot write {out}: No space left on device\n"
    assert os.listdir(small_disk) == []
    # ... or it is made in the cache, and the copy out is measured before it is made.
    r = run_vmimg(tmp_path, *gz)
    assert _refused_for_room(r, out, "3[0-9.]*"), r.stderr
    assert os.listdir(small_disk) == []


def test_a_cache_with_room_for_the_layers_but_not_the_image_still_converts(
    small_disk: Path, tmp_path: Path
) -> None:
    """A compressed image has no size known up front: when the cache's disk fills while the
    image is written there, it is written at its destination instead (keeping a copy is
    optional), and the cache keeps no part of it."""
    layout = tmp_path / "layout"
    layer = L.layer(L.file("random", random.Random(3).randbytes(3 << 20)))
    write_layout(str(layout), {"r": ImageSpec([LayerSpec(layer, "gzip")])})
    out, direct = tmp_path / "root.cpio.gz", tmp_path / "direct.cpio.gz"
    args = ("rootfs", f"oci:{layout}:r", "--format", "initramfs", "-q")
    r = run_vmimg(tmp_path, *args, "-o", str(out), env={"VMIMG_CACHE": str(small_disk)})
    assert r.returncode == 0, r.stderr
    assert len(gzip.decompress(out.read_bytes())) > 3 << 20
    assert os.listdir(small_disk / "tmp") == []
    assert os.listdir(small_disk / "outputs") == []
    r = run_vmimg(tmp_path, *args, "-o", str(direct), "--no-cache")
    assert r.returncode == 0, r.stderr
    assert direct.read_bytes() == out.read_bytes()


def test_full_disk_under_the_cache(busy_layout: str, small_disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "root.tar"
    r = run_vmimg(
        tmp_path, "rootfs", busy_layout, "-o", str(out), "-q", env={"VMIMG_CACHE": str(small_disk)}
    )
    assert r.returncode == 8, r.stderr
    message = DIGEST_RE.sub("DIGEST", r.stderr)
    free = r"[0-9.]+ (bytes|KiB|MiB)"
    assert re.fullmatch(
        f"vmimg: error: layer DIGEST: the cache file system at {small_disk} is nearly full "
        f"\\({free} free; vmimg leaves {free} unused\\)\n",
        message,
    ), message
    assert not out.exists()
    assert os.listdir(small_disk / "tmp") == []
    assert os.listdir(small_disk / "layers" / "sha256") == []
    # Stopped with the reserve still free, not at 100 %: other writers still have room.
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize >= st.f_blocks * st.f_frsize // MIN_FREE_SHARE
