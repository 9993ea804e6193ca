"""`vmimg verify`: boot each bundle and prove it works.

One boot per bundle, in the agent's check mode: the agent reports ready,
verifies the root tree against the build manifest (sizes, modes, owners,
link targets; content hashes with --deep), runs the smoke command if any,
then the entrypoint, and reports its exit code. The host follows the marker
lines, times each stage, and kills the VM at the timeout.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from vmimg.boot.accel import Accel, choose_accel
from vmimg.boot.launch import LaunchOptions, qemu_command
from vmimg.boot.vm import VM, BootResult
from vmimg.bundle.format import check_file, check_verity, load_bundle
from vmimg.errors import BootError, BundleError, VmimgError
from vmimg.guest.protocol import BootOptions, kernel_args
from vmimg.image.cache import Cache
from vmimg.safetext import escape_line, escape_text

DEFAULT_TIMEOUT = 120.0
VERITY_RESULT = "verity"  # verify_result of a verity root booted without the tree walk
CONSOLE_TAIL_LINES = 25
US_PER_S = 1_000_000


@dataclass(frozen=True)
class VerifyOptions:
    timeout: float = DEFAULT_TIMEOUT
    expect_exit: int = 0
    cmd: str | None = None  # run this shell command instead of the entrypoint
    smoke: str | None = None
    deep: bool = False
    run: bool = True  # False: verify the tree only (--no-run)
    accel: str | None = None  # "kvm" / "tcg" forces; None probes
    vcpus: int | None = None
    memory_mib: int | None = None
    check_files: bool = True  # hash the bundle's files against vm.json first


@dataclass
class Timings:
    """Seconds. Host wall clock from QEMU's start, and guest uptime from the markers."""

    vmm_to_kernel: float | None = None
    to_agent_ready: float | None = None
    to_workload_start: float | None = None
    to_workload_exit: float | None = None
    total: float | None = None
    guest_kernel_to_agent: float | None = None
    guest_agent_to_exec: float | None = None


@dataclass
class VerifyReport:
    bundle: str
    passed: bool
    stage: str  # the last stage reached, or where it failed
    accel: str
    accel_reason: str
    kernel: str = ""
    rootfs: str = ""
    exit_code: int | None = None
    expected_exit: int = 0
    verify_result: str = ""
    verify_entries: int | None = None
    verify_problems: list[dict[str, str]] = field(default_factory=list)
    smoke_code: int | None = None
    message: str = ""
    timings: Timings = field(default_factory=Timings)
    console_tail: list[str] = field(default_factory=list)
    console_log: str = ""
    error_code: int | None = None  # the exit code of an error before the boot (stage setup)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _walks_tree(opts: VerifyOptions, verity: bool) -> bool:
    """Whether the agent walks the root against the manifest. On a dm-verity root the
    kernel checks every block read against the pinned root hash, so a plain run proves as
    much: the walk stays only for --no-run and --smoke (which run in the agent's check)."""
    return not verity or not opts.run or opts.smoke is not None


def _boot_options(opts: VerifyOptions, verity: bool) -> BootOptions:
    if not _walks_tree(opts, verity):
        return BootOptions(mode="run", cmd=opts.cmd)
    return BootOptions(
        mode="check" if opts.run else "verify",
        deep=opts.deep and not verity,  # hashing files again adds nothing on a verity root
        smoke=opts.smoke,
        cmd=opts.cmd,
    )


def _timings(result: BootResult) -> Timings:
    t = Timings(total=result.wall)
    ready = result.last("ready")
    if ready is not None:
        boot_us = int(ready.marker.fields.get("boot_us", "0"))
        t.to_agent_ready = ready.at
        t.guest_kernel_to_agent = boot_us / US_PER_S
        # Host time to "ready" minus the guest's uptime then. Under TCG with -icount the
        # guest clock is virtual, and the difference can be meaningless: then None.
        estimate = ready.at - boot_us / US_PER_S
        t.vmm_to_kernel = estimate if estimate >= 0 else None
    exec_m = result.last("exec")
    if exec_m is not None:
        t.to_workload_start = exec_m.at
        if "agent_us" in exec_m.marker.fields:
            t.guest_agent_to_exec = int(exec_m.marker.fields["agent_us"]) / US_PER_S
    exit_m = result.last("exit")
    if exit_m is not None:
        t.to_workload_exit = exit_m.at
    return t


