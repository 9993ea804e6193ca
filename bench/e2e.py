"""The container workflow, measured: examples/http-service from Dockerfile to serving VM.

    python -m bench.e2e [--boots 5] [--requests 1000] [--compress none,lz4hc] [--json FILE]

Builds the example with podman (its own vfs storage under the bench cache, layers kept
between runs) on the local debian:bookworm-slim stand-in, turns it into bundles with
`vmimg build docker-daemon:...` (one per erofs compression), then for each bundle:

- start-up: host seconds from starting `vmimg run --publish` to the first HTTP 200, over
  several boots, each stopped with SIGTERM (the time to a clean stop is recorded too);
- memory: the agent's `ready` marker (MemTotal - MemAvailable as the agent starts), and the
  same from /proc/meminfo once the service listens (a boot with a --cmd that waits for it);
- latency: sequential GETs from the host, each on a new connection as curl makes them;
- size: the bundle's files against the container image (podman's Size and `podman save`).

vmimg picks the accelerator itself (KVM when a test boot works, else TCG); the table says
which. Prints a table and writes JSON.
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
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import fixtures
from tests.e2e.images import (
    VMIMG,
    Podman,
    VmimgRun,
    free_port,
    http_get,
    podman_base,
    podman_service,
)

APP = "http-service"
GUEST_PORT = 8080
GUEST_PORT_HEX = "1F90"  # 8080 as /proc/net/tcp writes it
# Start the service in the background, wait until its socket listens (state 0A), print the
# guest's memory figures, then wait for the service. The command travels on the kernel
# command line, which cannot hold quotes: "." stands for the spaces in the pattern.
MEMINFO_CMD = (
    "python3 /opt/app/server.py & "
    f"until grep -q :{GUEST_PORT_HEX}.00000000:0000.0A /proc/net/tcp; do sleep 0.05; done; "
    "grep -e ^MemTotal: -e ^MemAvailable: /proc/meminfo; wait"
)
_READY_MEM = re.compile(r"@@vmimg@@ ready .*\bmem_used_kb=(\d+)")
_MEMINFO = re.compile(r"^(MemTotal|MemAvailable):\s+(\d+) kB", re.MULTILINE)
MIB = 1 << 20
GZIP_LEVEL = 6
GZIP_WBITS = 31  # zlib's way to ask for a gzip header and trailer


@dataclass
class BundleResult:
    compress: str
    accel: str = ""
    to_first_200_s: list[float] = field(default_factory=list)
    to_stopped_s: list[float] = field(default_factory=list)  # SIGTERM -> vmimg run exited
    exit_codes: list[int] = field(default_factory=list)
    ready_mem_kb: list[int] = field(default_factory=list)
    serving_mem_kb: int | None = None
    latency_ms: list[float] = field(default_factory=list)
    rootfs_bytes: int = 0
    bundle_bytes: int = 0
    build_s: float = 0.0

    def summary(self) -> dict[str, float | int | None]:
        lat = sorted(self.latency_ms)
        return {
            "first_200_median_s": statistics.median(self.to_first_200_s),
            "first_200_min_s": min(self.to_first_200_s),
            "first_200_max_s": max(self.to_first_200_s),
            "stop_median_s": statistics.median(self.to_stopped_s),
            "latency_median_ms": statistics.median(lat) if lat else None,
            "latency_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "ready_mem_mib": statistics.median(self.ready_mem_kb) / 1024,
            "serving_mem_mib": (self.serving_mem_kb or 0) / 1024,
        }


def _vmimg(env: dict[str, str], *args: str) -> str:
    r = subprocess.run([*VMIMG, *args], capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"vmimg {args[0]} failed: {r.stderr.strip()}")
    return r.stdout


def _build_bundle(env: dict[str, str], source: str, out: Path, compress: str) -> BundleResult:
    res = BundleResult(compress)
    t0 = time.monotonic()
    _vmimg(env, "build", source, "-o", str(out), "--compress", compress, "--no-cache")
    res.build_s = time.monotonic() - t0
    vm = json.loads((out / "vm.json").read_text())
    res.rootfs_bytes = vm["files"][vm["rootfs"]["file"]]["size"]
    res.bundle_bytes = sum(f["size"] for f in vm["files"].values())
    return res


def _boot(bundle: Path, env: dict[str, str], log: Path, res: BundleResult) -> None:
    """One boot: time to the first 200, the ready marker's memory, the time to stop."""
    with VmimgRun(bundle, free_port(), GUEST_PORT, log, env=env) as vm:
        reply = vm.wait_for_http()
        res.to_first_200_s.append(reply.seconds)
        t0 = time.monotonic()
        res.exit_codes.append(vm.stop())
        res.to_stopped_s.append(time.monotonic() - t0)
        m = _READY_MEM.search(vm.console())
        if m:
            res.ready_mem_kb.append(int(m.group(1)))


def _load_boot(bundle: Path, env: dict[str, str], log: Path, res: BundleResult, n: int) -> None:
    """A boot whose --cmd reports memory once the service listens; then `n` timed GETs."""
    port = free_port()
    with VmimgRun(bundle, port, GUEST_PORT, log, env=env, extra=("--cmd", MEMINFO_CMD)) as vm:
        vm.wait_for_http()
        vm.wait_for_console("MemAvailable:")
        mem = {k: int(v) for k, v in _MEMINFO.findall(vm.console())}
        res.serving_mem_kb = mem["MemTotal"] - mem["MemAvailable"]  # as the agent counts
        for _ in range(n):
            reply = http_get(port)
            if reply.status != 200:
                raise SystemExit(f"GET / answered {reply.status}")
            res.latency_ms.append(reply.seconds * 1000)
        vm.stop()


