"""`vmimg build`, `verify` and `run`: real bundles booted under QEMU (TCG here)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import xmlschema

from tests.boot.conftest import TRAP_TERM, build, run_then_stop, vmimg
from tests.conftest import need
from vmimg.bundle.format import read_vm_json

SCHEMA = Path(__file__).resolve().parent.parent / "data" / "junit.xsd"
pytestmark = [pytest.mark.boot, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def bundles(
    erofs_bundle: Path, sample_ref: str, kernel_file: str, cache_dir: Path, bundle_dir: Path
) -> dict[str, Path]:
    return {
        "erofs": erofs_bundle,
        "ext4": build(sample_ref, bundle_dir / "ext4", cache_dir, kernel_file, "--writable-root"),
        "initramfs": build(sample_ref, bundle_dir / "initramfs", cache_dir, kernel_file,
                           "--fs", "initramfs"),
    }  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundle_layout_and_vm_json(bundles: dict[str, Path], sample_ref: str) -> None:
    for fs, bundle in bundles.items():
        vm = read_vm_json(str(bundle)).doc
        assert vm["rootfs"]["type"] == fs and vm["source"]["reference"] == sample_ref
        assert vm["init"]["type"] == "agent" and vm["workload"]["argv"][0] == "/bin/sh"
        for name, info in vm["files"].items():
            assert sha256(bundle / name) == info["sha256"], name
        assert vm["manifest"]["sha256"] == vm["files"]["manifest"]["sha256"]
        fc = json.loads((bundle / "launch" / "firecracker.json").read_text())
        assert fc["boot-source"]["kernel_image_path"] == "./kernel"
        qemu = (bundle / "launch" / "qemu.sh").read_text()
        assert "-kernel" in qemu and "microvm" in qemu
        assert "--kernel" in (bundle / "launch" / "cloud-hypervisor.sh").read_text()
    assert "rootfstype=ext4" in read_vm_json(str(bundles["ext4"])).doc["cmdline"]
    assert "rdinit=/.vmimg/init" in read_vm_json(str(bundles["initramfs"])).doc["cmdline"]


def test_rebuild_is_cached_and_identical(
    sample_ref: str, kernel_file: str, cache_dir: Path, tmp_path: Path, bundles: dict[str, Path]
) -> None:
    r = vmimg("build", sample_ref, "-o", str(tmp_path / "again"), "--kernel", kernel_file,
              "--json", cache=cache_dir)  # fmt: skip
    assert json.loads(r.stdout)["cached"] is True
    fresh = tmp_path / "fresh"
    r = vmimg("build", sample_ref, "-o", str(fresh), "--kernel", kernel_file, "--no-cache",
              "--json", cache=tmp_path / "other-cache")  # fmt: skip
    assert json.loads(r.stdout)["cached"] is False
    for name in ("rootfs.erofs", "manifest", "vm.json", "kernel"):
        assert (fresh / name).read_bytes() == (bundles["erofs"] / name).read_bytes(), name


def test_verify_all_three_with_junit(
    bundles: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    junit = tmp_path / "report.xml"
    r = vmimg("verify", *map(str, bundles.values()), "--deep", "--json", "--junit", str(junit),
              cache=cache_dir)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    reports = json.loads(r.stdout)
    assert [rep["rootfs"] for rep in reports] == ["erofs", "ext4", "initramfs"]
    for rep in reports:
        assert rep["passed"] and rep["stage"] == "exit" and rep["exit_code"] == 0
        assert rep["accel"] in ("kvm", "tcg") and rep["accel_reason"]
        if rep["rootfs"] == "erofs":  # a dm-verity root: the kernel checks, no tree walk
            assert rep["verify_result"] == "verity" and rep["verify_entries"] is None
        else:
            assert rep["verify_result"] == "ok" and rep["verify_entries"] > 40
        assert rep["kernel"].startswith("6.1")
        assert 0 < rep["timings"]["to_agent_ready"] < rep["timings"]["to_workload_exit"]
    xmlschema.XMLSchema(str(SCHEMA)).validate(str(junit))
    assert b"<failure" not in junit.read_bytes()


def test_exit_codes_and_expectations(bundles: dict[str, Path], cache_dir: Path) -> None:
    ok = vmimg("verify", str(bundles["erofs"]), "--cmd", "exit 3", "--expect-exit", "3",
               "--json", cache=cache_dir)  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["exit_code"] == 3
    bad = vmimg("verify", str(bundles["erofs"]), "--cmd", "exit 3", cache=cache_dir)
    assert bad.returncode == 12
    assert "exit code 3, expected 0" in bad.stdout
    killed = vmimg("verify", str(bundles["ext4"]), "--cmd", "kill -9 $$", "--expect-exit",
                   "137", cache=cache_dir)  # fmt: skip
    assert killed.returncode == 0, killed.stdout
    missing = vmimg("verify", str(bundles["erofs"]), "--cmd", "exec /no/such/thing",
                    "--expect-exit", "127", cache=cache_dir)  # fmt: skip
    assert missing.returncode == 0, missing.stdout


def test_smoke_and_no_run(bundles: dict[str, Path], cache_dir: Path) -> None:
    r = vmimg("verify", str(bundles["ext4"]), "--smoke", "test -x /bin/busybox", "--no-run",
              "--json", cache=cache_dir)  # fmt: skip
    rep = json.loads(r.stdout)[0]
    assert r.returncode == 0 and rep["smoke_code"] == 0
    failing = vmimg("verify", str(bundles["ext4"]), "--smoke", "false", cache=cache_dir)
    assert failing.returncode == 12 and "smoke command exited 1" in failing.stdout


def test_corruption_is_caught(bundles: dict[str, Path], cache_dir: Path, tmp_path: Path) -> None:
    """Two guards: the bundle's file hashes, and the guest's deep check of the tree."""
    bundle = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(bundles["ext4"]), str(bundle)], check=True)
    image = bundle / "rootfs.ext4"
    # Change /etc/passwd's bytes inside the image, keeping its size.
    passwd = subprocess.run([need("debugfs"), "-R", "cat /etc/passwd", str(image)],
                            capture_output=True, check=True).stdout  # fmt: skip
    evil = tmp_path / "passwd"
    evil.write_bytes(passwd.replace(b"root:x:0:0", b"root:X:0:0"))
    for cmd in ("rm /etc/passwd", f"write {evil} /etc/passwd", "sif /etc/passwd mode 0100644"):
        subprocess.run([need("debugfs"), "-w", "-R", cmd, str(image)], check=True,
                       capture_output=True)  # fmt: skip
    damaged = vmimg("verify", str(bundle), "--deep", "--json", cache=cache_dir)
    rep = json.loads(damaged.stdout)[0]
    assert damaged.returncode == 12 and rep["stage"] == "files"
    assert "rootfs.ext4 does not match the sha256 in vm.json" in rep["message"]
    vm = json.loads((bundle / "vm.json").read_text())
    vm["files"]["rootfs.ext4"]["sha256"] = sha256(image)
    (bundle / "vm.json").write_text(json.dumps(vm))
    deep = vmimg("verify", str(bundle), "--deep", "--json", cache=cache_dir)
    rep = json.loads(deep.stdout)[0]
    assert deep.returncode == 12 and rep["verify_result"] == "fail"
    assert {"path": "/etc/passwd", "what": "content"}.items() <= rep["verify_problems"][0].items()


def _qemu_processes(bundle: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(bundle) in line]


def test_timeout_kills_the_vm(bundles: dict[str, Path], cache_dir: Path, tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    r = vmimg("verify", str(bundles["erofs"]), "--cmd", "sleep 600", "--timeout", "8",
              "--junit", str(junit), "--json", cache=cache_dir)  # fmt: skip
    rep = json.loads(r.stdout)[0]
    assert r.returncode == 12 and rep["stage"] == "workload"
    assert rep["message"] == "timed out after 8s in stage workload"
    assert any("@@vmimg@@ exec" in line for line in rep["console_tail"])
    assert _qemu_processes(bundles["erofs"]) == []
    xmlschema.XMLSchema(str(SCHEMA)).validate(str(junit))
    assert b'<failure message="timed out after 8s' in junit.read_bytes()


def test_run_exit_code_and_shutdown_request(bundles: dict[str, Path], cache_dir: Path) -> None:
    r = vmimg("run", str(bundles["ext4"]), "--cmd", "echo from-run; exit 7", cache=cache_dir,
              stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 7 and "from-run" in r.stdout
    code, out = run_then_stop(bundles["erofs"], cache_dir, "--cmd", TRAP_TERM)
    assert "GOT-TERM" in out
    assert code == 42
    assert _qemu_processes(bundles["erofs"]) == []


def test_verify_needs_a_bundle(tmp_path: Path, cache_dir: Path) -> None:
    r = vmimg("verify", str(tmp_path), cache=cache_dir)
    # Not a bundle: nothing booted, so the exit code is the bundle error's, not a failed check's.
    assert r.returncode == 13
    assert f"{tmp_path} is not a vmimg bundle (no vm.json)" in r.stdout
    assert sys.executable


def test_stop_signal_of_the_image_reaches_the_workload(
    kernel_file: str, cache_dir: Path, tmp_path: Path
) -> None:
    """An image with STOPSIGNAL SIGQUIT (as nginx has): a shutdown request sends SIGQUIT."""
    from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout
    from vmimg.image.sample import busybox_layer

    script = "trap 'echo GOT-QUIT; exit 7' QUIT; trap 'echo GOT-TERM; exit 1' TERM; " \
        "echo WAITING; while true; do sleep 1; done"  # fmt: skip
    layout = tmp_path / "layout"
    spec = ImageSpec([LayerSpec(busybox_layer())], config={
        "Cmd": ["/bin/sh", "-c", script], "StopSignal": "SIGQUIT"})  # fmt: skip
    write_layout(str(layout), {"quit": spec})
    bundle = build(f"oci:{layout}:quit", tmp_path / "b", cache_dir, kernel_file)
    code, out = run_then_stop(bundle, cache_dir)
    assert "GOT-QUIT" in out and "GOT-TERM" not in out and code == 7
