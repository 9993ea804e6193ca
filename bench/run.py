"""The benchmark suite: vmimg against the upstream C tools, from an empty cache, per row.

    python -m bench.run [--fixtures minbase,smallfiles,smallfiles400k] [--runs 3] [--json FILE]

Each row of ROWS pits a vmimg conversion from an empty cache (blobs in, image out: decompression
and digest checks included) against the peer that does the same job: mke2fs -d reading the
gzip layer, mkfs.erofs --tar reading the gzip layers (--aufs, and --incremental=data for the
layers after the first). Every contender runs as its own process, several times, interleaved,
on the same machine in the same run; we record wall time (median and spread), peak RSS (from a
small launcher, bench/peakrss.py) and the output size, and compute vmimg / peer per row. Also
measured: the physical limit of the cold minbase ext4 conversion (bench/limit.py), a warm hit
(conversion cached) against the cold conversion (also on a loop-mounted XFS with reflink, when
run as root), and peak RSS at 100k and 400k entries.
Peers are found on PATH, or where VMIMG_BENCH_MKE2FS / VMIMG_BENCH_MKFS_EROFS point.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import fixtures
from bench.limit import layers
from bench.peakrss import run_with_peak_rss

VMIMG = [sys.executable, "-m", "vmimg"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_TAG = "gzip"  # the fixtures' all-gzip tag: the peers read no zstd
MIB = 1 << 20
KIB = 1 << 10
BLOCK = 4096
# mke2fs -d wants the size and the inode count up front: the content's blocks plus 30%, 1 KiB
# per entry (inode tables, directories) and 64 MiB; an inode per entry plus 20% and 1024.
SIZE_SLACK_NUM, SIZE_SLACK_DEN = 13, 10
SIZE_BASE_KIB = 64 * KIB
INODE_SLACK_NUM, INODE_SLACK_DEN = 6, 5
INODE_BASE = 1024

COLD_EXT4 = "vmimg ext4 (empty cache)"
COLD_EROFS = "vmimg erofs (empty cache)"
COLD_LZ4HC = "vmimg erofs lz4hc (empty cache)"
MKE2FS = "mke2fs -d layer1.tar.gz"
MKFS_EROFS = "mkfs.erofs --tar=f --ungzip (--aufs, --incremental=data after layer 1)"
MKFS_EROFS_LZ4HC = "mkfs.erofs -zlz4hc, same layers"
# Layer by layer, mkfs.erofs keeps the data of files later layers delete: its image holds more
# than vmimg's. Given the flattened tree (untimed `vmimg rootfs --format tar`), sizes compare
# like for like (it skips decompression and flattening, so its time is a floor, not a peer's).
MKFS_EROFS_LZ4HC_FLAT = "mkfs.erofs -zlz4hc --tar=f flattened.tar"
LIMIT = "physical limit (isal + sha256 + write)"

# The rows of issue #18: (fixture, work, vmimg contender, peer contender).
ROWS = [
    ("minbase", "Debian minbase, 2 layers -> ext4", COLD_EXT4, MKE2FS),
    ("minbase", "Debian minbase, 2 layers -> erofs", COLD_EROFS, MKFS_EROFS),
    ("minbase", "Debian minbase -> erofs lz4hc", COLD_LZ4HC, MKFS_EROFS_LZ4HC),
    ("minbase", "same, peer given the flattened tree (size)", COLD_LZ4HC, MKFS_EROFS_LZ4HC_FLAT),
    ("smallfiles", "100,000 small files, one gzip layer -> ext4", COLD_EXT4, MKE2FS),
    ("smallfiles", "100,000 small files, one gzip layer -> erofs", COLD_EROFS, MKFS_EROFS),
]
# Which contenders each fixture runs (the 400k one is there for the memory curve only).
# Both Debian fixtures: every row, the limit and the lz4hc comparisons.
DEBIAN_PLAN = [
    COLD_EXT4,
    LIMIT,
    MKE2FS,
    COLD_EROFS,
    MKFS_EROFS,
    COLD_LZ4HC,
    MKFS_EROFS_LZ4HC,
    MKFS_EROFS_LZ4HC_FLAT,
]
PLAN = {
    "minbase": DEBIAN_PLAN,
    "large": DEBIAN_PLAN,
    "smallfiles": [COLD_EXT4, MKE2FS, COLD_EROFS, MKFS_EROFS],
    "smallfiles400k": [COLD_EXT4, COLD_EROFS],
}
WARM_FIXTURES = ("minbase", "smallfiles")
# Warm hits where the cache and the output share a file system with reflink (the machine's
# own may have none: ext4 images are then copied). Sparse: only what is written takes room.
WARM_ON_XFS = ", on XFS with reflink"
XFS_IMAGE_BYTES = 8 << 30
# (format, the cold contender a warm hit is a share of, which warm contender)
WARM_KINDS = (
    ("ext4", COLD_EXT4, ""),
    ("erofs", COLD_EROFS, ""),
    ("ext4", COLD_EXT4, WARM_ON_XFS),
)
LIMIT_FIXTURE, LIMIT_OF = "minbase", COLD_EXT4
# Peak RSS at two sizes gives the growth per entry.
RSS_FIXTURES = (
    ("smallfiles", fixtures.SMALL_FILES),
    ("smallfiles400k", fixtures.SMALL_FILES_LARGE),
)


@dataclass
class Inputs:
    """What a contender's commands are made from, for one fixture in one work directory."""

    ref: str  # oci:LAYOUT:latest, what vmimg converts
    layout: str
    peer_layers: list[str]  # the gzip blobs, in order
    size_hint: list[str]  # mke2fs's -N and size for the first layer
    work: str
    flat: str  # the flattened tree as one tar, made untimed when a contender reads it
    allocated: dict[str, int] = field(default_factory=dict)  # latest output of each contender