def _accel(bundle: Path, env: dict[str, str]) -> str:
    """The accelerator vmimg chooses for this bundle's kernel, and why."""
    from vmimg.boot.accel import choose_accel
    from vmimg.image.cache import Cache

    accel = choose_accel(str(bundle / "kernel"), Cache.open(env.get("VMIMG_CACHE")), None)
    return f"{accel.name} ({accel.reason})"


def gzip_size(path: Path) -> int:
    """Bytes of `path` after gzip at its default level, as registries mostly store layers."""
    comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            total += len(comp.compress(chunk))
    return total + len(comp.flush())


def machine_info() -> dict[str, object]:
    cpu = platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "host_kernel": platform.release(),
        "qemu": qemu[0] if qemu else "absent",
        "loadavg": os.getloadavg(),
    }


def table(results: list[BundleResult], image_bytes: int, saved_bytes: int, gzip_bytes: int) -> str:
    """A Markdown table: one row per measure, one column per bundle."""

    def row(label: str, cell: Callable[[BundleResult, dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(r, r.summary()) for r in results) + " |"

    head = "| erofs compression | " + " | ".join(r.compress for r in results) + " |"
    return "\n".join([
        head,
        "| --- |" + " --- |" * len(results),
        row("accelerator", lambda r, s: r.accel.split(" ")[0]),
        row("`vmimg build` (layers cached)", lambda r, s: f"{r.build_s:.1f} s"),
        row("`vmimg run` to first HTTP 200, median (min–max)", lambda r, s:
            f"{s['first_200_median_s']:.2f} s ({s['first_200_min_s']:.2f}–"
            f"{s['first_200_max_s']:.2f}, {len(r.to_first_200_s)} boots)"),
        row("SIGTERM to `vmimg run` exited, median", lambda r, s: f"{s['stop_median_s']:.2f} s"),
        row("GET / latency, median / p99", lambda r, s:
            f"{s['latency_median_ms']:.1f} / {s['latency_p99_ms']:.1f} ms "
            f"({len(r.latency_ms)} GETs)"),
        row("guest memory in use: agent ready", lambda r, s: f"{s['ready_mem_mib']:.1f} MiB"),
        row("guest memory in use: service listening", lambda r, s:
            f"{s['serving_mem_mib']:.1f} MiB"),
        row("bundle: rootfs.erofs", lambda r, s: f"{r.rootfs_bytes / MIB:.1f} MiB"),
        row("bundle: all files (rootfs, kernel, manifest)", lambda r, s:
            f"{r.bundle_bytes / MIB:.1f} MiB"),
        row("container image: podman Size / `podman save` tar / that tar gzip'd", lambda r, s:
            f"{image_bytes / MIB:.1f} / {saved_bytes / MIB:.1f} / {gzip_bytes / MIB:.1f} MiB"),
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=5, help="boots timed to the first 200")
    ap.add_argument("--requests", type=int, default=1000, help="sequential GETs for latency")
    ap.add_argument("--compress", default="none,lz4hc", help="erofs compressions to compare")
    ap.add_argument("--json", default="bench/results/e2e.json")
    args = ap.parse_args()

    storage = Path(fixtures.bench_dir()) / "podman-e2e"
    podman = Podman(podman_base(storage / "storage", storage / "run"))
    t0 = time.monotonic()
    podman.import_base()
    ref = podman.build_example(APP)
    image_build_s = time.monotonic() - t0
    image_bytes = podman.image_size(ref)

    results: list[BundleResult] = []
    with tempfile.TemporaryDirectory(prefix="vmimg-e2e-") as work_dir:
        work = Path(work_dir)
        saved = podman.save(ref, work / "image.tar")
        saved_bytes, gzip_bytes = saved.stat().st_size, gzip_size(saved)
        with podman_service(podman, work / "podman.sock") as docker_host:
            env = {**os.environ, "DOCKER_HOST": docker_host}
            for compress in args.compress.split(","):
                out = work / f"bundle-{compress}"
                res = _build_bundle(env, f"docker-daemon:{ref}", out, compress)
                res.accel = _accel(out, env)
                for i in range(args.boots):
                    _boot(out, env, work / f"{compress}-{i}.log", res)
                _load_boot(out, env, work / f"{compress}-load.log", res, args.requests)
                results.append(res)
                print(f"{compress}: {res.summary()}", file=sys.stderr)
                shutil.rmtree(out)

    info = machine_info()
    print(table(results, image_bytes, saved_bytes, gzip_bytes))
    print(f"accel: {results[0].accel}" if results else "no results")
    print(f"image build (podman, cached layers): {image_build_s:.1f} s; machine: {info}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "machine": info,
                "image": {"ref": ref, "bytes": image_bytes, "saved_tar_bytes": saved_bytes,
                          "saved_tar_gzip_bytes": gzip_bytes, "build_s": image_build_s},
                "results": [asdict(r) | {"summary": r.summary()} for r in results],
            },
            f,
            indent=2,
        )  # fmt: skip


if __name__ == "__main__":
    main()
