"""`vmimg run`'s pieces that need no guest: the run config and run disk, the parsing of the
container-style options, the QEMU arguments of volumes and disks, data disks, the exec
channel's frames, and the VM state directory. Boots are in tests/boot/test_run.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.test_bundles import make_bundle
from vmimg.boot import state as vmstate
from vmimg.boot.devices import (
    data_disk_path,
    disk_args,
    ensure_data_disk,
    exec_port_args,
    parse_data,
    parse_disk,
    parse_publish,
    parse_secret,
    parse_volume,
    volume_args,
)
from vmimg.boot.launch import LaunchOptions, PortForward, qemu_command
from vmimg.boot.run import RunOptions, run_bundle
from vmimg.bundle.format import read_vm_json
from vmimg.cli.options import parse_size, split_words
from vmimg.cli.vms import parse_env
from vmimg.errors import AgentError, BootError, UsageError
from vmimg.guest import channel
from vmimg.guest.runconfig import (
    MAX_SECRET_BYTES,
    SECTOR,
    GuestMount,
    RunConfig,
    Secret,
    run_disk_image,
)
from vmimg.image.cache import Cache

VMIMG = [sys.executable, "-m", "vmimg"]


# --- the run config -----------------------------------------------------------------------


def test_run_config_round_trip_and_padding() -> None:
    mounts = (
        GuestMount("volume", "vmimg0", "/mnt/a b", "ro"),
        GuestMount("disk", "vmimg-disk0", "", "rw"),
        GuestMount("disk", "vmimg-disk1", "/data", "data"),
    )
    cfg = RunConfig(
        argv=("/bin/sh", "-c", "echo 'a b'\n", ""),
        env=("A=1", "B=x y=z"),
        cwd="/srv/my app",
        user="app:staff",
        hostname="h",
        tty=False,
        stdin=True,
        rows=40,
        cols=120,
        stop_timeout=3,
        stop_signal=3,
        mounts=mounts,
        secrets=(Secret("token", b"\0\xffsecret\n"),),
    )
    data = cfg.to_bytes()
    assert data.startswith(b"vmimg-run-config 1\n")
    assert b"arg echo%20'a%20b'%0A" in data and b"arg \n" in data
    assert b"secret token 00ff7365637265740a\n" in data
    assert RunConfig.from_bytes(data) == cfg
    disk = run_disk_image(cfg)
    assert len(disk) % SECTOR == 0 and disk.startswith(data) and disk[len(data)] == 0


def test_secret_bytes_never_in_a_repr() -> None:
    secret = Secret("db", b"hunter2")
    cfg = RunConfig(secrets=(secret,))
    opts = RunOptions(secrets=(secret,))
    for text in (repr(secret), repr(cfg), repr(opts), str(opts)):
        assert "hunter2" not in text


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (RunConfig(argv=()), "empty"),
        (RunConfig(env=("NOEQUALS",)), "KEY=VALUE"),
        (RunConfig(env=("=x",)), "KEY=VALUE"),
        (RunConfig(cwd="relative"), "absolute"),
        (RunConfig(user=":5"), "bad user"),
        (RunConfig(rows=0), "out of range"),
        (RunConfig(stop_timeout=-1), "out of range"),
        (RunConfig(stop_timeout=2**32 - 1), "out of range"),
        (RunConfig(stop_signal=0), "not a signal"),
        (RunConfig(stop_signal=65), "not a signal"),
        (RunConfig(mounts=(GuestMount("volume", "t", "/"),)), "other than /"),
        (RunConfig(mounts=(GuestMount("volume", "t", "/a/../etc"),)), "no . or .."),
        (RunConfig(mounts=(GuestMount("volume", "t", "rel"),)), "absolute"),
        (RunConfig(mounts=(GuestMount("volume", "t", "/a", "data"),)), "data disk"),
        (RunConfig(mounts=(GuestMount("disk", "", "/a"),)), "bad guest mount"),
        (RunConfig(secrets=(Secret("../x", b""),)), "secret name"),
        (RunConfig(secrets=(Secret("a/b", b""),)), "secret name"),
        (RunConfig(secrets=(Secret("..", b""),)), "secret name"),
        (RunConfig(secrets=(Secret("x", b""), Secret("x", b""))), "same name"),
        (RunConfig(secrets=(Secret("big", bytes(MAX_SECRET_BYTES + 1)),)), "larger"),
        (RunConfig(argv=("a\0b",)), "NUL"),
    ],
)
def test_run_config_refuses_what_the_agent_refuses(cfg: RunConfig, message: str) -> None:
    with pytest.raises(AgentError, match=message):
        cfg.to_bytes()


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("8080:80", PortForward(8080, 80)),
        ("0.0.0.0:53:5353/udp", PortForward(53, 5353, "0.0.0.0", "udp")),
        ("10.1.2.3:1:65535/tcp", PortForward(1, 65535, "10.1.2.3", "tcp")),
    ],
)
def test_parse_publish(spec: str, want: PortForward) -> None:
    assert parse_publish(spec) == want
    assert want.hostfwd().startswith(f"{want.proto}:{want.host_ip}:")


@pytest.mark.parametrize(
    "spec",
    ["80", "a:b", "0:80", "80:65536", "1.2.3:80:80", "999.1.1.1:80:80", "80:80/sctp",
     "80:80,hostfwd=tcp::22-:22", "[::1]:80:80", ":80:80"],
)  # fmt: skip
def test_parse_publish_refuses(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_publish(spec)


def test_parse_volume_disk_data_secret(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    img = tmp_path / "x.img"
    img.write_bytes(bytes(4096))
    assert parse_volume(f"{tmp_path}/d:/mnt/d:ro").read_only
    assert parse_volume(f"{tmp_path}/d:/mnt/d").guest_dir == "/mnt/d"
    assert parse_disk(f"{img}").guest_dir == ""
    disk = parse_disk(f"{img}:/mnt/x:ro")
    assert (disk.guest_dir, disk.read_only) == ("/mnt/x", True)
    assert parse_data("64M:/var/lib/db", parse_size).size == 64 << 20
    (tmp_path / "s").write_bytes(b"\0bytes")
    assert parse_secret(f"id=db.pw,src={tmp_path}/s") == Secret("db.pw", b"\0bytes")
    assert parse_secret(f"type=file,source={tmp_path}/s,id=x").data == b"\0bytes"


@pytest.mark.parametrize(
    ("parse", "spec", "message"),
    [
        (parse_volume, "{t}/missing:/m", "not a directory"),
        (parse_volume, "{t}/d", "HOSTDIR:GUESTDIR"),
        (parse_volume, "{t}/d:/", "other than /"),
        (parse_volume, "{t}/d:/a/../etc", "no . or .."),
        (parse_volume, "{t}/d:rel", "absolute"),
        (parse_disk, "{t}/missing", "not a file"),
        (parse_disk, "{t}/d:/m", "not a file"),
        (parse_disk, "{t}/x.img:/", "other than /"),
        (parse_secret, "id=a", "id=NAME,src=FILE"),
        (parse_secret, "id=../a,src={t}/x.img", "secret name"),
        (parse_secret, "id=a,src={t}/missing", "cannot read"),
        (parse_secret, "id=a,src={t}/big", "larger than"),
        (parse_secret, "id=a,src={t}/x.img,id=b", "id=NAME,src=FILE"),
        (parse_secret, "id=a,src={t}/x.img,type=env", "id=NAME,src=FILE"),
    ],
)
def test_option_parsers_refuse(tmp_path: Path, parse: object, spec: str, message: str) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "x.img").write_bytes(bytes(512))
    (tmp_path / "big").write_bytes(bytes(MAX_SECRET_BYTES + 1))
    assert callable(parse)
    with pytest.raises(UsageError, match=message):
        parse(spec.format(t=tmp_path))


@pytest.mark.parametrize("spec", ["64M", "1M:/d", "64M:", "lots:/d", "64M:relative", "64M:/"])
def test_parse_data_refuses(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_data(spec, parse_size)


def test_parse_env_files_and_host_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\n\nA=from-file\nB=x=y z\nFROM_HOST\nUNSET_HERE\n")
    monkeypatch.setenv("FROM_HOST", "host value")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    got = parse_env(("A=from-flag", "FROM_HOST"), (str(env_file),))
    assert got == ("A=from-file", "B=x=y z", "FROM_HOST=host value", "A=from-flag",
                   "FROM_HOST=host value")  # fmt: skip
    with pytest.raises(UsageError, match="line 1"):
        env_file.write_text("BAD KEY=1\n")
        parse_env((), (str(env_file),))
    with pytest.raises(UsageError):
        parse_env(("=x",), ())
    assert split_words("", "--entrypoint") == ()
    assert split_words('["/bin/sh", "-c"]', "--entrypoint") == ("/bin/sh", "-c")
    with pytest.raises(UsageError):
        split_words("[1, 2]", "--entrypoint")


# --- devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_root_disk_is_found_first_and_device_arguments(tmp_path: Path, arch: str) -> None:
    """The guest must find the root disk first, or root=/dev/vda finds another disk:
    microvm probes virtio-mmio devices in command-line order, virt in reverse."""
    bundle = tmp_path / "b"
    make_bundle(bundle, fs="erofs", arch=arch)
    vm = read_vm_json(str(bundle))
    (tmp_path / "d,x").mkdir()
    vol_args, mount = volume_args(0, parse_volume(f"{tmp_path}/d,x:/mnt:ro"))
    assert mount == GuestMount("volume", "vmimg0", "/mnt", "ro")
    assert "security_model=none" in vol_args[1] and "d,,x" in vol_args[1]
    assert "readonly=on" in vol_args[1]
    extra = (*vol_args, *disk_args(0, str(tmp_path / "x.img"), True),
             *exec_port_args(str(tmp_path / "exec.sock")))  # fmt: skip
    cmd = qemu_command(vm, str(bundle), opts=LaunchOptions(extra=extra,
                       publish=(PortForward(8080, 80, "0.0.0.0", "udp"),)))  # fmt: skip
    disks = [a for a in cmd if a.startswith("virtio-blk-device,")]
    in_probe_order = disks if arch == "x86_64" else disks[::-1]
    assert len(disks) == 2 and in_probe_order[0] == "virtio-blk-device,drive=root"
    assert "virtio-blk-device,drive=disk0,serial=vmimg-disk0" in cmd
    assert "virtserialport,chardev=exec,name=vmimg.exec" in cmd
    assert any("hostfwd=udp:0.0.0.0:8080-:80" in a for a in cmd)


def test_data_disk_is_made_once_and_kept(tmp_path: Path) -> None:
    bundle = tmp_path / "app.vm"
    path = data_disk_path(str(bundle), "/var/lib/my db")
    assert path == f"{tmp_path}/app.vm.data/var%2Flib%2Fmy%20db.ext4"
    assert ensure_data_disk(path, 32 << 20) is True
    st = os.stat(path)
    assert st.st_size == 32 << 20 and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_blocks * 512 < 4 << 20  # sparse
    fsck = subprocess.run(["e2fsck", "-fn", path], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"guest data")
    assert ensure_data_disk(path, 64 << 20) is False  # kept, not remade or resized
    assert os.path.getsize(path) == 32 << 20
    with open(path, "rb") as f:
        f.seek(1 << 20)
        assert f.read(10) == b"guest data"
    os.unlink(path)
    os.symlink("/etc/passwd", path)
    with pytest.raises(BootError, match="not a regular file"):
        ensure_data_disk(path, 32 << 20)


# --- the exec channel --------------------------------------------------------------------------


def test_frames_in_pieces() -> None:
    stream = (channel.frame(channel.STDOUT, b"out") + channel.frame(channel.STDERR, b"")
              + channel.frame(channel.EXIT, channel.EXIT_CODE.pack(7)))  # fmt: skip
    reader = channel.FrameReader()
    frames = [f for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])]
    assert [(f.kind, f.payload) for f in frames[:2]] == [(b"O", b"out"), (b"E", b"")]
    assert frames[2].exit_code == 7
    assert channel.signal_frame(2) == b"K\0\0\0\x01\x02"
    assert channel.winsize_frame(24, 80) == b"W\0\0\0\x04\0\x18\0\x50"


def test_hello_is_the_agents() -> None:
    """The host's hello frame is byte for byte the one agent/src/exec.h resyncs on."""
    header = (Path(__file__).resolve().parent.parent / "agent" / "src" / "exec.h").read_text()
    assert channel.HELLO == b"H\0\0\0\x0cvmimg-exec-1"
    assert '#define HELLO "H\\0\\0\\0\\x0cvmimg-exec-1"' in header
    assert f"#define HELLO_LEN {len(channel.HELLO)}" in header