# Markers in boot order, and the stage a boot is in once it has seen each.
_STAGES = (("ready", "agent"), ("verify", "verify"), ("exec", "workload"), ("exit", "exit"))


def _stage_reached(result: BootResult) -> str:
    """qemu (nothing on the console), kernel, agent, verify, workload or exit."""
    stage = "kernel" if result.console else "qemu"
    for event, name in _STAGES:
        if result.last(event) is not None:
            stage = name
    return stage


def _safe_fields(fields: dict[str, str]) -> dict[str, str]:
    return {escape_text(k): escape_text(v) for k, v in fields.items()}


# What the kernel logs when a block of a dm-verity device fails its hash.
_VERITY_CORRUPTION = re.compile(r"verity: [0-9:]+: (?:data|metadata) block \d+ is corrupted")


def _judge(report: VerifyReport, result: BootResult, opts: VerifyOptions) -> None:
    """Fill in pass/fail, the stage reached and a message from the boot's markers."""
    verify = result.last("verify")
    if verify is not None:
        report.verify_result = verify.marker.fields.get("result", "")
        report.verify_entries = int(verify.marker.fields.get("entries", "0"))
    report.verify_problems = [_safe_fields(m.marker.fields) for m in result.all("verify-problem")]
    smoke = result.last("smoke")
    if smoke is not None:
        report.smoke_code = int(smoke.marker.fields.get("code", "-1"))
    exit_m = result.last("exit")
    if exit_m is not None:
        report.exit_code = int(exit_m.marker.fields.get("code", "-1"))
    errors = [m.marker.fields for m in result.all("error")]

    report.stage = _stage_reached(result)
    # An I/O error reading the root (a dm-verity block that failed its hash) says more than
    # whatever it broke next: the agent's stage=integrity marker comes first.
    integrity = [e for e in errors if e.get("stage") == "integrity"]
    corrupted = _VERITY_CORRUPTION.search(result.console)
    if integrity:
        first_io = integrity[0]
        report.message = (
            f"rootfs integrity: {report.bundle}: an I/O error during {first_io.get('during')} "
            f"at {first_io.get('path')}: {first_io.get('msg')}"
        )
    elif corrupted:  # the kernel could not even mount the root, or the agent never said
        report.message = f"rootfs integrity: {report.bundle}: {corrupted.group(0)}"
    elif report.verify_result == "fail" and verify is not None:
        first = report.verify_problems[0] if report.verify_problems else {}
        report.message = (
            f"root tree differs from the manifest: {verify.marker.fields.get('problems')} "
            f"problems, first {first.get('path', '?')} ({first.get('what', '?')})"
        )
    elif report.smoke_code not in (None, 0):
        report.message = f"smoke command exited {report.smoke_code}"
    elif errors:
        report.message = f"guest error in {errors[-1].get('stage')}: {errors[-1].get('msg')}"
    elif result.timed_out:
        report.message = f"timed out after {opts.timeout:.0f}s in stage {report.stage}"
    elif exit_m is None:
        detail = result.stderr.strip().splitlines()[-1:] or ["no exit report"]
        report.message = f"VM stopped without an exit report in stage {report.stage}: {detail[0]}"
    elif report.exit_code != opts.expect_exit:
        report.message = f"exit code {report.exit_code}, expected {opts.expect_exit}"
    report.passed = (
        exit_m is not None
        and not result.timed_out
        and report.verify_result in ("ok", VERITY_RESULT)
        and report.smoke_code in (None, 0)
        and (report.exit_code == opts.expect_exit if opts.run else report.exit_code == 0)
    )
    # Everything below came from the guest: no control character reaches a report.
    report.message = escape_text(report.message)
    if not report.passed:
        report.console_tail = [
            escape_line(line) for line in result.console.splitlines()[-CONSOLE_TAIL_LINES:]
        ]


