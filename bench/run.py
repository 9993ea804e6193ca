"""The benchmark suite: vmimg against the pipelines users run today and the physical limit.

    python -m bench.run [--fixtures minbase,smallfiles] [--runs 3] [--json FILE]

Every contender runs as its own process, several times, interleaved, on the same machine in
the same run; we record wall time (median and spread) and peak RSS (ru_maxrss of the process
tree) and print ratios against the peers. Peer tools are found on PATH, or where
VMIMG_BENCH_MKE2FS / VMIMG_BENCH_MKFS_EROFS point (newer builds made by hand beside ours).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from bench import fixtures
from bench.peakrss import run_with_peak_rss

VMIMG = [sys.executable, "-m", "vmimg"]
PY = sys.executable


@dataclass
class Contender:
    name: str
    fmt: str
    argv: Callable[[str, str, str], list[list[str]]]  # (ref, layout_dir, out) -> commands
    prepare: Callable[[str], None] | None = None  # (work dir) before each run
    group: str = ""


@dataclass
class Result:
    fixture: str
    name: str
    fmt: str
    seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    output_bytes: int = 0
    allocated_bytes: int = 0  # what the output really occupies (images are sparse)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        return (max(self.seconds) - min(self.seconds)) if len(self.seconds) > 1 else 0.0


def tool(env: str, name: str) -> str | None:
    return os.environ.get(env) or shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def run_timed(commands: list[list[str]], env: dict[str, str]) -> tuple[float, float]:
    """Run commands in sequence; total wall seconds and the max peak RSS (MiB) among them."""
    seconds = 0.0
    peak = 0.0
    for cmd in commands:
        run = run_with_peak_rss(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if run.result.returncode != 0:
            stderr = run.result.stderr.decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd)} failed: {stderr[-2000:]}")
        seconds += run.seconds
        peak = max(peak, run.peak_rss_kib / 1024)
    return seconds, peak


def layout_dir(ref: str) -> str:
    return ref[len("oci:") :].rsplit(":", 1)[0]


def contenders(work: str) -> list[Contender]:
    unpacked = os.path.join(work, "bundle")
    rootfs = os.path.join(unpacked, "rootfs")
    umoci = tool("VMIMG_BENCH_UMOCI", "umoci")
    mke2fs = tool("VMIMG_BENCH_MKE2FS", "mke2fs")
    mkfs_erofs = tool("VMIMG_BENCH_MKFS_EROFS", "mkfs.erofs")

    def vm(fmt: str, *extra: str) -> Callable[[str, str, str], list[list[str]]]:
        return lambda ref, _l, out: [[*VMIMG, "rootfs", ref, "--format", fmt, "-o", out, *extra]]

    cold_cache = os.path.join(work, "cold-cache")

    def vm_cold(fmt: str, *extra: str) -> Callable[[str, str, str], list[list[str]]]:
        """From an empty cache: decompression and indexing of the layers included."""
        return lambda ref, _l, out: [
            ["rm", "-rf", cold_cache],
            ["env", f"VMIMG_CACHE={cold_cache}", *VMIMG, "rootfs", ref, "--format", fmt,
             "-o", out, *extra],
        ]  # fmt: skip

    def unpack(layout: str) -> list[list[str]]:
        assert umoci is not None
        tag = "gzip"  # the fixture's gzip-only tag: Debian's umoci reads no zstd
        return [["rm", "-rf", unpacked], [umoci, "unpack", "--image", f"{layout}:{tag}", unpacked]]

    def unpack_then_erofs(*opts: str) -> Callable[[str, str, str], list[list[str]]]:
        assert mkfs_erofs is not None
        return lambda _r, layout, out: [*unpack(layout), [mkfs_erofs, *opts, out, rootfs]]

    out: list[Contender] = [
        Contender("vmimg tar", "tar", vm("tar", "--no-cache"), group="tar"),
        Contender("vmimg ext4", "ext4", vm("ext4", "--no-cache"), group="ext4"),
        Contender("vmimg ext4 (empty cache)", "ext4", vm_cold("ext4"), group="ext4"),
        Contender("vmimg erofs (empty cache)", "erofs", vm_cold("erofs"), group="erofs"),
        Contender("vmimg erofs", "erofs", vm("erofs", "--no-cache"), group="erofs"),
        Contender(
            "vmimg erofs lz4hc",
            "erofs",
            vm("erofs", "--compress", "lz4hc", "--no-cache"),
            group="erofs-lz4hc",
        ),
    ]
    if umoci and mke2fs:
        out.append(
            Contender(
                "umoci unpack + mke2fs -d",
                "ext4",
                lambda _r, layout, o: [*unpack(layout), _mke2fs_cmd(mke2fs, rootfs, o)],
                group="ext4",
            )
        )
    flat = os.path.join(work, "flat.tar")  # the flattened root, as `docker export` gives it
    if mke2fs and _mke2fs_reads_tar(mke2fs):
        out.append(Contender(
            "mke2fs -d flattened.tar", "ext4",
            lambda _r, _l, o: [_mke2fs_cmd(mke2fs, flat, o, size_of=rootfs_size_hint(work))],
            group="ext4"))  # fmt: skip
    if mkfs_erofs and _erofs_reads_tar(mkfs_erofs):
        out.append(Contender("mkfs.erofs --tar flattened.tar", "erofs",
                             lambda _r, _l, o: [[mkfs_erofs, "--tar=f", "-T0", o, flat]],
                             group="erofs"))  # fmt: skip
        out.append(Contender("mkfs.erofs -zlz4hc --tar flattened.tar", "erofs",
                             lambda _r, _l, o: [[mkfs_erofs, "-zlz4hc", "--tar=f", "-T0", o, flat]],
                             group="erofs-lz4hc"))  # fmt: skip
    if umoci and mkfs_erofs:
        out.append(
            Contender(
                "umoci unpack + mkfs.erofs",
                "erofs",
                unpack_then_erofs("-T0", "--all-root"),
                group="erofs",
            )
        )
        out.append(
            Contender(
                "umoci unpack + mkfs.erofs -zlz4hc",
                "erofs",
                unpack_then_erofs("-zlz4hc", "-T0"),
                group="erofs-lz4hc",
            )
        )
    return out


def _version_at_least(cmd: list[str], pattern: str, minimum: tuple[int, ...]) -> bool:
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(pattern, r.stdout + r.stderr)
    return bool(m) and tuple(int(x) for x in m.groups()) >= minimum


def _mke2fs_reads_tar(mke2fs: str) -> bool:
    """mke2fs -d takes a tarball from e2fsprogs 1.47.1 on."""
    return _version_at_least([mke2fs, "-V"], r"mke2fs (\d+)\.(\d+)\.(\d+)", (1, 47, 1))


def _erofs_reads_tar(mkfs_erofs: str) -> bool:
    return _version_at_least([mkfs_erofs, "-V"], r"erofs-utils\) (\d+)\.(\d+)", (1, 6))


def rootfs_size_hint(work: str) -> str:
    return os.path.join(work, "size-hint")


def _mke2fs_cmd(mke2fs: str, rootfs: str, out: str, size_of: str | None = None) -> list[str]:
    # mke2fs -d wants the size and enough inodes up front: give it the content's blocks plus
    # 30%, 1 KiB per entry (inode tables, directories) and 64 MiB, and an inode per entry + 20%.
    size_script = (
        "import os,sys;t=0;n=0\n"
        "for d,ds,fs in os.walk(sys.argv[1]):\n"
        "  n+=len(ds)+len(fs)\n"
        "  for f in fs:\n"
        "    p=os.path.join(d,f)\n"
        "    t+=-(-os.lstat(p).st_size//4096)*4096 if not os.path.islink(p) else 0\n"
        "print('-N', n*6//5+1024, str(int(t*1.3+n*1024)//1024+65536)+'k')"
    )
    size = f"$(cat {size_of})" if size_of else f'$({PY} -c "{size_script}" {rootfs})'
    return ["sh", "-c", f"{mke2fs} -q -F -t ext4 -d {rootfs} {out} {size}"]


def physical_limit(ref: str, output_bytes: int, work: str) -> float:
    """isal-decompress every layer to /dev/null, then write output_bytes sequentially (dd)."""
    layout = layout_dir(ref)
    script = (
        "import json,sys,os\n"
        "from isal import igzip_threaded, igzip\nimport zstandard\n"
        "root=sys.argv[1]\n"
        "idx=json.load(open(os.path.join(root,'index.json')))\n"
        "def blob(d): return open(os.path.join(root,'blobs',*d.split(':')),'rb')\n"
        "m=json.load(blob(idx['manifests'][0]['digest']))\n"
        "for l in m['layers']:\n"
        "  f=blob(l['digest'])\n"
        "  r=igzip.GzipFile(fileobj=f) if l['mediaType'].endswith('gzip') else "
        "zstandard.ZstdDecompressor().stream_reader(f)\n"
        "  while r.read(1<<20): pass\n"
    )
    out = os.path.join(work, "dd.out")
    start = time.perf_counter()
    subprocess.run([PY, "-c", script, layout], check=True)
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={out}",
            "bs=4M",
            f"count={output_bytes // (4 << 20) + 1}",
            "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    elapsed = time.perf_counter() - start
    os.unlink(out)
    return elapsed


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
        "umoci": version(["umoci", "--version"]),
        # Other work on the machine skews the figures: say how busy it was.
        "load": "{:.1f}, {:.1f}, {:.1f} (1, 5, 15 min averages at the end)".format(
            *os.getloadavg()
        ),
    }


def bench_fixture(name: str, runs: int, only: set[str] | None) -> list[Result]:
    ref = fixtures.FIXTURES[name]()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vmimg-bench-") as work:
        env = {**os.environ, "VMIMG_CACHE": os.path.join(work, "cache")}
        cands = [c for c in contenders(work) if only is None or c.name in only]
        res = {c.name: Result(name, c.name, c.fmt) for c in cands}
        # Decompress the layers into vmimg's cache once: "cold" means no conversion cached.
        # The flattened tar it writes is the input of the peers that read a tarball.
        flat = os.path.join(work, "flat.tar")
        subprocess.run(
            [*VMIMG, "rootfs", ref, "-o", flat], env=env, check=True, stdout=subprocess.DEVNULL
        )
        with tarfile.open(flat) as tf:
            members = [(m.size if m.isfile() else 0) for m in tf]
        blocks = sum(-(-size // 4096) * 4096 for size in members)
        kib = (blocks * 13 // 10 + len(members) * 1024) // 1024 + 65536
        with open(rootfs_size_hint(work), "w") as f:
            f.write(f"-N {len(members) * 6 // 5 + 1024} {kib}k")
        for _ in range(runs):
            for c in cands:  # interleaved, so that machine noise hits every contender alike
                out = os.path.join(work, "out." + c.fmt)
                if os.path.exists(out):
                    os.unlink(out)
                secs, rss = run_timed(c.argv(ref, layout_dir(ref), out), env)
                res[c.name].seconds.append(secs)
                res[c.name].peak_rss_mb.append(rss)
                res[c.name].output_bytes = os.path.getsize(out)
                res[c.name].allocated_bytes = os.stat(out).st_blocks * 512
        results.extend(res.values())
        # Warm: the same conversion again, served from the conversion cache.
        for fmt in ("ext4", "erofs"):
            out = os.path.join(work, "warm." + fmt)
            run_timed([[*VMIMG, "rootfs", ref, "--format", fmt, "-o", out]], env)
            warm = Result(name, f"vmimg {fmt} (warm)", fmt)
            for _ in range(runs):
                secs, rss = run_timed([[*VMIMG, "rootfs", ref, "--format", fmt, "-o", out]], env)
                warm.seconds.append(secs)
                warm.peak_rss_mb.append(rss)
            warm.output_bytes = os.path.getsize(out)
            results.append(warm)
        # The limit writes as many bytes as vmimg's ext4 image really holds.
        biggest = max((r.allocated_bytes for r in results if r.name == "vmimg ext4"), default=0)
        limit = Result(name, "physical limit (isal + dd)", "-")
        for _ in range(runs):
            limit.seconds.append(physical_limit(ref, biggest, work))
        results.append(limit)
    return results


def table(results: list[Result]) -> str:
    lines = [
        f"{'fixture':<11} {'contender':<36} {'median s':>9} {'spread':>7} {'peak MiB':>9} "
        f"{'output MiB':>11}"
    ]
    for r in results:
        lines.append(
            f"{r.fixture:<11} {r.name:<36} {r.median:>9.2f} {r.spread:>7.2f} "
            f"{max(r.peak_rss_mb, default=0):>9.0f} {r.output_bytes / (1 << 20):>11.1f}"
        )
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[str]:
    by = {(r.fixture, r.name): r for r in results}
    pairs = [
        ("umoci unpack + mke2fs -d", "vmimg ext4"),
        ("umoci unpack + mke2fs -d", "vmimg ext4 (empty cache)"),
        ("mke2fs -d flattened.tar", "vmimg ext4"),
        ("mkfs.erofs --tar flattened.tar", "vmimg erofs"),
        ("mkfs.erofs -zlz4hc --tar flattened.tar", "vmimg erofs lz4hc"),
        ("umoci unpack + mkfs.erofs", "vmimg erofs (empty cache)"),
        ("umoci unpack + mkfs.erofs", "vmimg erofs"),
        ("umoci unpack + mkfs.erofs -zlz4hc", "vmimg erofs lz4hc"),
        ("vmimg ext4 (empty cache)", "physical limit (isal + dd)"),
        ("vmimg ext4", "vmimg ext4 (warm)"),
    ]
    out = []
    for fixture in sorted({r.fixture for r in results}):
        for slow, fast in pairs:
            a, b = by.get((fixture, slow)), by.get((fixture, fast))
            if a and b and b.median > 0:
                out.append(f"{fixture}: {slow} / {fast} = {a.median / b.median:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="minbase,smallfiles")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated contender names")
    ap.add_argument("--json", default="bench/results/latest.json")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
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
                "ratios": ratios(results),
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