@dataclass
class Contender:
    name: str
    fmt: str
    argv: Callable[[Inputs, str], list[list[str]]]  # (inputs, out) -> commands, timed
    prepare: Callable[[Inputs], None] | None = None  # before each run, not timed


@dataclass
class Result:
    fixture: str
    name: str
    fmt: str
    seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    output_bytes: int = 0
    allocated_bytes: int = 0  # what the output really occupies (images are sparse)
    handout: str = ""  # warm hits: how the cached image reached the output path

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        return (max(self.seconds) - min(self.seconds)) if len(self.seconds) > 1 else 0.0

    @property
    def peak(self) -> float:
        return max(self.peak_rss_mb, default=0.0)


def tool(env: str, name: str) -> str | None:
    return os.environ.get(env) or shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def run_timed(commands: list[list[str]], env: dict[str, str]) -> tuple[float, float]:
    """Run commands in sequence; total wall seconds and the max peak RSS (MiB) among them.
    The disk is synced first, untimed: no contender fsyncs its output, so what earlier runs
    left in the page cache would otherwise go out to disk during this one's time."""
    os.sync()
    seconds = 0.0
    peak = 0.0
    for cmd in commands:
        run = run_with_peak_rss(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if run.result.returncode != 0:
            stderr = run.result.stderr.decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd)} failed: {stderr[-2000:]}")
        seconds += run.seconds
        peak = max(peak, run.peak_rss_kib / KIB)
    return seconds, peak


def layout_dir(ref: str) -> str:
    return ref[len("oci:") :].rsplit(":", 1)[0]


def _cold_cache(inp: Inputs) -> str:
    return os.path.join(inp.work, "cold-cache")


def _empty_cache(inp: Inputs) -> None:
    shutil.rmtree(_cold_cache(inp), ignore_errors=True)


def _vmimg_cold(fmt: str, *extra: str) -> Callable[[Inputs, str], list[list[str]]]:
    """From an empty cache: decompression, digest checks and indexing of the layers included."""
    return lambda inp, out: [
        ["env", f"VMIMG_CACHE={_cold_cache(inp)}", *VMIMG, "rootfs", inp.ref, "--format", fmt,
         "-o", out, *extra],
    ]  # fmt: skip