@pytest.mark.parametrize(
    "data",
    [b"Z\0\0\0\0", b"O\xff\xff\xff\xff", b"Q\0\0\0\x01x", b"X\0\0\0\0"],
)
def test_bad_frames_from_the_guest(data: bytes) -> None:
    with pytest.raises(AgentError):
        channel.FrameReader().feed(data)


# --- state -------------------------------------------------------------------------------------


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "rt"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    return root


def test_state_root_must_be_private(runtime_dir: Path) -> None:
    assert vmstate.state_root() == str(runtime_dir / "vmimg")
    os.chmod(runtime_dir / "vmimg", 0o755)
    with pytest.raises(BootError, match="not a private directory"):
        vmstate.state_root()
    os.rmdir(runtime_dir / "vmimg")
    os.symlink(runtime_dir, runtime_dir / "vmimg")
    with pytest.raises(BootError, match="not a private directory"):
        vmstate.state_root()


@pytest.mark.parametrize("name", ["", "-x", "a/b", "..", ".x", "a" * 65, "a b", "é"])
def test_bad_vm_names(runtime_dir: Path, name: str) -> None:
    with pytest.raises(UsageError):
        vmstate.create(name)


def test_state_running_only_while_qemu_lives(runtime_dir: Path) -> None:
    state = vmstate.create("web")
    with pytest.raises(BootError, match="in use"):
        vmstate.create("web")
    sleeper = subprocess.Popen(["sleep", "60"])
    start = vmstate.process_start(sleeper.pid)
    assert start is not None
    rec = vmstate.VmRecord("web", "/b", True, False, 0.0, pid=sleeper.pid, pid_start=start)
    state.save(rec)
    assert vmstate.get("web").running()
    state.save(vmstate.VmRecord("web", "/b", True, False, 0.0, pid=sleeper.pid,
                                pid_start=start + 1))  # fmt: skip
    assert not state.running()  # a reused pid is another process
    state.save(rec)
    sleeper.kill()
    sleeper.wait()
    assert not state.running()
    with open(state.path(vmstate.CONSOLE_LOG), "wb") as f:
        f.write(b"noise\n@@vmimg@@ exit code=3\n@@vmimg@@ exit code=42\r\n[ 1.0] reboot\n")
    assert state.exit_code() == 42
    with pytest.raises(BootError, match="no VM named nope"):
        vmstate.get("nope")


