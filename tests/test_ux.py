"""A new user's mistakes get fast, documented answers, and long work is visible.

The real CLI, confined (tests/hostile/cli.py): local paths and transports, exit codes,
outputs checked before any work, no traceback, `inspect` of bundles, progress with and
without a terminal, -q/-v, and bundle modes under the user's umask. Bundles are made by
hand or built with Debian's kernel (`--kernel`), so nothing here needs vmimg's kernel.
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import pty
import select
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import skopeo_copy
from tests.hostile.cli import confined_command, confined_env, run_vmimg
from tests.hostile.evil_registry import evil_server, load_layout, serve_registry
from tests.hostile.test_bundles import make_bundle
from tests.test_registry_auth import (  # noqa: F401 (a fixture)
    PASSWORD,
    USER,
    docker_config,
    push,
    secure_registry,
)
from vmimg.boot.run import ConsoleFilter
from vmimg.boot.vm import qemu_missing
from vmimg.cli.progress import Progress
from vmimg.image.sample import write_sample

DEBIAN_KERNELS = sorted(glob.glob("/boot/vmlinuz-*"), reverse=True)
NO_QEMU = {"PATH": "/nonexistent"}
INSPECT_REPO = "ux/inspected"
FAST = 10.0  # seconds: an answer "at once", with room for a loaded machine
EXIT_USAGE, EXIT_REF, EXIT_BOOT = 2, 3, 10


@pytest.fixture(scope="module")
def debian_kernel() -> str:
    if not DEBIAN_KERNELS:
        pytest.fail("no /boot/vmlinuz-*: install a Debian kernel (the README set-up does)")
    return DEBIAN_KERNELS[0]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmimg: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- 1. references --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["verify"], ["inspect"], ["rootfs", "-o", "x.tar"]])
def test_a_mistyped_local_path_is_refused_at_once(tmp_path: Path, command: list[str]) -> None:
    start = time.monotonic()
    r = run_vmimg(tmp_path, command[0], "./bundel", *command[1:])
    assert time.monotonic() - start < FAST  # not 16 s of retries against a registry "."
    assert r.returncode == EXIT_REF
    assert one_error_line(r.stderr) == "vmimg: error: ./bundel: no such file or directory"


@pytest.mark.parametrize("source", ["containers-storage:x", "foo:", "dir:"])
def test_unknown_or_empty_transports_fail_at_once(tmp_path: Path, source: str) -> None:
    start = time.monotonic()
    r = run_vmimg(tmp_path, "inspect", source)
    assert time.monotonic() - start < FAST
    assert r.returncode == EXIT_REF
    line = one_error_line(r.stderr)
    if source != "dir:":
        assert "docker://HOST/REPO:TAG" in line and "dir:DIR" in line


@pytest.mark.slow
def test_dir_and_named_docker_archive_sources(sample_ref: str, tmp_path: Path) -> None:
    skopeo_copy(sample_ref, f"dir:{tmp_path / 'copied'}")
    skopeo_copy(sample_ref, f"docker-archive:{tmp_path / 'saved.tar'}:vmimg/app:v1")
    want = run_vmimg(tmp_path, "rootfs", sample_ref, "-o", str(tmp_path / "want.tar"))
    assert want.returncode == 0, want.stderr
    for n, source in enumerate(
        [
            f"dir:{tmp_path / 'copied'}",
            str(tmp_path / "copied"),
            f"docker-archive:{tmp_path / 'saved.tar'}:vmimg/app:v1",
        ]
    ):
        out = tmp_path / f"got{n}.tar"
        r = run_vmimg(tmp_path, "rootfs", source, "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == (tmp_path / "want.tar").read_bytes()


# -- 2. exit codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["build", "SAMPLE", "-o", "out", "-e", "NOEQUALS"], "'NOEQUALS' is not KEY=VALUE"),
        (["rootfs", "SAMPLE", "-o", "x.tar", "--platform", "bogus"], "known: 386, amd64"),
        (["build", "SAMPLE", "-o", "out", "--platform", "linux/s390x"], "linux/amd64, linux/arm64"),
        (["inspect", "SAMPLE", "--platform", "linux/amd64,linux/arm64"], "one platform at a time"),
    ],
)
def test_usage_errors_exit_2_before_any_work(
    sample_ref: str, tmp_path: Path, args: list[str], says: str
) -> None:
    args = [sample_ref if a == "SAMPLE" else a for a in args]
    start = time.monotonic()
    r = run_vmimg(tmp_path, *args)
    assert time.monotonic() - start < FAST  # no kernel build first
    assert r.returncode == EXIT_USAGE, r.stderr
    assert says in one_error_line(r.stderr)
    assert not (tmp_path / "cache" / "kernels").exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["rootfs", "SAMPLE", "-o", "x", "--format", "ext5"],
            "Invalid value for '--format': 'ext5' is not one of 'tar', 'initramfs', 'ext4', "
            "'erofs'. (`vmimg rootfs --help`)",
        ),
        (["buidl", "SAMPLE"], "No such command 'buidl'. (`vmimg --help`)"),
        (["rootfs", "-o", "x"], "Missing argument 'SOURCE'. (`vmimg rootfs --help`)"),
        (
            ["kernel", "show", "--verbos"],
            "No such option '--verbos'. Did you mean '--verbose'? (`vmimg kernel show --help`)",
        ),
    ],
)
def test_click_s_usage_errors_are_one_line_too(
    sample_ref: str, tmp_path: Path, args: list[str], line: str
) -> None:
    """Mistyped commands, options and values: one line saying what is wrong and where the
    help is, like every other error, and exit 2."""
    r = run_vmimg(tmp_path, *[sample_ref if a == "SAMPLE" else a for a in args])
    assert r.returncode == EXIT_USAGE, r.stderr
    assert one_error_line(r.stderr) == f"vmimg: error: {line}"


def test_vmimg_alone_shows_its_help(tmp_path: Path) -> None:
    r = run_vmimg(tmp_path)
    assert r.returncode == EXIT_USAGE and "Commands:" in r.stdout + r.stderr, r.stderr


def test_a_missing_image_or_tag_exits_3(sample_ref: str, registry: str, tmp_path: Path) -> None:
    skopeo_copy(sample_ref, f"docker://{registry}/ux/sample:v1")
    for ref in (f"{registry}/ux/sample:nope", f"{registry}/ux/nothing:v1"):
        r = run_vmimg(tmp_path, "inspect", ref)
        assert r.returncode == EXIT_REF, r.stderr
        assert "no such image or tag" in one_error_line(r.stderr)


@pytest.mark.parametrize(
    ("docker_host", "why"),
    [
        ("unix:///nonexistent/docker.sock", "no such socket"),
        ("unix://FILE", "connection refused"),  # a file where the socket should be
        ("tcp://127.0.0.1:9", "connection refused"),
    ],
)
def test_an_unreachable_docker_engine_is_named_with_the_reason(
    tmp_path: Path, docker_host: str, why: str
) -> None:
    """Where vmimg looked for the engine and the system's reason, not the SDK's nest of
    exception reprs; and what to do."""
    (tmp_path / "not-a-socket").write_bytes(b"")
    where = docker_host.replace("FILE", str(tmp_path / "not-a-socket"))
    r = run_vmimg(tmp_path, "rootfs", "docker-daemon:app:v1", "-o", "x.tar",
                  env={"DOCKER_HOST": where})  # fmt: skip
    assert r.returncode == 4, r.stderr
    assert one_error_line(r.stderr) == (
        f"vmimg: error: docker-daemon:app:v1: cannot reach the Docker engine at {where} "
        f"({why}); start one, or set DOCKER_HOST to where it listens (podman: `podman system "
        "service`)"
    )


def test_verify_of_a_file_says_it_is_not_a_bundle(tmp_path: Path) -> None:
    image = tmp_path / "root.erofs"
    image.write_bytes(b"\0" * 4096)
    r = run_vmimg(tmp_path, "verify", str(image))
    assert r.returncode == 13, r.stderr
    assert one_error_line(r.stderr) == (
        f"vmimg: error: {image}: a file, not a bundle directory (`vmimg build` makes one)"
    )


@pytest.mark.parametrize(
    ("command", "code", "prefix"),
    [(["run"], 13, ""), (["push"], 2, "cannot push {b}: ")],
)
def test_a_bundle_argument_that_is_a_file_or_missing_is_named(
    tmp_path: Path, command: list[str], code: int, prefix: str
) -> None:
    """`run` and `push` given a root image, or nothing there: vmimg's own line, not click's
    "Directory ... is a file"."""
    image = tmp_path / "root.erofs"
    image.write_bytes(b"\0" * 4096)
    missing = tmp_path / "missing.vm"
    for bundle, why in ((image, f"{image} is not a vmimg bundle (not a directory)"),
                        (missing, f"{missing}: no such bundle directory")):  # fmt: skip
        extra = ["127.0.0.1:9/x:y"] if command == ["push"] else []
        r = run_vmimg(tmp_path, *command, str(bundle), *extra)
        assert r.returncode == code, r.stderr
        assert one_error_line(r.stderr) == f"vmimg: error: {prefix.format(b=bundle)}{why}"


def test_qemu_missing_exits_10_for_verify_and_run(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    for command in ("verify", "run"):
        r = run_vmimg(tmp_path, command, "-q", str(tmp_path / "b"), env=NO_QEMU)
        assert r.returncode == EXIT_BOOT, r.stderr
        assert "qemu-system-x86_64 not found: install qemu-system-x86" in r.stderr
        assert "Traceback" not in r.stderr


# -- 3. outputs checked first, no traceback --------------------------------------------------

READ_ONLY = "/sys"  # refuses new files even to root


def test_outputs_are_checked_before_any_work(
    sample_ref: str, tmp_path: Path, debian_kernel: str
) -> None:
    make_bundle(tmp_path / "b")
    # Without QEMU the boot would fail with 10: a 2 shows the report path was checked first.
    r = run_vmimg(tmp_path, "verify", str(tmp_path / "b"), "--junit", "missing/dir/r.xml",
                  env=NO_QEMU)  # fmt: skip
    assert r.returncode == EXIT_USAGE
    assert "--junit missing/dir/r.xml: directory" in one_error_line(r.stderr)
    cases = [
        ["build", sample_ref, "-o", f"{READ_ONLY}/b", "--kernel", debian_kernel],
        ["rootfs", sample_ref, "-o", f"{READ_ONLY}/x.tar"],
        # Unreachable registry: without the check first this would be exit 4 after retries.
        ["pull", "127.0.0.1:9/nothing:v1", "-o", f"{READ_ONLY}/b"],
    ]
    for args in cases:
        start = time.monotonic()
        r = run_vmimg(tmp_path, *args, env={"VMIMG_REGISTRY_RETRIES": "0"})
        assert time.monotonic() - start < FAST
        assert r.returncode == EXIT_USAGE, r.stderr
        assert f"{READ_ONLY}" in one_error_line(r.stderr)


def test_an_os_error_anywhere_is_one_line_naming_the_path(sample_ref: str, tmp_path: Path) -> None:
    """No `tar` on PATH: the first kernel build fails to unpack its source (an OSError the
    code does not expect): one line and exit 1, not a traceback."""
    r = run_vmimg(tmp_path, "build", "-q", sample_ref, "-o", "out", env=NO_QEMU, timeout=600)
    assert r.returncode == 1, r.stderr
    assert one_error_line(r.stderr) == "vmimg: error: tar: No such file or directory"


# -- 4. inspect of bundles --------------------------------------------------------------------


def test_inspect_a_bundle_directory(tmp_path: Path) -> None:
    vm = make_bundle(tmp_path / "b")
    vm["build_key"] = "ab" * 32
    (tmp_path / "b" / "vm.json").write_text(json.dumps(vm))
    r = run_vmimg(tmp_path, "inspect", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for want in (
        f"Bundle:     {tmp_path / 'b'}",
        "Source:     test (sha256:" + "0" * 64 + ")",
        "Kernel:     6.1 (key k)",
        "Root fs:    erofs, 0.0 MiB (rootfs.erofs, read-only)",
        'Workload:   ["/bin/true"]',
        "Build key:  " + "ab" * 32,
    ):
        assert want in text, text
    r = run_vmimg(tmp_path, "inspect", str(tmp_path / "b"), "--json")
    info = json.loads(r.stdout)
    assert info["rootfs"] == {"type": "erofs", "file": "rootfs.erofs", "size": 8192,
                              "read_only": True}  # fmt: skip
    assert info["build_key"] == "ab" * 32 and info["kernel"]["version"] == "6.1"
    r = run_vmimg(tmp_path, "inspect", str(tmp_path / "b"), "--raw")
    assert r.stdout == (tmp_path / "b" / "vm.json").read_text()


@pytest.mark.slow
def test_inspect_a_pushed_bundle(registry: str, sample_ref: str, tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    ref = f"{registry}/ux/bundle:v1"
    r = run_vmimg(tmp_path, "push", str(tmp_path / "b"), ref, "--json")
    assert r.returncode == 0, r.stderr
    pinned = json.loads(r.stdout)["pinned"]
    r = run_vmimg(tmp_path, "inspect", ref)
    assert r.returncode == 0, r.stderr
    assert f"Bundle:     {pinned}" in r.stdout
    assert "Root fs:    erofs" in r.stdout and "Kernel:     6.1" in r.stdout
    raw = json.loads(run_vmimg(tmp_path, "inspect", ref, "--raw").stdout)
    assert raw["artifactType"] == "application/vnd.vmimg.bundle.v1"
    # An image in the same registry is still shown as an image.
    skopeo_copy(sample_ref, f"docker://{registry}/ux/image:v1")
    r = run_vmimg(tmp_path, "inspect", f"{registry}/ux/image:v1", "--json")
    assert r.returncode == 0, r.stderr
    # Pinned by digest and cached, an image needs no registry to be told from a bundle.
    pinned_image = f"127.0.0.1:9/ux/image@{json.loads(r.stdout)['digest']}"
    r = run_vmimg(tmp_path, "inspect", pinned_image, env={"VMIMG_REGISTRY_RETRIES": "0"})
    assert r.returncode == 0 and r.stdout.startswith("Image:"), r.stderr


def test_inspect_fetches_the_manifest_once(tmp_path: Path) -> None:
    """`vmimg inspect HOST/REPO:TAG` tells a bundle from an image by the manifest it fetched:
    one GET of the tag for an image and for a pushed bundle (it used to be two: a probe
    for a bundle, then the image or the artifact read again)."""
    write_sample(str(tmp_path / "layout"))
    store = load_layout(tmp_path / "layout", "latest")
    make_bundle(tmp_path / "b")
    with evil_server() as evil:
        serve_registry(evil, INSPECT_REPO, store)
        ref = f"{evil.address}/{INSPECT_REPO}"
        r = run_vmimg(tmp_path, "push", str(tmp_path / "b"), f"{ref}:bundle")
        assert r.returncode == 0, r.stderr
        for tag, shown in (("latest", "Image:"), ("bundle", "Bundle:")):
            before = len(evil.requests())
            r = run_vmimg(tmp_path, "inspect", f"{ref}:{tag}")
            assert r.returncode == 0 and r.stdout.startswith(shown), r.stderr
            gets = [
                seen
                for seen in evil.requests()[before:]
                if seen.method == "GET" and seen.path == f"/v2/{INSPECT_REPO}/manifests/{tag}"
            ]
            assert len(gets) == 1, (tag, [(s.method, s.path) for s in evil.requests()[before:]])


# -- 5. progress ------------------------------------------------------------------------------


def test_without_a_terminal_each_phase_gets_a_line(
    sample_ref: str, tmp_path: Path, debian_kernel: str
) -> None:
    r = run_vmimg(tmp_path, "build", sample_ref, "-o", "out", "--kernel", debian_kernel)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "vmimg: fetching layers (1.1 MiB)"
    assert "vmimg: flattening layers" in lines
    assert any(ln.startswith("vmimg: writing erofs (") for ln in lines), lines
    assert "\r" not in r.stderr


def test_at_a_terminal_phases_show_totals_rates_and_end_their_line(
    sample_ref: str, tmp_path: Path, debian_kernel: str
) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        confined_command("build", sample_ref, "-o", "out", "--kernel", debian_kernel),
        cwd=tmp_path / "cwd",
        env=confined_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0, seen
    text = seen.decode()
    # Each phase ends on a line of its own: done, its total and rate; the result follows.
    assert "fetching layers, 1.1 MiB of 1.1 MiB (100%)" in text and "MiB/s" in text
    assert ", done\r\n" in text
    assert out.startswith("out: erofs bundle of")


def test_the_first_kernel_build_announces_itself(sample_ref: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        confined_command("build", sample_ref, "-o", "out"),
        cwd=tmp_path / "cwd",
        env=confined_env(tmp_path),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the kernel build's make and tar die with it
    )
    assert proc.stderr is not None
    said = []
    try:
        for line in proc.stderr:
            said.append(line)
            if line.strip() == "vmimg: building the guest kernel":  # the phase starts
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = "".join(said)
    assert "builds the guest kernel once" in text
    assert "`vmimg kernel pull REF`" in text and "--kernel PATH" in text
    assert said[-1].strip() == "vmimg: building the guest kernel"


def test_a_heartbeat_line_during_long_work_without_a_terminal() -> None:
    out = io.StringIO()
    with Progress(out, tty=False, heartbeat=0.2) as shown:
        tick = shown.phase("building the guest kernel", None, "")
        time.sleep(0.9)
        tick(0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "vmimg: building the guest kernel"
    assert len(lines) >= 3 and all(ln.startswith("vmimg: building the guest kernel, 0:0")
                                   for ln in lines[1:])  # fmt: skip


def test_a_failed_phase_is_not_called_done() -> None:
    out = io.StringIO()
    with pytest.raises(OSError), Progress(out, tty=True) as shown:
        shown.phase("fetching layers", 100)(40)
        time.sleep(0.3)  # a redraw or two
        raise OSError("the disk is full")
    assert "fetching layers, 0.0 MiB of 0.0 MiB (40%)" in out.getvalue()
    assert "done" not in out.getvalue()


# -- 6. -q and -v --------------------------------------------------------------------------------


def test_quiet_leaves_only_the_result(sample_ref: str, tmp_path: Path, debian_kernel: str) -> None:
    r = run_vmimg(tmp_path, "build", "-q", sample_ref, "-o", "out", "--kernel", debian_kernel)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("out: erofs bundle of")
    r = run_vmimg(tmp_path, "--quiet", "rootfs", sample_ref, "-o", "x.tar")
    assert r.returncode == 0 and r.stderr == ""


@pytest.mark.slow
def test_verbose_logs_requests_but_never_credentials(
    sample_ref: str,
    secure_registry: tuple[str, str],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    host, cert = secure_registry
    Path(cert).with_name("ca.crt").write_bytes(Path(cert).read_bytes())
    ref = push(sample_ref, host, cert)
    config = docker_config(tmp_path, host, USER, PASSWORD)
    r = run_vmimg(tmp_path, "-v", "inspect", ref, "--ca-cert", cert,
                  env={"DOCKER_CONFIG": config})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"vmimg: GET https://{host}/v2/auth/sample/manifests/v1: 200" in r.stderr
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, basic, "Authorization", "Bearer"):
        assert secret not in r.stderr and secret not in r.stdout
    quiet = run_vmimg(tmp_path, "inspect", ref, "--ca-cert", cert, env={"DOCKER_CONFIG": config})
    assert "GET" not in quiet.stderr


def marker(text: bytes) -> bytes:
    """A marker as the agent writes it (a newline first), through a serial console."""
    return b"\r\n@@vmimg@@ " + text + b"\r\n"


def test_run_console_shows_the_workload_only() -> None:
    """Marker lines go, with the newline the agent writes before each, whatever the
    chunking; text without a newline (a prompt) is not held back unless it could still
    become a marker."""
    before = marker(b"ready t=1") + marker(b"exec pid=30") + b"hello\r\nname? "
    after = b"@@vm\r\n@not a marker\r\n\r\n@@vmi" + marker(b"exit code=0")
    for size in (1, 3, 7, len(before) + len(after)):
        shown: list[bytes] = []
        keep = ConsoleFilter(shown.append)
        for part in (before, after):
            for i in range(0, len(part), size):
                keep(part[i : i + size])
            if part is before:
                assert b"".join(shown) == b"hello\r\nname? "  # the prompt, at once
        keep.flush()
        assert b"".join(shown) == b"hello\r\nname? @@vm\r\n@not a marker\r\n\r\n@@vmi\r\n"
    # A workload that ends its output with a newline keeps it; one that does not gets the
    # marker's (a line's newline is never held back: a reader waits for it).
    for workload, seen in ((b"one\r\n", b"one\r\n"), (b"one", b"one\r\n")):
        shown = []
        keep = ConsoleFilter(shown.append)
        keep(marker(b"ready t=1") + workload + marker(b"exit code=0"))
        keep.flush()
        assert b"".join(shown) == seen


def test_run_console_never_holds_a_finished_line() -> None:
    """A line reader (a CI log, `| while read`) gets each line when the guest ends it,
    not when the next one starts."""
    shown: list[bytes] = []
    keep = ConsoleFilter(shown.append)
    keep(marker(b"exec pid=30") + b"WAITING\r\n")
    assert b"".join(shown) == b"WAITING\r\n"


# -- 7. modes ----------------------------------------------------------------------------------


def modes(bundle: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(bundle.stat().st_mode)}
    for p in bundle.rglob("*"):
        out[str(p.relative_to(bundle))] = stat.S_IMODE(p.stat().st_mode)
    return out


def build_with_umask(
    sample_ref: str, work: Path, out: str, kernel: str, umask: int
) -> dict[str, int]:
    r = subprocess.run(
        confined_command("build", "-q", sample_ref, "-o", out, "--kernel", kernel),
        cwd=work / "cwd",
        env=confined_env(work),
        capture_output=True,
        text=True,
        umask=umask,
    )
    assert r.returncode == 0, r.stderr
    return modes(work / "cwd" / out)


@pytest.mark.parametrize("umask", [0o077, pytest.param(0o002, marks=pytest.mark.slow)])
def test_bundle_modes_follow_the_umask_built_or_cached(
    sample_ref: str, tmp_path: Path, debian_kernel: str, umask: int
) -> None:
    confined_env(tmp_path)  # makes cwd and home
    built = build_with_umask(sample_ref, tmp_path, "built", debian_kernel, umask)
    # The second build comes from the cache, which the first filled under another umask.
    other = 0o022 if umask != 0o022 else 0o077
    build_with_umask(sample_ref, tmp_path, "warm", debian_kernel, other)
    cached = build_with_umask(sample_ref, tmp_path, "cached", debian_kernel, umask)
    # Files nothing writes in place (the erofs root, the kernel, the manifest) are shared
    # with the cache by hardlink, read-only (see test_handout.py): the umask's mode less the
    # write bits. Everything else gets the umask's mode.
    read_only = {"rootfs.erofs", "kernel", "manifest"}
    for got in (built, cached):
        for name, mode in got.items():
            executable = name in (".", "launch") or name.endswith(".sh")
            want = (0o777 if executable else 0o666) & ~umask
            if name in read_only:
                want &= 0o555
            assert mode == want, (name, oct(mode))


@pytest.mark.parametrize(
    ("program", "package"),
    [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("/usr/bin/qemu-system-aarch64", "qemu-system-arm"),
    ],
)
def test_a_missing_qemu_names_the_package_for_its_arch(program: str, package: str) -> None:
    assert str(qemu_missing(program)) == f"{program} not found: install {package}"
