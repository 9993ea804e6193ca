"""The Firecracker and Cloud Hypervisor launchers against each project's published interface.

Neither VMM runs here (no usable KVM), so their configs are checked against what the
projects publish: launch/firecracker.json against Firecracker's API schema (the
definitions transcribed in tests/data/firecracker-vm-config.yaml), the cloud-hypervisor
command line against its options (tests/data/cloud-hypervisor-cli.yaml). Both open the root
read-only, never writing the bundle, and attach the documented tap device.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.hostile.test_bundles import make_bundle, write_vm
from vmimg.boot.launch import (
    TAP_DEVICE,
    cloud_hypervisor_command,
    firecracker_config,
    read_only_root,
)
from vmimg.boot.launchers import write_launchers
from vmimg.bundle.format import read_vm_json

DATA = Path(__file__).resolve().parent / "data"
FC_SCHEMA = yaml.safe_load((DATA / "firecracker-vm-config.yaml").read_text())
CH_OPTIONS: dict[str, dict[str, Any]] = yaml.safe_load(
    (DATA / "cloud-hypervisor-cli.yaml").read_text()
)
CASES = [("erofs", "x86_64"), ("ext4", "x86_64"), ("initramfs", "x86_64"), ("ext4", "arm64")]


def _bundle(tmp_path: Path, fs: str, arch: str) -> Path:
    path = tmp_path / f"{fs}-{arch}"
    vm = make_bundle(path, fs="ext4" if fs == "ext4" else "erofs", arch=arch)
    if fs == "ext4":
        vm["cmdline"] = "console=ttyS0 quiet panic=-1 root=/dev/vda rw rootfstype=ext4"
    if fs == "initramfs":
        data = (path / "rootfs.erofs").read_bytes()
        (path / "rootfs.erofs").rename(path / "initramfs.cpio.gz")
        vm["files"]["initramfs.cpio.gz"] = vm["files"].pop("rootfs.erofs")
        vm["rootfs"] = {"file": "initramfs.cpio.gz", "type": "initramfs", "read_only": False}
        assert data
    write_vm(path, vm)
    return path


def check_firecracker(config: object) -> None:
    jsonschema.Draft4Validator(FC_SCHEMA).validate(config)


def split_options(value: str) -> list[str]:
    """Cloud Hypervisor's split of an option string: at commas outside double quotes and
    brackets; unbalanced quotes or brackets are an error."""
    items, current, quoted, depth = [], "", False, 0
    for c in value:
        if c == '"':
            quoted = not quoted
        elif not quoted and c in "[]":
            depth += 1 if c == "[" else -1
        elif not quoted and not depth and c == ",":
            items.append(current)
            current = ""
            continue
        current += c
    assert not quoted and depth == 0, f"unbalanced quotes or brackets in {value!r}"
    return [*items, current]


def check_cloud_hypervisor(argv: list[str]) -> None:
    """Every option known, given once unless it may repeat, with one value whose keys (for
    option lists) the option takes; AssertionError naming what is wrong otherwise."""
    assert argv[0] == "cloud-hypervisor"
    seen: set[str] = set()
    i = 1
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"{flag!r} is not an option"
        name = flag[2:]
        spec = CH_OPTIONS.get(name)
        assert spec is not None, f"cloud-hypervisor has no option {flag}"
        assert name not in seen or spec.get("multiple"), f"{flag} given twice"
        seen.add(name)
        assert i + 1 < len(argv) and not argv[i + 1].startswith("--"), f"{flag} needs a value"
        value = argv[i + 1]
        if spec["value"] == "options":
            for item in split_options(value):
                key, sep, _ = item.partition("=")
                allowed = spec.get("keys", []) if sep else spec.get("valueless", [])
                assert key in allowed, f"{flag} takes no {'key' if sep else 'word'} {key!r}"
        i += 2


@pytest.mark.parametrize(("fs", "arch"), CASES)
def test_firecracker_config_matches_the_api_schema(tmp_path: Path, fs: str, arch: str) -> None:
    bundle = _bundle(tmp_path, fs, arch)
    vm = read_vm_json(str(bundle))
    config = firecracker_config(vm, ".")
    check_firecracker(config)
    write_launchers(str(bundle), vm)
    check_firecracker(json.loads((bundle / "launch" / "firecracker.json").read_text()))
    args = config["boot-source"]["boot_args"].split()
    assert " rw " not in f" {config['boot-source']['boot_args']} "
    assert all(d["is_read_only"] for d in config["drives"])  # the bundle is never written
    assert config["network-interfaces"][0]["host_dev_name"] == TAP_DEVICE
    assert "vmimg.ip=172.16.0.2/24" in args and "vmimg.gw=172.16.0.1" in args
    for path in [config["boot-source"]["kernel_image_path"],
                 config["boot-source"].get("initrd_path"),
                 *(d["path_on_host"] for d in config["drives"])]:  # fmt: skip
        assert path is None or (bundle / path).is_file()


def test_firecracker_schema_check_catches_mistakes(tmp_path: Path) -> None:
    config = firecracker_config(read_vm_json(str(_bundle(tmp_path, "ext4", "x86_64"))), ".")
    bad: list[dict[str, Any]] = [
        {**config, "boot_source": config["boot-source"]},  # a misspelt section
        {**config, "drives": [{**config["drives"][0], "read_only": True}]},
        {**config, "machine-config": {"vcpu_count": 1}},  # no memory size
        {**config, "machine-config": {"vcpu_count": 64, "mem_size_mib": 128}},
        {**config, "network-interfaces": [{"iface_id": "eth0"}]},  # no tap
        {k: v for k, v in config.items() if k != "drives"},
    ]
    for b in bad:
        with pytest.raises(jsonschema.ValidationError):
            check_firecracker(b)


@pytest.mark.parametrize(("fs", "arch"), CASES)
def test_cloud_hypervisor_command_matches_its_options(tmp_path: Path, fs: str, arch: str) -> None:
    bundle = _bundle(tmp_path, fs, arch)
    vm = read_vm_json(str(bundle))
    argv = cloud_hypervisor_command(vm, str(bundle))
    check_cloud_hypervisor(argv)
    opts = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert opts["--rng"] == "src=/dev/urandom"
    assert " rw " not in f" {opts['--cmdline']} " and "vmimg.ip=172.16.0.2/24" in opts["--cmdline"]
    assert opts["--net"].startswith(f"tap={TAP_DEVICE},")
    if fs != "initramfs":
        path, readonly = split_options(opts["--disk"])
        assert path == f'path="{bundle}/rootfs.{fs}"' and readonly == "readonly=on"
    # The launcher script runs the same words.
    write_launchers(str(bundle), vm)
    script = (bundle / "launch" / "cloud-hypervisor.sh").read_text()
    words = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " "))
    assert words[words.index("--rng") + 1] == "src=/dev/urandom"


def test_cloud_hypervisor_check_catches_mistakes() -> None:
    for argv in (
        ["cloud-hypervisor", "--rng", "--serial", "tty"],  # --rng without its value
        ["cloud-hypervisor", "--disk", "path=x,read_only=on"],
        ["cloud-hypervisor", "--serial", "stdio"],
        ["cloud-hypervisor", "--kernel", "k", "--kernel", "k"],
        ["cloud-hypervisor", "--smp", "2"],
        ["cloud-hypervisor", "--disk", 'path="a,readonly=off'],  # unbalanced quote
    ):
        with pytest.raises(AssertionError):
            check_cloud_hypervisor(argv)


@pytest.mark.parametrize(
    ("cmdline", "want"),
    [
        ("root=/dev/vda rw rootfstype=ext4", "root=/dev/vda ro rootfstype=ext4"),
        ("root=/dev/vda ro rootfstype=erofs", "root=/dev/vda ro rootfstype=erofs"),
        ("vmimg.x=rw rw", "vmimg.x=rw ro"),
    ],
)  # fmt: skip
def test_read_only_root(cmdline: str, want: str) -> None:
    assert read_only_root(cmdline) == want
