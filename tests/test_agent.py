"""The init agent: C unit tests, the Python config/manifest side, and boots
under QEMU (TCG) with the agent as PID 1 of an initramfs.

Boot tests use vmimg.guest.kernel's kernel when that module provides one, else the
Debian kernel in /boot (apt-get install linux-image-amd64), which boots a
newc initramfs without modules. The initramfs is written here from a Tree
(busybox-static as the userland) after `inject_agent`, so the whole path from
Tree to a running workload is exercised.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.test_bundles import make_bundle, write_vm
from vmimg.boot.launch import firecracker_config, qemu_kernel_command, qmp_args
from vmimg.boot.vm import VM, BootResult, qmp_command
from vmimg.bundle.format import read_vm_json
from vmimg.errors import VmimgError
from vmimg.guest import agent
from vmimg.guest.agent import (
    AgentBinaryMissing,
    AgentConfig,
    AgentError,
    ConfigOverrides,
    Manifest,
    build_manifest,
    find_agent_binary,
    inject_agent,
    resolve_config,
)
from vmimg.guest.kernel import find_kernel
from vmimg.guest.protocol import (
    BootOptions,
    Marker,
    escape,
    kernel_args,
    parse_markers,
    unescape,
)
from vmimg.image.layers import Extent
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.writers.cpio import CpioOptions, write_cpio

REPO = Path(__file__).resolve().parent.parent
AGENT_SRC = REPO / "agent"
BUSYBOX = "/bin/busybox"
BOOT_TIMEOUT = 180  # seconds: TCG on a shared 2-core machine is slow
MAX_AGENT_SIZE = 100 * 1024

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    "app:x:1000:1000:App User:/home/app:/bin/sh\n"
    "nohome:x:1001:1001::/:/bin/sh\n"
)
GROUP = (
    "root:x:0:\n"
    "daemon:x:1:\n"
    "wheel:x:10:app,root\n"
    "audio:x:29:nohome,app\n"
    "app:x:1000:\n"
    "nohome:x:1001:\n"
    "staff:x:50:\n"
)


# --- C side ---------------------------------------------------------------------


@pytest.mark.slow
def test_c_unit_tests() -> None:
    """The agent's C parser, escaping, manifest and sha256 tests on the host."""
    if shutil.which("cc") is None:
        pytest.fail("no C compiler (cc) for the agent's host tests")
    result = subprocess.run(
        ["make", "-s", "-C", str(AGENT_SRC), "check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    suites = ("config", "escape", "manifest", "sha256", "cmdline", "marker", "verify", "runcfg")
    for suite in suites:
        assert f"{suite}: " in result.stdout
    assert " 0 failed" in result.stdout and ", 1 failed" not in result.stdout


@pytest.fixture(scope="session")
def agent_binary() -> str:
    """Build the agent (musl, static) and check its size."""
    if shutil.which("musl-gcc") is None:
        pytest.fail("musl-gcc missing: apt-get install musl-tools")
    result = subprocess.run(["make", "-s", "-C", str(AGENT_SRC)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    path = find_agent_binary("x86_64")
    assert os.path.getsize(path) <= MAX_AGENT_SIZE
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF"
    file_out = subprocess.run(["file", path], capture_output=True, text=True).stdout
    if file_out:
        assert "statically linked" in file_out or "static-pie" in file_out
    return path


# --- escaping and formats ---------------------------------------------------------


@given(st.binary().filter(lambda b: b"\0" not in b))
def test_escape_round_trip(raw: bytes) -> None:
    escaped = escape(raw)
    assert all(0x21 <= b < 0x7F for b in escaped)
    assert unescape(escaped) == raw


def test_escape_rejects_nul_and_bad_escapes() -> None:
    with pytest.raises(AgentError):
        escape(b"a\0b")
    for bad in (b"%", b"%4", b"%zz", b"%00"):
        with pytest.raises(AgentError):
            unescape(bad)
    assert escape(b"a b%\n") == b"a%20b%25%0A"


def test_config_serialisation_round_trip() -> None:
    cfg = AgentConfig(
        argv=["/bin/sh", "-c", "echo 'a b'\n\tdone", "", "%41 é"],
        env=["PATH=/bin", "X=a=b c"],
        cwd="/srv/my app",
        uid=1000,
        gid=100,
        groups=[10, 29],
        hostname="box",
        overlay="always",
        smoke="true",
        stop_timeout=3,
    )
    data = cfg.to_bytes()
    lines = data.split(b"\n")
    assert lines[0] == b"vmimg-agent-config 1"
    assert b"arg echo%20'a%20b'%0A%09done" in lines
    assert b"arg " in lines  # an empty argument survives
    assert AgentConfig.from_bytes(data) == cfg


def test_config_rejects_what_the_agent_cannot_run() -> None:
    with pytest.raises(AgentError, match="no command"):
        AgentConfig(argv=[]).to_bytes()
    with pytest.raises(AgentError, match="absolute"):
        AgentConfig(argv=["x"], cwd="rel").to_bytes()
    with pytest.raises(AgentError, match="NUL"):
        AgentConfig(argv=["a\0b"]).to_bytes()
    with pytest.raises(AgentError, match="version"):
        AgentConfig.from_bytes(b"vmimg-agent-config 2\narg x\n")


def _file(data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Node:
    return Node(NodeType.FILE, mode=mode, uid=uid, gid=gid, content=Content.from_bytes(data))


def _dir(mode: int = 0o755, uid: int = 0, gid: int = 0) -> Node:
    return Node(NodeType.DIR, mode=mode, uid=uid, gid=gid)


def _users_tree() -> Tree:
    tree = Tree()
    tree.add(b"/etc", _dir())
    tree.add(b"/etc/passwd", _file(PASSWD.encode()))
    tree.add(b"/etc/group", _file(GROUP.encode()))
    return tree


@pytest.mark.parametrize(
    ("user", "uid", "gid", "groups", "home"),
    [
        ("", 0, 0, [10], "/root"),
        ("root", 0, 0, [10], "/root"),
        ("app", 1000, 1000, [10, 29], "/home/app"),
        ("1000", 1000, 1000, [10, 29], "/home/app"),
        ("app:staff", 1000, 50, [10, 29], "/home/app"),
        ("app:50", 1000, 50, [10, 29], "/home/app"),
        ("1000:7", 1000, 7, [10, 29], "/home/app"),
        ("nohome", 1001, 1001, [29], "/"),
        ("4242", 4242, 0, [], "/"),  # unknown numeric uid: runc gives gid 0
        ("4242:4243", 4242, 4243, [], "/"),
    ],
)
def test_resolve_user(user: str, uid: int, gid: int, groups: list[int], home: str) -> None:
    with ContentReader() as reader:
        cfg = resolve_config({"Cmd": ["sh"], "User": user}, _users_tree(), reader)
    assert (cfg.uid, cfg.gid, cfg.groups) == (uid, gid, groups)
    assert f"HOME={home}" in cfg.env


def test_resolve_user_errors_name_the_user() -> None:
    with ContentReader() as reader:
        with pytest.raises(AgentError, match="'ghost'"):
            resolve_config({"Cmd": ["sh"], "User": "ghost"}, _users_tree(), reader)
        with pytest.raises(AgentError, match="'nogroup'"):
            resolve_config({"Cmd": ["sh"], "User": "app:nogroup"}, _users_tree(), reader)
        with pytest.raises(AgentError, match="Entrypoint or Cmd"):
            resolve_config({"Env": ["A=1"]}, _users_tree(), reader)


def _tree_with(passwd: str, group: str) -> Tree:
    tree = Tree()
    tree.add(b"/etc", _dir())
    tree.add(b"/etc/passwd", _file(passwd.encode()))
    tree.add(b"/etc/group", _file(group.encode()))
    return tree


HUGE = "9" * 5000  # past int()'s 4300-digit limit: must not surface as a ValueError


@pytest.mark.parametrize(
    ("passwd", "group", "user", "message"),
    [
        # a group listing the user, with a gid no gid_t holds (the agent crashed on it)
        (PASSWD, GROUP + "big:x:99999999999:app\n", "app", r"group 'big'.*/etc/group"),
        (PASSWD, GROUP + f"big:x:{HUGE}:app\n", "app", r"group 'big'.*too large"),
        (PASSWD + "huge:x:4294967295:0::/:/bin/sh\n", GROUP, "huge", r"uid of user 'huge'.*passwd"),
        (PASSWD + f"huge:x:0:{HUGE}::/:/bin/sh\n", GROUP, "huge", r"gid of user 'huge'.*passwd"),
        (PASSWD, GROUP + "big:x:4294967295:\n", "app:big", r"gid of group 'big'.*/etc/group"),
        (PASSWD, GROUP, "4294967295", r"uid 4294967295 in User '4294967295'"),
        (PASSWD, GROUP, f"app:{HUGE}", r"gid 9+ in User"),
    ],
)
def test_out_of_range_ids_are_named(passwd: str, group: str, user: str, message: str) -> None:
    with ContentReader() as reader, pytest.raises(AgentError, match=message):
        resolve_config({"Cmd": ["sh"], "User": user}, _tree_with(passwd, group), reader)


def test_ids_at_the_limit_and_odd_lines_elsewhere() -> None:
    """4294967294 is a valid id; an out-of-range or non-ASCII id on a line the user does
    not use is no error; "²" is not a number (str.isdigit() says it is, int() disagrees)."""
    passwd = PASSWD + "top:x:4294967294:4294967294::/:/bin/sh\nodd:x:²:0::/:/bin/sh\n"
    group = GROUP + "big:x:99999999999:daemon\nsup:x:4294967294:top\nodd:x:٣:top\n"
    with ContentReader() as reader:
        cfg = resolve_config({"Cmd": ["sh"], "User": "top"}, _tree_with(passwd, group), reader)
        assert (cfg.uid, cfg.gid, cfg.groups) == (agent.MAX_ID, agent.MAX_ID, [])
        cfg = resolve_config({"Cmd": ["sh"], "User": "app"}, _tree_with(passwd, group), reader)
        assert cfg.groups == [10, 29]
        with pytest.raises(AgentError, match="user '²' is not in"):
            resolve_config({"Cmd": ["sh"], "User": "²"}, _tree_with(passwd, group), reader)
        with pytest.raises(AgentError, match="StopSignal '²'"):
            resolve_config({"Cmd": ["sh"], "StopSignal": "²"}, _tree_with(passwd, group), reader)


def test_config_refuses_ids_the_agent_refuses() -> None:
    for over in ({"uid": 2**32 - 1}, {"gid": -1}, {"groups": [1, 2**32]}):
        with pytest.raises(AgentError, match=r"agent config .* out of range"):
            AgentConfig(argv=["x"], **over).to_bytes()  # type: ignore[arg-type]
    with pytest.raises(AgentError, match="group 'x'"):
        AgentConfig.from_bytes(b"vmimg-agent-config 1\narg x\ngroup x\n")
    with pytest.raises(AgentError, match=r"uid.*out of range"):
        AgentConfig.from_bytes(b"vmimg-agent-config 1\narg x\nuid 4294967295\n")


def test_resolve_config_follows_passwd_symlink() -> None:
    tree = _users_tree()
    passwd = tree.remove(b"/etc/passwd")
    assert passwd is not None
    tree.add(b"/usr/share/base-passwd", _dir(), make_dirs=_dir())
    tree.add(b"/usr/share/base-passwd/passwd", passwd)
    tree.add(
        b"/etc/passwd",
        Node(NodeType.SYMLINK, mode=0o777, target=b"../usr/share/base-passwd/passwd"),
    )
    with ContentReader() as reader:
        cfg = resolve_config({"Cmd": ["sh"], "User": "app"}, tree, reader)
    assert cfg.uid == 1000


@pytest.mark.parametrize(
    ("value", "number"), [(None, 15), ("SIGQUIT", 3), ("quit", 3), ("9", 9), ("SIGWINCH", 28)]
)
def test_stop_signal_from_the_image(value: str | None, number: int) -> None:
    with ContentReader() as reader:
        cfg = resolve_config({"Cmd": ["/x"], "StopSignal": value}, _users_tree(), reader)
    assert cfg.stop_signal == number
    assert AgentConfig.from_bytes(cfg.to_bytes()).stop_signal == number


def test_bad_stop_signal_is_named() -> None:
    with ContentReader() as reader, pytest.raises(AgentError, match="StopSignal 'SIGNOPE'"):
        resolve_config({"Cmd": ["/x"], "StopSignal": "SIGNOPE"}, _users_tree(), reader)


def test_resolve_config_command_env_and_overrides() -> None:
    image = {
        "Entrypoint": ["/entry.sh", "--flag"],
        "Cmd": ["serve", "--port=80"],
        "Env": ["PATH=/opt/bin:/bin", "LANG=C.UTF-8", "HOME=/data"],
        "WorkingDir": "/srv",
        "User": "app",
        "Hostname": "web",
    }
    with ContentReader() as reader:
        tree = _users_tree()
        cfg = resolve_config(image, tree, reader)
        assert cfg.argv == ["/entry.sh", "--flag", "serve", "--port=80"]
        assert cfg.env == ["PATH=/opt/bin:/bin", "LANG=C.UTF-8", "HOME=/data", "HOSTNAME=web"]
        assert (cfg.cwd, cfg.hostname) == ("/srv", "web")

        # docker run --entrypoint drops the image's Cmd
        cfg = resolve_config(image, tree, reader, ConfigOverrides(entrypoint=["/bin/sh"]))
        assert cfg.argv == ["/bin/sh"]
        cfg = resolve_config(
            image,
            tree,
            reader,
            ConfigOverrides(cmd=["other"], env=["LANG=fr", "NEW=1"], workdir="/w", user="0:0"),
        )
        assert cfg.argv == ["/entry.sh", "--flag", "other"]
        assert cfg.env[:4] == ["PATH=/opt/bin:/bin", "LANG=fr", "HOME=/data", "NEW=1"]
        assert (cfg.cwd, cfg.uid, cfg.gid) == ("/w", 0, 0)

        # defaults when the image says little
        cfg = resolve_config({"Cmd": ["x"]}, Tree(), reader)
        assert cfg.env == ["PATH=" + agent.DEFAULT_PATH, "HOME=/"]
        assert (cfg.cwd, cfg.uid, cfg.gid, cfg.groups, cfg.hostname) == ("/", 0, 0, [], None)


def _sample_tree(tmp_path: Path) -> Tree:
    """A tree with every node type, odd names, a sparse file and content
    stored in a file (as layer tars are)."""
    layer = tmp_path / "layer.bin"
    layer.write_bytes(b"HEADER" + b"stored content\n" + b"tail")
    tree = Tree()
    tree.add(b"/etc", _dir())
    tree.add(b"/etc/hosts", _file(b"127.0.0.1 localhost\n"))
    tree.add(b"/stored", Node(NodeType.FILE, content=Content(size=15, path=str(layer), offset=6)))
    tree.add(
        b"/sparse",
        Node(
            NodeType.FILE,
            content=Content(size=10000, data=b"abcxyz", extents=(Extent(100, 3), Extent(9000, 3))),
        ),
    )
    tree.add(b"/odd name\n%", _file(b"x", mode=0o4750, uid=5, gid=6))
    tree.add(b"/link", Node(NodeType.SYMLINK, mode=0o777, target=b"odd name\n%"))
    tree.add(b"/dash", Node(NodeType.SYMLINK, mode=0o777, target=b"-"))
    tree.add(b"/dev", _dir())
    tree.add(b"/dev/null", Node(NodeType.CHAR, mode=0o666, rdev=(1, 3)))
    tree.add(b"/dev/sda", Node(NodeType.BLOCK, mode=0o660, gid=6, rdev=(8, 0)))
    tree.add(b"/fifo", Node(NodeType.FIFO, mode=0o600))
    tree.add(b"/sock", Node(NodeType.SOCKET, mode=0o755))
    hard = _file(b"shared")
    tree.add(b"/h1", hard)
    tree.add(b"/h2", hard)
    return tree


def test_manifest_from_tree_and_round_trip(tmp_path: Path) -> None:
    tree = _sample_tree(tmp_path)
    with ContentReader() as reader:
        manifest = build_manifest(tree, reader)
    by_path = {e.path: e for e in manifest.entries}
    assert [e.path for e in manifest.entries] == [p for p, _ in tree.walk()]
    assert by_path[b"/stored"].sha256 == hashlib.sha256(b"stored content\n").hexdigest()
    sparse = bytearray(10000)
    sparse[100:103] = b"abc"
    sparse[9000:9003] = b"xyz"
    assert by_path[b"/sparse"].sha256 == hashlib.sha256(bytes(sparse)).hexdigest()
    assert by_path[b"/sparse"].size == 10000
    odd = by_path[b"/odd name\n%"]
    assert (odd.mode, odd.uid, odd.gid, odd.size) == (0o4750, 5, 6, 1)
    assert by_path[b"/link"].target == b"odd name\n%"
    assert by_path[b"/link"].size == len(b"odd name\n%")
    assert by_path[b"/dev/sda"].rdev == (8, 0)
    assert by_path[b"/"].type is NodeType.DIR

    data = manifest.to_bytes()
    assert data.startswith(b"vmimg-manifest 1\n")
    assert b"/odd%20name%0A%25 f 4750 5 6 1 0:0 " in data
    assert b"/dash l 0777 0 0 1 0:0 - -\n" in data
    for line in data.split(b"\n")[1:-1]:
        assert len(line.split(b" ")) == 9
    assert Manifest.from_bytes(data) == manifest


DEEP_LEVELS = 5000  # as agent/tests/test_verify.c walks on disk


def test_manifest_of_a_deep_tree() -> None:
    """A 5,000-level directory chain (10,000-byte paths, a 25 MB manifest): walked without
    recursion, escaped and parsed back at C speed (per-byte Python took 16 s)."""
    tree = Tree()
    node = tree.root
    for _ in range(DEEP_LEVELS):  # built by hand: Tree.add walks from the root every time
        child = _dir()
        assert node.children is not None
        node.children[b"d"] = child
        node = child
    assert node.children is not None
    node.children[b"f"] = _file(b"bottom")
    with ContentReader() as reader:
        manifest = build_manifest(tree, reader)
    assert len(manifest.entries) == DEEP_LEVELS + 2
    deepest = manifest.entries[-1]
    assert deepest.path == b"/d" * DEEP_LEVELS + b"/f"
    assert deepest.sha256 == hashlib.sha256(b"bottom").hexdigest()
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def test_manifest_skips_agent_files(tmp_path: Path, agent_binary: str) -> None:
    tree = _sample_tree(tmp_path)
    with ContentReader() as reader:
        before = build_manifest(tree, reader)
        inject_agent(tree, AgentConfig(argv=["/bin/sh"]), before, agent_binary)
        after = build_manifest(tree, reader)
    assert after == before


def test_inject_agent(tmp_path: Path, agent_binary: str) -> None:
    tree = _sample_tree(tmp_path)
    tree.add(b"/sbin", _dir())
    image_init = _file(b"#!/bin/sh\n", mode=0o755)
    tree.add(b"/sbin/init", image_init)
    cfg = AgentConfig(argv=["/bin/true"])
    with ContentReader() as reader:
        manifest = build_manifest(tree, reader)
        untouched = Tree()
        inject_agent(untouched, cfg, manifest, agent_binary, init_mode="image")
        assert untouched.root.children == {}

        inject_agent(tree, cfg, manifest, agent_binary)
        vmimg_dir = tree.get(b"/.vmimg")
        assert vmimg_dir is not None and vmimg_dir.is_dir and vmimg_dir.mode == 0o755
        assert (vmimg_dir.uid, vmimg_dir.gid) == (0, 0)
        init = tree.get(b"/.vmimg/init")
        assert init is not None and init.content is not None
        assert init.mode == 0o755
        assert reader.read_all(init.content) == Path(agent_binary).read_bytes()
        config = tree.get(b"/.vmimg/config")
        assert config is not None and config.content is not None
        assert AgentConfig.from_bytes(reader.read_all(config.content)) == cfg
        mf = tree.get(b"/.vmimg/manifest")
        assert mf is not None and mf.content is not None
        assert Manifest.from_bytes(reader.read_all(mf.content)) == manifest
        assert tree.get(b"/sbin/init") is image_init
    with pytest.raises(AgentError, match="init mode"):
        inject_agent(Tree(), cfg, manifest, agent_binary, init_mode="systemd")
    with pytest.raises(AgentBinaryMissing):
        inject_agent(Tree(), cfg, manifest, str(tmp_path / "nope"))


def test_find_agent_binary_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(AgentBinaryMissing, match=r"make -C agent ARCH=riscv64"):
        find_agent_binary("riscv64")
    monkeypatch.setenv("VMIMG_AGENT_BINARY", str(tmp_path / "missing"))
    with pytest.raises(AgentBinaryMissing, match="VMIMG_AGENT_BINARY"):
        find_agent_binary()
    (tmp_path / "init").write_bytes(b"x")
    monkeypatch.setenv("VMIMG_AGENT_BINARY", str(tmp_path / "init"))
    assert find_agent_binary() == str(tmp_path / "init")


def test_kernel_args() -> None:
    assert kernel_args() == ["init=/.vmimg/init"]
    assert kernel_args(initramfs=True) == ["init=/.vmimg/init", "rdinit=/.vmimg/init"]
    args = kernel_args(
        options=BootOptions(mode="verify", deep=True, smoke="echo hi", ip="1.2.3.4/8")
    )
    assert args[1:] == [
        "vmimg.mode=verify",
        "vmimg.deep=1",
        "vmimg.ip=1.2.3.4/8",
        'vmimg.smoke="echo hi"',
    ]
    with pytest.raises(AgentError):
        kernel_args(options=BootOptions(cmd='echo "x"'))


def test_parse_markers() -> None:
    console = (
        "[    0.5] Run /.vmimg/init as init process\r\n"
        "\r\n@@vmimg@@ ready version=1 boot_us=512345 kernel=6.1.0 rootfs=ramfs"
        " mem_used_kb=9000\r\n"
        "hello @@vmimg@@ exit code=9\r\n"  # not at line start: workload output, ignored
        "@@vmimg@@ error stage=exec msg=cannot%20execute%20/x:%20No%20such%20file\n"
        "@@vmimg@@ exit code=137 signal=9\n"
    )
    markers = parse_markers(console)
    assert [m.event for m in markers] == ["ready", "error", "exit"]
    assert markers[0].number("boot_us") == 512345
    assert markers[1].fields["msg"] == "cannot execute /x: No such file"
    assert markers[2] == Marker("exit", {"code": "137", "signal": "9"})


# --- boot tests --------------------------------------------------------------------


def _tuned_kernel() -> str | None:
    """vmimg.guest.kernel's newest cached kernel image (built by `vmimg kernel build`), if any."""
    try:
        found = find_kernel()
    except VmimgError:  # no cache, nothing built: both mean "none"
        return None
    return str(found.image) if found.image.is_file() else None


def _any_kernel() -> str | None:
    tuned = _tuned_kernel()
    if tuned:
        return tuned
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def _kernel_config(image: str) -> str:
    """The .config text beside a kernel image (cache layout or Debian /boot), or ""."""
    candidates = [Path(image).parent / "config"]
    name = Path(image).name
    if name.startswith("vmlinuz-"):
        candidates.append(Path(image).parent / ("config-" + name[len("vmlinuz-") :]))
    for path in candidates:
        if path.is_file():
            return path.read_text(errors="replace")
    return ""


def _cad_kernel() -> str | None:
    """A kernel that turns the PC keyboard's ctrl-alt-del into SIGINT for init:
    it needs the i8042 controller and AT keyboard drivers built in."""
    needed = ("CONFIG_SERIO_I8042=y", "CONFIG_KEYBOARD_ATKBD=y")
    for image in [_tuned_kernel(), *sorted(glob.glob("/boot/vmlinuz-*"), reverse=True)]:
        if image and os.access(image, os.R_OK):
            config = _kernel_config(image).splitlines()
            if all(option in config for option in needed):
                return image
    return None


@pytest.fixture(scope="session")
def kernel() -> str:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing")
    path = _any_kernel()
    if path is None:
        pytest.fail("no kernel: apt-get install linux-image-amd64 (or build vmimg.guest.kernel's)")
    if not os.access(path, os.R_OK):
        pytest.fail(f"kernel {path} is not readable")
    return path


def write_newc(tree: Tree, reader: ContentReader, out: Path) -> None:
    """An uncompressed newc initramfs of the tree, by the package's own cpio writer."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_cpio(tree, reader, fd, CpioOptions(compression="none"))
    finally:
        os.close(fd)


def busybox_tree(script: bytes | None = None) -> Tree:
    """A small userland: busybox-static, users, the usual empty dirs."""
    tree = _users_tree()
    for d in (b"/bin", b"/dev", b"/proc", b"/sys", b"/run", b"/root", b"/home"):
        tree.add(d, _dir())
    tree.add(b"/tmp", _dir(mode=0o1777))
    tree.add(b"/home/app", _dir(uid=1000, gid=1000))
    tree.add(b"/dev/console", Node(NodeType.CHAR, mode=0o600, rdev=(5, 1)))
    size = os.path.getsize(BUSYBOX)
    tree.add(b"/bin/busybox", Node(NodeType.FILE, mode=0o755, content=Content(size, BUSYBOX)))
    for applet in (b"sh", b"echo", b"id", b"pwd", b"sleep", b"cat", b"ls", b"kill", b"true"):
        tree.add(b"/bin/" + applet, Node(NodeType.SYMLINK, mode=0o777, target=b"busybox"))
    if script is not None:
        tree.add(b"/entry.sh", _file(script, mode=0o755))
    return tree


GUEST_MEMORY_MIB = 256
POLL_SECONDS = 0.1


@dataclass
class Boot:
    """A finished boot (vmimg.boot.vm's result) whose markers the tests insist on."""

    result: BootResult

    @property
    def console(self) -> str:
        return self.result.console

    @property
    def markers(self) -> list[Marker]:
        return [timed.marker for timed in self.result.markers]

    @property
    def returncode(self) -> int | None:
        return self.result.returncode

    def last(self, event: str) -> Marker:
        found = self.result.last(event)
        assert found, f"no {event} marker in console output:\n{self.console[-4000:]}"
        return found.marker


def run_qemu(
    argv: list[str],
    while_running: Callable[[VM], None] | None = None,
    timeout: float = BOOT_TIMEOUT,
) -> Boot:
    """Boot with vmimg's own VM runner until QEMU exits (a failure when it is still running
    after `timeout`); `while_running` is called every POLL_SECONDS until then."""
    vm = VM(argv)
    vm.start()
    deadline = time.monotonic() + timeout
    try:
        while while_running is not None and vm.running and time.monotonic() < deadline:
            while_running(vm)
            time.sleep(POLL_SECONDS)
    finally:
        result = vm.wait(timeout)
    if result.timed_out:
        pytest.fail(f"VM did not power off in {timeout}s:\n{result.console[-4000:]}")
    return Boot(result)


@dataclass
class TreeBoot:
    """A kernel and an initramfs made from a Tree; QMP on a unix socket when `qmp` is set."""

    kernel: str
    initrd: Path
    cmdline: list[str]
    machine: str = "q35"
    qmp: Path | None = None

    def command(self) -> list[str]:
        append = " ".join(["console=ttyS0", "panic=-1", "quiet", *self.cmdline])
        extra = tuple(qmp_args(str(self.qmp))) if self.qmp is not None else ()
        return qemu_kernel_command(
            self.kernel, append, initrd=str(self.initrd), machine=self.machine,
            memory_mib=GUEST_MEMORY_MIB, extra=extra,
        )  # fmt: skip

    def run(self, while_running: Callable[[VM], None] | None = None) -> Boot:
        return run_qemu(self.command(), while_running)


def boot_tree(
    tmp_path: Path,
    kernel: str,
    agent_binary: str,
    tree: Tree,
    cfg: AgentConfig,
    options: BootOptions | None = None,
    manifest: Manifest | None = None,
) -> TreeBoot:
    with ContentReader() as reader:
        if manifest is None:
            manifest = build_manifest(tree, reader)
        inject_agent(tree, cfg, manifest, agent_binary)
        initrd = tmp_path / "initrd.cpio"
        write_newc(tree, reader, initrd)
    return TreeBoot(kernel, initrd, kernel_args(initramfs=True, options=options))


def _config(tree: Tree, image: Mapping[str, Any], **over: Any) -> AgentConfig:
    with ContentReader() as reader:
        return resolve_config(image, tree, reader, ConfigOverrides(**over))


PRINT_SCRIPT = b"""#!/bin/sh
echo "ARGC=$#"
for a in "$@"; do echo "ARG=[$a]"; done
echo "PWD=$(pwd)"
echo "ID=$(id -u):$(id -g):$(id -G)"
echo "FOO=[$FOO]"
echo "HOME=$HOME"
echo "PID=$$"
echo "LOFLAGS=$(cat /sys/class/net/lo/flags)"
echo "HOSTNAME=$(hostname) $(grep -c "$(hostname)" /etc/hosts)"
echo "NOFILE=$(ulimit -n)"
exit "${EXIT:-0}"
"""


@pytest.mark.boot
@pytest.mark.slow
def test_boot_runs_entrypoint_as_user(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    tree = busybox_tree(PRINT_SCRIPT)
    tree.add(b"/srv", _dir())
    tree.add(b"/srv/data", _dir(uid=1000, gid=1000))
    image = {
        "Entrypoint": ["/entry.sh", "two words"],
        "Cmd": ["x*y", ""],
        "Env": ["FOO=bar baz", "EXIT=3"],
        "WorkingDir": "/srv/data",
        "User": "app",
        "Hostname": "guest1",
    }
    vm = boot_tree(tmp_path, kernel, agent_binary, tree, _config(tree, image))
    boot = vm.run()
    out = boot.console.replace("\r", "")
    assert "ARGC=3\n" in out
    assert "ARG=[two words]\nARG=[x*y]\nARG=[]\n" in out
    assert "PWD=/srv/data\n" in out
    assert "ID=1000:1000:1000 10 29\n" in out
    assert "FOO=[bar baz]\n" in out
    assert "HOME=/home/app\n" in out
    assert "HOSTNAME=guest1 1\n" in out
    assert "NOFILE=1048576\n" in out
    loflags = out.split("LOFLAGS=")[1].split("\n")[0]
    assert int(loflags, 16) & 1, "loopback is not up"
    ready = boot.last("ready")
    assert ready.fields["rootfs"] in ("ramfs", "tmpfs")
    assert ready.fields["kernel"] and ready.number("mem_used_kb") > 0
    exec_marker = boot.last("exec")
    assert exec_marker.number("boot_us") >= ready.number("boot_us")
    assert f"PID={exec_marker.fields['pid']}\n" in out
    assert boot.last("exit").fields == {"code": "3"}
    assert exec_marker.number("agent_us") <= exec_marker.number("boot_us") - ready.number("boot_us")
    print(f"agent start to exec: {exec_marker.number('agent_us')} us (TCG)")


@pytest.mark.boot
@pytest.mark.slow
def test_boot_exit_zero_and_orphans_reaped(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    """A workload that leaves orphans (some already dead, some still running)
    ends with code 0 and the VM still powers off."""
    script = b"""#!/bin/sh
for i in 1 2 3; do (sleep 0 &) ; done
(sleep 1000 &)
( (exit 0) & )
sleep 1
echo "ZOMBIES=$(cat /proc/[0-9]*/stat 2>/dev/null | grep -c ') Z ')"
exit 0
"""
    tree = busybox_tree(script)
    vm = boot_tree(tmp_path, kernel, agent_binary, tree, _config(tree, {"Cmd": ["/entry.sh"]}))
    boot = vm.run()
    assert "ZOMBIES=0" in boot.console
    assert boot.last("exit").fields == {"code": "0"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_killed_by_signal(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    """vmimg.cmd replaces the configured command; a workload killed by a
    signal reports 128 + the signal."""
    tree = busybox_tree()
    cfg = _config(tree, {"Cmd": ["/bin/false"]})
    options = BootOptions(cmd="echo dying; kill -9 $$")
    boot = boot_tree(tmp_path, kernel, agent_binary, tree, cfg, options).run()
    assert "dying" in boot.console
    assert boot.last("exit").fields == {"code": "137", "signal": "9"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_missing_entrypoint(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    tree = busybox_tree()
    tree.add(b"/notexec", _file(b"#!/bin/sh\necho no\n", mode=0o644))
    cfg = _config(tree, {"Cmd": ["no-such-command", "arg"]})
    boot = boot_tree(tmp_path, kernel, agent_binary, tree, cfg).run()
    error = boot.last("error")
    assert error.fields["stage"] == "exec"
    assert "no-such-command" in error.fields["msg"]
    assert "No such file" in error.fields["msg"]
    assert boot.last("exit").fields == {"code": "127"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_not_executable(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    tree = busybox_tree()
    tree.add(b"/notexec", _file(b"#!/bin/sh\necho no\n", mode=0o644))
    cfg = _config(tree, {"Cmd": ["/notexec"]})
    boot = boot_tree(tmp_path, kernel, agent_binary, tree, cfg).run()
    assert "Permission denied" in boot.last("error").fields["msg"]
    assert boot.last("exit").fields == {"code": "126"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_bad_config_fails_cleanly(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    tree = busybox_tree()
    vm = boot_tree(tmp_path, kernel, agent_binary, tree, AgentConfig(argv=["/bin/true"]))
    # replace the config with a future version the agent must refuse
    with ContentReader() as reader:
        tree.add(b"/.vmimg/config", _file(b"vmimg-agent-config 99\narg /bin/true\n"))
        write_newc(tree, reader, vm.initrd)
    boot = vm.run()
    error = boot.last("error")
    assert error.fields["stage"] == "config" and "version" in error.fields["msg"]
    assert boot.last("exit").fields == {"code": "125"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_shutdown_request_reaches_workload(
    tmp_path: Path, kernel: str, agent_binary: str
) -> None:
    """ctrl-alt-del from the host (the kernel turns it into SIGINT to PID 1
    once CAD is disabled) reaches the workload as SIGTERM."""
    cad_kernel = _cad_kernel()
    if cad_kernel is None:
        pytest.fail("no kernel with i8042 + atkbd built in (Debian's linux-image-amd64 has them)")
    script = b"""#!/bin/sh
trap 'echo GOT-TERM; exit 42' TERM
echo WAITING
while true; do sleep 1; done
"""
    tree = busybox_tree(script)
    cfg = _config(tree, {"Cmd": ["/entry.sh"]})
    vm = boot_tree(tmp_path, cad_kernel, agent_binary, tree, cfg)
    vm.qmp = tmp_path / "qmp.sock"
    sent: list[float] = []

    def press_cad(running: VM) -> None:
        # press again every few seconds: TCG may still be busy when the first arrives
        if "WAITING" in running.console and (not sent or time.monotonic() - sent[-1] > 5):
            qmp_command(str(vm.qmp), "send-key", {"keys": CTRL_ALT_DELETE})
            sent.append(time.monotonic())

    boot = vm.run(while_running=press_cad)
    assert sent
    assert "GOT-TERM" in boot.console
    signal_marker = boot.last("signal")
    assert signal_marker.fields == {"received": "2", "forwarded": "15"}
    assert boot.last("exit").fields == {"code": "42"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_verify_ok_then_smoke(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    tree = busybox_tree()
    tree.add(b"/etc/motd", _file(b"hello\n", mode=0o600, uid=1000, gid=50))
    tree.add(b"/etc/link", Node(NodeType.SYMLINK, mode=0o777, target=b"motd"))
    cfg = _config(tree, {"Cmd": ["/bin/false"]})
    options = BootOptions(mode="verify", deep=True, smoke="echo SMOKE-$((6*7)); exit 5")
    boot = boot_tree(tmp_path, kernel, agent_binary, tree, cfg, options).run()
    verify = boot.last("verify")
    assert verify.fields["result"] == "ok", boot.console[-3000:]
    assert verify.fields["deep"] == "1"
    assert "SMOKE-42" in boot.console
    assert boot.last("smoke").fields == {"code": "5"}
    assert boot.last("exit").fields == {"code": "5"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_verify_reports_problems(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    """The manifest describes a different tree than the one booted: each
    difference is listed."""
    tree = busybox_tree()
    tree.add(b"/etc/motd", _file(b"hello\n"))
    tree.add(b"/etc/gone", _file(b"x"))
    tree.add(b"/etc/link", Node(NodeType.SYMLINK, mode=0o777, target=b"motd"))
    with ContentReader() as reader:
        manifest = build_manifest(tree, reader)
    tree.add(b"/etc/motd", _file(b"HELLO\n"))  # same size, other content
    tree.remove(b"/etc/gone")
    tree.add(b"/etc/extra", _file(b""))
    tree.add(b"/etc/link", Node(NodeType.SYMLINK, mode=0o777, target=b"mot2"))
    group = tree.get(b"/etc/group")
    assert group is not None
    group.mode = 0o600
    cfg = _config(tree, {"Cmd": ["/bin/true"]})
    options = BootOptions(mode="verify", deep=True)
    boot = boot_tree(tmp_path, kernel, agent_binary, tree, cfg, options, manifest=manifest).run()
    problems = {
        (m.fields["path"], m.fields["what"]) for m in boot.markers if m.event == "verify-problem"
    }
    assert problems == {
        ("/etc/motd", "content"),
        ("/etc/gone", "missing"),
        ("/etc/extra", "unexpected"),
        ("/etc/link", "target"),
        ("/etc/group", "mode"),
    }
    assert boot.last("verify").fields["result"] == "fail"
    assert boot.last("verify").number("problems") == 5
    assert boot.last("exit").fields == {"code": "1"}


@pytest.mark.boot
@pytest.mark.slow
def test_boot_bad_group_fails_cleanly(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    """A gid no gid_t holds, after good ones, in the config: an error and exit 125. The agent
    used to free the groups twice (when growing the array had moved it: musl moves 12 bytes of
    groups to a bigger slot for the fourth), and the guest panicked: "Attempted to kill init"."""
    tree = busybox_tree()
    vm = boot_tree(tmp_path, kernel, agent_binary, tree, AgentConfig(argv=["/bin/true"]))
    with ContentReader() as reader:
        groups = b"".join(b"group %d\n" % g for g in (10, 20, 29, 99999999999))
        bad = b"vmimg-agent-config 1\narg /bin/true\n" + groups
        tree.add(b"/.vmimg/config", _file(bad))
        write_newc(tree, reader, vm.initrd)
    boot = vm.run()
    assert "Attempted to kill init" not in boot.console
    error = boot.last("error")
    assert error.fields["stage"] == "config" and "group" in error.fields["msg"]
    assert boot.last("exit").fields == {"code": "125"}


# QMP's send-key for the PC keyboard's three-finger salute.
CTRL_ALT_DELETE = [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]
# QEMU's microvm without ACPI stands in for Firecracker: no power-off method in the guest.
NO_ACPI_MACHINE = "microvm,acpi=off"


@pytest.mark.boot
@pytest.mark.slow
def test_boot_without_acpi_ends_the_vm(tmp_path: Path, kernel: str, agent_binary: str) -> None:
    """Without ACPI a power-off only halts ("reboot: System halted") and QEMU ran on forever.
    The agent sees no /sys/firmware/acpi and reboots, which QEMU (-no-reboot) exits on; the
    workload's exit code still arrives in the marker printed before."""
    tree = busybox_tree()
    cfg = _config(tree, {"Cmd": ["/bin/sh", "-c", "echo NO-ACPI-$((3+4)); exit 7"]})
    vm = boot_tree(tmp_path, kernel, agent_binary, tree, cfg)
    vm.machine = NO_ACPI_MACHINE
    boot = vm.run()  # fails the test when QEMU is still running at the timeout
    assert "NO-ACPI-7" in boot.console
    assert boot.last("exit").fields == {"code": "7"}
    assert "System halted" not in boot.console
    assert boot.returncode == 0


@pytest.mark.parametrize(("arch", "told"), [("x86_64", True), ("arm64", False)])
def test_firecracker_guests_are_told_to_reboot(arch: str, told: bool, tmp_path: Path) -> None:
    """Firecracker on x86_64 exits on the reboot (reboot=k) and only halts on power-off, so the
    agent is told; arm64 guests power off through PSCI."""
    vm = make_bundle(tmp_path / "b")
    vm["arch"] = arch
    write_vm(tmp_path / "b", vm)
    args = firecracker_config(read_vm_json(str(tmp_path / "b")), ".")["boot-source"]["boot_args"]
    args = args.split()
    assert "reboot=k" in args
    assert ("vmimg.shutdown=reboot" in args) is told


def _erofs_kernel_reason() -> str | None:
    if _tuned_kernel() is None:
        return "needs vmimg.guest.kernel's tuned kernel (erofs, overlayfs, virtio-blk built in)"
    if shutil.which("mkfs.erofs") is None:
        return "mkfs.erofs missing (apt-get install erofs-utils)"
    return None


SECTOR = 512
EROFS_BLOCK = 4096


def _failing_reads(tmp_path: Path, image: Path, data: bytes) -> str:
    """A QEMU drive file spec for `image` whose reads of the block holding the start of `data`
    fail with EIO (QEMU's blkdebug driver), as dm-verity fails a block that does not hash."""
    offset = image.read_bytes().find(data[:EROFS_BLOCK])
    assert offset >= 0 and offset % EROFS_BLOCK == 0, "data not block-aligned in the image"
    rules = tmp_path / "blkdebug.conf"
    rules.write_text(
        f'[inject-error]\nevent = "read_aio"\nerrno = "{errno.EIO}"\n'
        f'sector = "{offset // SECTOR}"\n'
    )
    return f"blkdebug:{rules}:{image}"


def _boot_erofs(
    tmp_path: Path,
    agent_binary: str,
    cfg: AgentConfig,
    options: BootOptions,
    bad_file: tuple[bytes, bytes] | None = None,
) -> Boot:
    """Boot an erofs image of a busybox tree as a virtio-blk root (tuned kernel). bad_file
    (path, data): a file of the image whose first block fails to read (EIO)."""
    reason = _erofs_kernel_reason()
    if reason:
        pytest.fail(reason)
    tuned = _tuned_kernel()
    assert tuned is not None
    tree = busybox_tree()
    tree.add(b"/etc/motd", _file(b"from the image\n"))
    if bad_file is not None:
        tree.add(bad_file[0], _file(bad_file[1], mode=0o755))
    with ContentReader() as reader:
        inject_agent(tree, cfg, build_manifest(tree, reader), agent_binary)
        stage = tmp_path / "root"
        _stage_tree(tree, reader, stage)
    image = tmp_path / "root.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(stage)], check=True)
    drive = str(image) if bad_file is None else _failing_reads(tmp_path, image, bad_file[1])
    append = ["console=ttyS0", "panic=-1", "quiet", "root=/dev/vda", "rootfstype=erofs", "ro"]
    disk = (
        "-drive", f"file={drive},format=raw,if=none,id=root,readonly=on",
        "-device", "virtio-blk-device,drive=root",
    )  # fmt: skip
    append += kernel_args(options=options)
    argv = qemu_kernel_command(tuned, " ".join(append), memory_mib=GUEST_MEMORY_MIB, extra=disk)
    return run_qemu(argv)


@pytest.mark.boot
@pytest.mark.slow
def test_boot_erofs_root_is_writable_through_overlay(tmp_path: Path, agent_binary: str) -> None:
    script = (
        "grep ' / ' /proc/mounts; echo new > /etc/new; cat /etc/new /etc/motd;"
        " rm /etc/motd && echo REMOVED; ls /proc/1/exe >/dev/null && echo PROC-OK"
    )
    cfg = AgentConfig(argv=["/bin/sh", "-c", script])
    boot = _boot_erofs(tmp_path, agent_binary, cfg, BootOptions())
    assert boot.last("ready").fields["rootfs"] == "erofs", boot.console
    out = boot.console.replace("\r", "")
    assert "overlay / overlay" in out
    assert "new\nfrom the image\nREMOVED\nPROC-OK\n" in out
    assert boot.last("exit").fields == {"code": "0"}
    print(
        f"tuned kernel, erofs root: agent start to exec {boot.last('exec').number('agent_us')} us"
    )


@pytest.mark.boot
@pytest.mark.slow
def test_boot_erofs_verify_deep(tmp_path: Path, agent_binary: str) -> None:
    cfg = AgentConfig(argv=["/bin/false"])
    boot = _boot_erofs(tmp_path, agent_binary, cfg, BootOptions(mode="verify", deep=True))
    verify = boot.last("verify")
    assert verify.fields["result"] == "ok", boot.console
    assert boot.last("exit").fields == {"code": "0"}


# A script padded past two erofs blocks with bytes found nowhere else in the image, so that
# its first block can be found in the image and made to fail.
CORRUPT_SCRIPT = b"#!/bin/sh\necho NEVER-RUN\n" + b"".join(
    b"# %s\n" % hashlib.sha256(b"%d" % i).hexdigest().encode() for i in range(120)
)


@pytest.mark.boot
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["run", "verify"])
def test_boot_io_error_is_an_integrity_error(tmp_path: Path, agent_binary: str, mode: str) -> None:
    """A block of the root that fails to read (EIO, as dm-verity reports a corrupted block):
    exec of the entrypoint, or the deep verify's read of it, gives error stage=integrity."""
    cfg = AgentConfig(argv=["/corrupt"])
    options = BootOptions(mode="verify", deep=True) if mode == "verify" else BootOptions()
    boot = _boot_erofs(tmp_path, agent_binary, cfg, options, (b"/corrupt", CORRUPT_SCRIPT))
    error = boot.last("error")
    assert error.fields["stage"] == "integrity", boot.console[-3000:]
    assert error.fields["path"] == "/corrupt"
    assert "I/O error" in error.fields["msg"]
    assert "NEVER-RUN" not in boot.console
    if mode == "run":
        assert error.fields["during"] == "exec"
        assert boot.last("exit").fields == {"code": "126"}
    else:
        assert error.fields["during"] == "verify"
        assert boot.last("verify").fields["result"] == "fail"
        assert boot.last("exit").fields == {"code": "1"}


def _stage_tree(tree: Tree, reader: ContentReader, root: Path) -> None:
    """Put a tree on disk (we are root in the test machine) for mkfs.erofs."""
    for path, node in tree.walk():
        disk = os.fsencode(root) + path
        if node.is_dir:
            os.makedirs(disk, exist_ok=True)
        elif node.type is NodeType.FILE:
            assert node.content is not None
            with open(disk, "wb") as f:
                f.write(reader.read_all(node.content))
        elif node.type is NodeType.SYMLINK:
            assert node.target is not None
            os.symlink(node.target, disk)
        elif node.type is NodeType.CHAR:
            os.mknod(disk, 0o600 | 0o020000, os.makedev(*node.rdev))
        else:
            continue
        if node.type is not NodeType.SYMLINK:
            os.chmod(disk, node.mode)
        os.lchown(disk, node.uid, node.gid)