def verify_bundle(
    bundle: str,
    opts: VerifyOptions,
    cache: Cache,
    log_dir: str | None = None,
    accel: Accel | None = None,
) -> VerifyReport:
    loaded = load_bundle(bundle, check_files=False)
    vm = loaded.vm
    if vm.init.type != "agent":
        raise BootError(f"{bundle}: built with --init image; vmimg verify needs the agent")
    accel = accel or choose_accel(loaded.kernel_path, cache, opts.accel)
    report = VerifyReport(
        bundle=bundle,
        passed=False,
        stage="files",
        accel=accel.name,
        accel_reason=accel.reason,
        kernel=vm.kernel.version,
        rootfs=vm.rootfs.type,
        expected_exit=opts.expect_exit,
    )
    if opts.check_files:
        try:
            for entry in vm.files.values():
                check_file(bundle, entry)
            check_verity(bundle, vm)
        except BundleError as e:
            report.message = f"bundle damaged: {e}"
            return report
    launch = LaunchOptions(
        accel=accel.name,
        vcpus=opts.vcpus,
        memory_mib=opts.memory_mib,
        extra_cmdline=tuple(
            kernel_args(options=_boot_options(opts, vm.rootfs.verity is not None))[1:]
        ),
    )
    log_dir = log_dir or os.path.join(cache.root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    fd, log_path = tempfile.mkstemp(prefix="verify-", suffix=".log", dir=log_dir)
    os.close(fd)
    cache.pin(log_path)  # `cache prune --all` leaves it while QEMU writes it
    report.console_log = log_path
    with cache.temp_dir("qemu-") as tmp:  # QEMU's snapshot files, locked like any work
        env = {**os.environ, "TMPDIR": tmp}
        machine = VM(qemu_command(vm, bundle, opts=launch), console_log=log_path, env=env)
        machine.start()
        result = machine.wait(opts.timeout)
    report.timings = _timings(result)
    if not _walks_tree(opts, vm.rootfs.verity is not None):
        report.verify_result = VERITY_RESULT  # no walk: dm-verity checked what was read
    _judge(report, result, opts)
    return report


def verify_bundles(
    bundles: Sequence[str],
    opts: VerifyOptions,
    cache: Cache,
    jobs: int | None = None,
    on_done: Callable[[VerifyReport], None] | None = None,
) -> list[VerifyReport]:
    """Verify several bundles, in parallel up to the number of cores."""
    workers = max(1, min(len(bundles), jobs or os.cpu_count() or 1))

    def one(bundle: str) -> VerifyReport:
        try:
            report = verify_bundle(bundle, opts, cache)
        except VmimgError as e:
            report = VerifyReport(
                bundle, False, "setup", "", "", message=str(e), error_code=e.exit_code
            )
        if on_done:
            on_done(report)
        return report

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, bundles))


def junit_xml(reports: Sequence[VerifyReport], suite: str = "vmimg verify") -> bytes:
    """JUnit XML (the schema CI systems read) with one testcase per bundle."""
    failures = sum(1 for r in reports if not r.passed)
    total = sum(r.timings.total or 0.0 for r in reports)
    root = ET.Element(
        "testsuites",
        name=suite,
        tests=str(len(reports)),
        failures=str(failures),
        errors="0",
        time=f"{total:.3f}",
    )
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(reports)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{total:.3f}",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    )
    props = ET.SubElement(ts, "properties")
    for r in reports[:1]:
        ET.SubElement(props, "property", name="accel", value=r.accel)
    for r in reports:
        case = ET.SubElement(
            ts,
            "testcase",
            classname="vmimg.verify",
            name=r.bundle,
            time=f"{r.timings.total or 0.0:.3f}",
        )
        if not r.passed:
            failure = ET.SubElement(
                case, "failure", message=r.message or "failed", type=f"stage:{r.stage}"
            )
            failure.text = "\n".join(r.console_tail)
        out = ET.SubElement(case, "system-out")
        out.text = (
            f"accel={r.accel} kernel={r.kernel} rootfs={r.rootfs} exit={r.exit_code} "
            f"stage={r.stage} log={r.console_log}"
        )
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data
