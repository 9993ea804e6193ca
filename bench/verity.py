"""dm-verity hash tree throughput: vmimg.verity against veritysetup and raw sha256.

    python -m bench.verity [--sizes 100,1024] [--runs 3] [--dir DIR]

For each size (MiB) a file of random bytes (incompressible, nothing for the zero-chunk
shortcut) and a sparse file of the same size (free space, as an ext4 image's headroom)
are hashed by: vmimg.verity.write_hash_tree; `veritysetup format --no-superblock` (C,
the same tree); and one sha256 over the whole file (the ceiling: no per-block work).
Each run is a fresh process with the file in the page cache (Python's start-up counts);
reports the median MiB/s per second of wall time and per second of CPU time (the steadier
figure on a shared machine), and the largest child's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
SALT = "5a" * 32
WRITE_CHUNK = 16 * MiB

VMIMG = (
    "import sys; from vmimg.rootfs.verity import write_hash_tree; "
    "write_hash_tree(sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]))"
)
RAW = "import sys, hashlib\nwith open(sys.argv[1], 'rb') as f: hashlib.file_digest(f, 'sha256')"


def make_files(directory: str, mib: int) -> dict[str, str]:
    random_path = os.path.join(directory, f"random-{mib}.img")
    sparse_path = os.path.join(directory, f"sparse-{mib}.img")
    if not os.path.exists(random_path):
        with open(random_path, "wb") as f:
            for _ in range(0, mib * MiB, WRITE_CHUNK):
                f.write(os.urandom(min(WRITE_CHUNK, mib * MiB - f.tell())))
    if not os.path.exists(sparse_path):
        with open(sparse_path, "wb") as f:
            f.truncate(mib * MiB)
            f.write(os.urandom(MiB))  # a little data at the start, like a file system
    return {"random": random_path, "sparse": sparse_path}


def contenders(image: str, hash_file: str) -> dict[str, list[str]]:
    return {
        "vmimg.verity": [sys.executable, "-c", VMIMG, image, hash_file, SALT],
        "veritysetup": [
            "veritysetup", "format", "--no-superblock", f"--salt={SALT}", image, hash_file,
        ],
        "sha256 (ceiling)": [sys.executable, "-c", RAW, image],
    }  # fmt: skip


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(argv, capture_output=True, check=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1024", help="file sizes in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the test files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        hash_file = os.path.join(directory, "tree")
        for mib in (int(s) for s in args.sizes.split(",")):
            for kind, image in make_files(directory, mib).items():
                with open(image, "rb") as f:  # into the page cache
                    while f.read(WRITE_CHUNK):
                        pass
                for name, argv in contenders(image, hash_file).items():
                    results = [run_once(argv) for _ in range(args.runs)]
                    wall = statistics.median(r[0] for r in results)
                    cpu = statistics.median(r[1] for r in results)
                    print(
                        f"{mib:>5} MiB {kind:<6} {name:<17} {mib / wall:6.0f} MiB/s wall "
                        f"({wall:.2f} s), {mib / cpu:6.0f} MiB/s of CPU ({cpu:.2f} s)",
                        flush=True,
                    )
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
        print(f"largest child's peak RSS: {peak} MiB")
    print(f"host load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