def _mke2fs(mke2fs: str) -> Callable[[Inputs, str], list[list[str]]]:
    """mke2fs -d reading the first gzip layer itself (libarchive): one layer, less work."""
    return lambda inp, out: [
        [mke2fs, "-q", "-F", "-t", "ext4", "-d", inp.peer_layers[0], *inp.size_hint[:2], out,
         inp.size_hint[2]],
    ]  # fmt: skip


def _mkfs_erofs(mkfs_erofs: str, *opts: str) -> Callable[[Inputs, str], list[list[str]]]:
    """mkfs.erofs --tar=f --ungzip over each layer; several layers: --aufs (whiteouts become
    overlayfs metadata) and --incremental=data to add each layer after the first."""

    def argv(inp: Inputs, out: str) -> list[list[str]]:
        aufs = ["--aufs"] if len(inp.peer_layers) > 1 else []
        return [
            [mkfs_erofs, "--quiet", *opts, "--tar=f", *aufs, "--ungzip",
             *(["--incremental=data"] if i else []), out, layer]
            for i, layer in enumerate(inp.peer_layers)
        ]  # fmt: skip

    return argv


def _limit(inp: Inputs, out: str) -> list[list[str]]:
    """As many bytes as this round's cold ext4 image occupies (it runs just before)."""
    count = inp.allocated.get(LIMIT_OF, 0)
    return [[sys.executable, "-m", "bench.limit", inp.layout, "latest", str(count), out]]


def contenders() -> dict[str, Contender]:
    out = {
        COLD_EXT4: Contender(COLD_EXT4, "ext4", _vmimg_cold("ext4"), _empty_cache),
        COLD_EROFS: Contender(COLD_EROFS, "erofs", _vmimg_cold("erofs"), _empty_cache),
        COLD_LZ4HC: Contender(
            COLD_LZ4HC, "erofs", _vmimg_cold("erofs", "--compress", "lz4hc"), _empty_cache
        ),
        LIMIT: Contender(LIMIT, "-", _limit),
    }
    mke2fs = tool("VMIMG_BENCH_MKE2FS", "mke2fs")
    mkfs_erofs = tool("VMIMG_BENCH_MKFS_EROFS", "mkfs.erofs")
    if mke2fs and _mke2fs_reads_tar(mke2fs):
        out[MKE2FS] = Contender(MKE2FS, "ext4", _mke2fs(mke2fs))
    else:
        print(f"bench: no {MKE2FS} (needs e2fsprogs 1.47.1+ with libarchive)", file=sys.stderr)
    if mkfs_erofs and _erofs_reads_tar(mkfs_erofs):
        out[MKFS_EROFS] = Contender(MKFS_EROFS, "erofs", _mkfs_erofs(mkfs_erofs))
        out[MKFS_EROFS_LZ4HC] = Contender(
            MKFS_EROFS_LZ4HC, "erofs", _mkfs_erofs(mkfs_erofs, "-zlz4hc")
        )
        out[MKFS_EROFS_LZ4HC_FLAT] = Contender(
            MKFS_EROFS_LZ4HC_FLAT,
            "erofs",
            lambda inp, o: [[mkfs_erofs, "--quiet", "-zlz4hc", "--tar=f", o, inp.flat]],
        )
    else:
        print("bench: no mkfs.erofs --tar --incremental (needs erofs-utils 1.8+)", file=sys.stderr)
    return out


def _version_at_least(cmd: list[str], pattern: str, minimum: tuple[int, ...]) -> bool:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return False
    m = re.search(pattern, r.stdout + r.stderr)
    return bool(m) and tuple(int(x) for x in m.groups()) >= minimum


def _mke2fs_reads_tar(mke2fs: str) -> bool:
    """mke2fs -d takes a tarball from e2fsprogs 1.47.1 on."""
    return _version_at_least([mke2fs, "-V"], r"mke2fs (\d+)\.(\d+)\.(\d+)", (1, 47, 1))