def test_zombie_is_not_running(runtime_dir: Path) -> None:
    child = subprocess.Popen(["true"])
    while True:  # until it has exited, unreaped
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
    assert vmstate.process_start(child.pid) is None
    child.wait()


def test_ended_rm_vm_is_forgotten(runtime_dir: Path) -> None:
    state = vmstate.create("gone")
    state.save(vmstate.VmRecord("gone", "/b", True, True, 0.0, pid=2**22 + 7, pid_start=1))
    assert vmstate.list_all() == []
    assert not os.path.exists(state.dir)


def test_unreadable_state_is_skipped_and_named(runtime_dir: Path) -> None:
    state = vmstate.create("torn")
    Path(state.path(vmstate.RECORD)).write_text('{"name": "torn", "pid": ')
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    r = subprocess.run([*VMIMG, "ps", "-a", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = subprocess.run([*VMIMG, "stop", "torn"], capture_output=True, text=True, env=env)
    assert r.returncode == BootError.exit_code
    assert "the state of VM torn is unreadable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ps_lists_and_json(runtime_dir: Path) -> None:
    state = vmstate.create("old")
    state.save(vmstate.VmRecord("old", "/x/b", True, False, 1.0, ports=["127.0.0.1:1->2/tcp"],
                                pid=2**22 + 7, pid_start=1, exit_code=3))  # fmt: skip
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    r = subprocess.run([*VMIMG, "ps"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "old" not in r.stdout
    r = subprocess.run([*VMIMG, "ps", "-a", "--json"], capture_output=True, text=True, env=env)
    (row,) = json.loads(r.stdout)
    assert (row["name"], row["state"], row["exit_code"]) == ("old", "exited", 3)
    r = subprocess.run([*VMIMG, "exec", "old", "true"], capture_output=True, text=True, env=env)
    assert r.returncode == BootError.exit_code and "old is not running" in r.stderr
    r = subprocess.run([*VMIMG, "rm", "old"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and not os.path.exists(state.dir)
    r = subprocess.run([*VMIMG, "logs", "old"], capture_output=True, text=True, env=env)
    assert r.returncode == BootError.exit_code and "no VM named old" in r.stderr


# --- run's checks before anything boots ---------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (RunOptions(cmd="x", command=("y",)), "does not mix"),
        (RunOptions(network="none", publish=(PortForward(1, 2),)), "needs a network"),
        (RunOptions(detach=True, interactive=True), "no -i or -t"),
        (RunOptions(detach=True, timeout=3), "not with -d"),
    ],
)
def test_run_refuses_option_mixes(tmp_path: Path, opts: RunOptions, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        run_bundle(str(tmp_path), opts, Cache.open(str(tmp_path / "cache")))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stop-signal", "SIGNOPE"], "--stop-signal: 'SIGNOPE' is not a signal"),
        (["-p", "80"], "--publish takes"),
        (["-v", "/nonexistent-dir:/x"], "is not a directory"),
        (["--secret", "id=a"], "id=NAME,src=FILE"),
        (["--name", "a/b"], "a VM name is"),
        (["--network", "none", "-p", "1:2"], "needs a network"),
    ],
)
def test_run_option_errors_are_one_line(
    tmp_path: Path, runtime_dir: Path, args: list[str], message: str
) -> None:
    bundle = tmp_path / "b"
    make_bundle(bundle, fs="erofs")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir), "VMIMG_ACCEL": "tcg",
           "VMIMG_CACHE": str(tmp_path / "cache")}  # fmt: skip
    r = subprocess.run([*VMIMG, "run", *args, str(bundle)], capture_output=True, text=True,
                       env=env)  # fmt: skip
    assert r.returncode == UsageError.exit_code, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_old_bundle_refuses_run_time_options(tmp_path: Path, runtime_dir: Path) -> None:
    """A bundle whose agent predates the run disk would ignore -e silently: refused."""
    bundle = tmp_path / "b"
    make_bundle(bundle, fs="erofs")
    doc = json.loads((bundle / "vm.json").read_text())
    assert doc["init"].get("protocol", 1) == 1
    opts = RunOptions(env=("A=1",), accel="tcg")
    with pytest.raises(BootError, match="older vmimg"):
        run_bundle(str(bundle), opts, Cache.open(str(tmp_path / "cache")))
    assert vmstate.list_all() == []  # nothing left behind