def _erofs_reads_tar(mkfs_erofs: str) -> bool:
    """--incremental=data (layer after layer) came with erofs-utils 1.8."""
    return _version_at_least([mkfs_erofs, "-V"], r"mkfs\.erofs.* (\d+)\.(\d+)", (1, 8))


def peer_layers(layout: str) -> list[str]:
    return [
        os.path.join(layout, "blobs", *layer["digest"].split(":", 1))
        for layer in layers(layout, PEER_TAG)
    ]


def size_hint(layer: str) -> list[str]:
    """mke2fs's -N and size for a (compressed) tar layer."""
    entries = 0
    blocks = 0
    with tarfile.open(layer) as tf:
        for m in tf:
            entries += 1
            blocks += -(-m.size // BLOCK) if m.isfile() else 0
    kib = (blocks * BLOCK * SIZE_SLACK_NUM // SIZE_SLACK_DEN + entries * KIB) // KIB
    inodes = entries * INODE_SLACK_NUM // INODE_SLACK_DEN + INODE_BASE
    return ["-N", str(inodes), f"{kib + SIZE_BASE_KIB}k"]


def machine_info() -> dict[str, object]:
    def version(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "absent"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mke2fs": version([tool("VMIMG_BENCH_MKE2FS", "mke2fs") or "mke2fs", "-V"]),
        "mkfs.erofs": version([tool("VMIMG_BENCH_MKFS_EROFS", "mkfs.erofs") or "mkfs.erofs", "-V"]),
        # Other work on the machine skews the figures: say how busy it was.
        "load": "{:.1f}, {:.1f}, {:.1f} (1, 5, 15 min averages at the end)".format(
            *os.getloadavg()
        ),
    }


def _inputs(name: str, work: str) -> Inputs:
    ref = fixtures.FIXTURES[name]()
    layout = layout_dir(ref)
    blobs = peer_layers(layout)
    hint = size_hint(blobs[0]) if MKE2FS in PLAN[name] else []  # for mke2fs only
    flat = os.path.join(work, "flat.tar")
    if MKFS_EROFS_LZ4HC_FLAT in PLAN[name]:
        cache = os.path.join(work, "flat-cache")
        subprocess.run([*VMIMG, "rootfs", ref, "--format", "tar", "-o", flat, "--no-cache"],
                       env={**os.environ, "VMIMG_CACHE": cache}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        shutil.rmtree(cache)
    return Inputs(ref, layout, blobs, hint, work, flat)


def _run_once(c: Contender, inp: Inputs, env: dict[str, str], r: Result) -> None:
    out = os.path.join(inp.work, "out." + c.fmt)
    if os.path.exists(out):
        os.unlink(out)
    if c.prepare:
        c.prepare(inp)
    secs, rss = run_timed(c.argv(inp, out), env)
    r.seconds.append(secs)
    r.peak_rss_mb.append(rss)
    r.output_bytes = os.path.getsize(out)
    r.allocated_bytes = os.stat(out).st_blocks * 512
    inp.allocated[c.name] = r.allocated_bytes
    os.unlink(out)


def _warm(
    name: str, inp: Inputs, env: dict[str, str], fmt: str, runs: int, place: str = ""
) -> Result:
    """The same conversion again, served from the conversion cache (filled first, untimed).
    `place`: a directory on another file system for the cache and the output (its
    contender's name says which), else both go where the cold runs' do."""
    out = os.path.join(place or inp.work, "warm." + fmt)
    if place:
        env = {**env, "VMIMG_CACHE": os.path.join(place, "cache")}
    cmd = [*VMIMG, "rootfs", inp.ref, "--format", fmt, "-o", out]
    run_timed([cmd], env)
    warm = Result(name, f"vmimg {fmt} (warm{WARM_ON_XFS if place else ''})", fmt)
    for _ in range(runs):
        os.unlink(out)
        secs, rss = run_timed([cmd], env)
        warm.seconds.append(secs)
        warm.peak_rss_mb.append(rss)
    st = os.stat(out)
    warm.output_bytes = st.st_size
    warm.allocated_bytes = st.st_blocks * 512
    os.unlink(out)  # once more, untimed, for vmimg to say how it handed the image out
    said = subprocess.run([*cmd, "--json"], env=env, check=True, capture_output=True).stdout
    warm.handout = str(json.loads(said)["handed_out"])
    return warm


@contextlib.contextmanager
def reflink_place(work: str) -> Iterator[str | None]:
    """A directory on a loop-mounted XFS with reflink, unmounted after: where a warm hit
    hands an ext4 image out as a clone. None where one cannot be mounted (not root, no
    mkfs.xfs, no loop devices): the row is left out."""
    image, mnt = os.path.join(work, "xfs.img"), os.path.join(work, "xfs")
    mkfs = shutil.which("mkfs.xfs")
    if os.geteuid() != 0 or mkfs is None:
        yield None
        return
    with open(image, "wb") as f:
        f.truncate(XFS_IMAGE_BYTES)  # sparse: only what is written takes room
    os.mkdir(mnt)
    made = subprocess.run([mkfs, "-q", "-m", "reflink=1", image], capture_output=True)
    mounted = made.returncode == 0 and (
        subprocess.run(["mount", "-o", "loop", image, mnt], capture_output=True).returncode == 0
    )
    try:
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=True)


def bench_fixture(name: str, runs: int, only: set[str] | None) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="vmimg-bench-") as work:
        inp = _inputs(name, work)
        env = {**os.environ, "VMIMG_CACHE": os.path.join(work, "cache"), "PYTHONPATH": REPO}
        known = contenders()
        cands = [known[n] for n in PLAN[name] if n in known and (only is None or n in only)]
        res = {c.name: Result(name, c.name, c.fmt) for c in cands}
        for _ in range(runs):
            for c in cands:  # interleaved, so that machine noise hits every contender alike
                _run_once(c, inp, env, res[c.name])
        results = list(res.values())
        if name in WARM_FIXTURES and only is None:
            results += [_warm(name, inp, env, fmt, runs) for fmt in ("ext4", "erofs")]
            with reflink_place(work) as xfs:
                if xfs is not None:
                    results.append(_warm(name, inp, env, "ext4", runs, place=xfs))
    return results


def table(results: list[Result]) -> str:
    lines = [
        f"{'fixture':<14} {'contender':<72} {'median s':>9} {'spread':>7} {'peak MiB':>9} "
        f"{'output MiB':>11}"
    ]
    for r in results:
        lines.append(
            f"{r.fixture:<14} {r.name:<72} {r.median:>9.2f} {r.spread:>7.2f} "
            f"{r.peak:>9.0f} {r.output_bytes / MIB:>11.1f}"
        )
    return "\n".join(lines)


def rows(results: list[Result]) -> list[dict[str, Any]]:
    """Issue #18's rows: vmimg against its peer, each from the same run."""
    by = {(r.fixture, r.name): r for r in results}
    out = []
    for fixture, work, ours, theirs in ROWS:
        a, b = by.get((fixture, ours)), by.get((fixture, theirs))
        if a and b and b.median > 0:
            out.append({
                "fixture": fixture, "work": work, "vmimg": ours, "peer": theirs,
                "vmimg_s": a.median, "peer_s": b.median, "ratio": a.median / b.median,
                "vmimg_peak_mib": a.peak, "peer_peak_mib": b.peak,
                "vmimg_bytes": a.output_bytes, "peer_bytes": b.output_bytes,
                "size_ratio": a.output_bytes / b.output_bytes if b.output_bytes else 0.0,
                "compare_size": ours == COLD_LZ4HC,  # the target there is size as well
            })  # fmt: skip
    return out


def memory(results: list[Result]) -> list[dict[str, Any]]:
    """Peak RSS at 100k and 400k entries, and what each entry adds, per format."""
    by = {(r.fixture, r.name): r for r in results}
    (small, n_small), (big, n_big) = RSS_FIXTURES
    out = []
    for name in (COLD_EXT4, COLD_EROFS):
        a, b = by.get((small, name)), by.get((big, name))
        if a and b:
            growth = (b.peak - a.peak) * KIB / (n_big - n_small)
            out.append({"contender": name, "entries": [n_small, n_big],
                        "peak_mib": [a.peak, b.peak], "growth_kib_per_entry": growth})  # fmt: skip
    return out


def limit(results: list[Result]) -> dict[str, Any]:
    by = {(r.fixture, r.name): r for r in results}
    cold, lim = by.get((LIMIT_FIXTURE, LIMIT_OF)), by.get((LIMIT_FIXTURE, LIMIT))
    if not (cold and lim and lim.median > 0):
        return {}
    return {"fixture": LIMIT_FIXTURE, "contender": LIMIT_OF, "cold_s": cold.median,
            "limit_s": lim.median, "ratio": cold.median / lim.median}  # fmt: skip


def warm(results: list[Result]) -> list[dict[str, Any]]:
    """Each warm hit against the cold conversion of its fixture and format (made on the
    machine's own file system, whichever file system the warm one used)."""
    by = {(r.fixture, r.name): r for r in results}
    out = []
    for fixture in WARM_FIXTURES:
        for fmt, cold_name, where in WARM_KINDS:
            w, c = by.get((fixture, f"vmimg {fmt} (warm{where})")), by.get((fixture, cold_name))
            if w and c and c.median > 0:
                out.append({"fixture": fixture, "fmt": fmt, "warm_s": w.median,
                            "cold_s": c.median, "percent": 100 * w.median / c.median,
                            "handout": w.handout, "place": where.removeprefix(", ")})  # fmt: skip
    return out


def ratios(results: list[Result]) -> list[str]:
    lines = [
        f"{r['fixture']}: {r['vmimg']} / {r['peer']} = {r['ratio']:.2f}x"
        + (f" (size {r['size_ratio']:.3f})" if r["compare_size"] else "")
        for r in rows(results)
    ]
    for m in memory(results):
        lines.append(
            f"{m['contender']}: peak {m['peak_mib'][0]:.0f} MiB at {m['entries'][0]:,} entries, "
            f"{m['peak_mib'][1]:.0f} MiB at {m['entries'][1]:,}: "
            f"{m['growth_kib_per_entry']:.2f} KiB per entry"
        )
    if lim := limit(results):
        lines.append(
            f"{lim['fixture']}: {lim['contender']} / {LIMIT} = {lim['ratio']:.2f}x "
            f"({lim['cold_s']:.2f} s / {lim['limit_s']:.2f} s)"
        )
    for w in warm(results):
        lines.append(
            f"{w['fixture']}: vmimg {w['fmt']} warm{' ' + w['place'] if w['place'] else ''} "
            f"/ cold = {w['percent']:.0f}% "
            f"({w['warm_s']:.2f} s / {w['cold_s']:.2f} s, {w['handout']})"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="minbase,smallfiles,smallfiles400k")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        help="a contender's name, repeatable (names hold commas); no warm runs",
    )
    ap.add_argument("--json", default="bench/results/latest.json")
    args = ap.parse_args()
    only = set(args.only) if args.only else None
    unknown = (only or set()) - {n for plan in PLAN.values() for n in plan}
    if unknown:
        ap.error(f"no contender is named {sorted(unknown)}")
    # An installed vmimg has its bytecode (pip compiles it); a checkout run with
    # PYTHONDONTWRITEBYTECODE would compile every changed module at every start instead.
    compileall.compile_dir(os.path.join(REPO, "vmimg"), quiet=1)
    results: list[Result] = []
    for name in args.fixtures.split(","):
        results.extend(bench_fixture(name, args.runs, only))
    print(table(results))
    for line in ratios(results):
        print(line)
    info = machine_info()
    print(f"machine: {info}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "machine": info,
                "results": [asdict(r) | {"median": r.median} for r in results],
                "rows": rows(results),
                "memory": memory(results),
                "limit": limit(results),
                "warm": warm(results),
                "ratios": ratios(results),
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
