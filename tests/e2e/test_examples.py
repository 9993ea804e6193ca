"""From a Dockerfile to a verified, serving VM: the examples built with podman, booted by vmimg.

Each test goes the whole way a user goes: `podman build`, `vmimg build docker-daemon:...`
(or `docker-archive:` from `podman save`), then `vmimg verify` for a job or `vmimg run
--publish` for a service, asked over HTTP from the host and stopped with SIGTERM.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.e2e.conftest import Examples
from tests.e2e.images import EXAMPLES, VmimgRun, free_port, http_get, qemu_processes
from vmimg.bundle.format import read_vm_json

pytestmark = [pytest.mark.boot, pytest.mark.slow, pytest.mark.timeout(1200)]

HTTP_PORT = 8080  # what both services listen on in the guest
SIGTERM_EXIT = 128 + 15  # a workload that SIGTERM ends by default
EROFS_SUPERBLOCK = range(1024, 1024 + 128)  # offset and size of erofs's superblock


def _equal_outside(a: bytes, b: bytes, skip: range) -> bool:
    """Whether two byte strings are equal but for the bytes at offsets in `skip`."""
    va, vb = memoryview(a), memoryview(b)
    return (
        len(a) == len(b)
        and va[: skip.start] == vb[: skip.start]
        and va[skip.stop :] == vb[skip.stop :]
    )


def _verify(examples: Examples, bundle: Path, *args: str) -> tuple[int, dict[str, object]]:
    r = examples.vmimg("verify", str(bundle), "--json", *args)
    return r.returncode, json.loads(r.stdout)[0]


def _serve_and_stop(
    examples: Examples,
    bundle: Path,
    log_dir: Path,
    paths: tuple[str, ...] = ("/",),
    persist: bool = False,
) -> tuple[dict[str, str], int, str]:
    """Boot a service, GET `paths` from the host, SIGTERM it: (bodies, exit code, console)."""
    port = free_port()
    bodies = {}
    log_dir.mkdir(parents=True, exist_ok=True)
    extra = ("--persist",) if persist else ()
    log = log_dir / "console.log"
    with VmimgRun(bundle, port, HTTP_PORT, log, env=examples.env, extra=extra) as vm:
        first = vm.wait_for_http(paths[0])
        bodies[paths[0]] = first.body
        for path in paths[1:]:
            reply = http_get(port, path)
            assert reply.status == 200, (path, reply)
            bodies[path] = reply.body
        code = vm.stop()
        console = vm.console()
    assert qemu_processes(bundle) == []
    return bodies, code, console


def test_oneshot_job_exit_code(examples: Examples) -> None:
    """The job's exit code is the verdict, and verify holds it to --expect-exit."""
    source = f"docker-daemon:{examples.image('oneshot-job')}"
    bundle = examples.bundle(source)
    vm = read_vm_json(str(bundle)).doc
    assert vm["workload"]["argv"] == ["/usr/local/bin/job.sh"]
    assert "JOB_NAME=nightly-report" in vm["workload"]["env"]

    code, report = _verify(examples, bundle, "--expect-exit", "3")
    assert code == 0 and report["passed"] and report["exit_code"] == 3, report
    assert report["verify_result"] in ("ok", "verity") and report["stage"] == "exit"
    console = Path(str(report["console_log"])).read_text()
    assert "job nightly-report: 18 accounts" in console
    assert "not approved (set JOB_APPROVED=yes)" in console

    code, report = _verify(examples, bundle)  # expects 0: the job's 3 fails it
    assert code == 12 and not report["passed"]
    assert report["message"] == "exit code 3, expected 0"

    approved = examples.bundle(source, "-e", "JOB_APPROVED=yes")
    code, report = _verify(examples, approved)
    assert code == 0 and report["exit_code"] == 0, report

    run = examples.vmimg("run", str(bundle))  # `vmimg run` exits with the job's code
    assert run.returncode == 3, run.stdout[-2000:]
    assert "job nightly-report: not approved" in run.stdout


def test_http_service_from_docker_daemon(examples: Examples, tmp_path: Path) -> None:
    """USER, WORKDIR, ENV and ENTRYPOINT from the Dockerfile, seen from the host over HTTP."""
    bundle = examples.bundle(f"docker-daemon:{examples.image('http-service')}")
    workload = read_vm_json(str(bundle)).doc["workload"]
    assert workload["argv"] == ["python3", "/opt/app/server.py"]
    assert (workload["uid"], workload["gid"], workload["cwd"]) == (1000, 1000, "/srv/site")

    # The whole tree, file by file, then a smoke test as the image's user, in one boot.
    code, report = _verify(examples, bundle, "--deep", "--no-run", "--smoke",
                           "test $(id -un) = web && python3 -c 'import http.server'")  # fmt: skip
    assert code == 0 and report["verify_result"] == "ok" and report["smoke_code"] == 0, report

    bodies, exit_code, console = _serve_and_stop(examples, bundle, tmp_path, ("/", "/about.txt"))
    assert bodies["/"].splitlines() == [
        "greeting=hello from a container in a VM",
        "user=web uid=1000 gid=1000",
        "cwd=/srv/site",
        "home=/home/web",
    ]
    site = EXAMPLES / "http-service" / "site" / "about.txt"
    assert bodies["/about.txt"] == site.read_text()  # a file from the working directory
    assert "http-service: listening on 8080" in console
    assert "http-service: SIGTERM, stopping" in console
    assert exit_code == 0  # the service stopped cleanly, and vmimg run says so


def test_http_service_from_saved_archives(
    examples: Examples, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`podman save` output gives the very same root file system as the engine's API."""
    ref = examples.image("http-service")
    saved = tmp_path_factory.mktemp("saved")
    archive = examples.podman.save(ref, saved / "http-service.tar")
    oci = examples.podman.save(ref, saved / "http-service.oci.tar", fmt="oci-archive")
    from_daemon = examples.bundle(f"docker-daemon:{ref}")
    from_archive = examples.bundle(f"docker-archive:{archive}")
    from_oci = examples.bundle(f"oci-archive:{oci}")
    rootfs = (from_daemon / "rootfs.erofs").read_bytes()
    assert (from_archive / "rootfs.erofs").read_bytes() == rootfs
    # The same tree from an OCI archive; only the erofs UUID (and so the superblock
    # checksum) differs, as it derives from the source's digest, here the manifest's.
    assert (from_oci / "manifest").read_bytes() == (from_daemon / "manifest").read_bytes()
    oci_rootfs = (from_oci / "rootfs.erofs").read_bytes()
    assert _equal_outside(oci_rootfs, rootfs, EROFS_SUPERBLOCK)

    bodies, exit_code, _ = _serve_and_stop(examples, from_archive, tmp_path)
    assert "user=web uid=1000 gid=1000" in bodies["/"].splitlines()
    assert exit_code == 0


def test_counter_service_writes_through_the_overlay(examples: Examples, tmp_path: Path) -> None:
    """Writes under /var/lib/app work on the read-only erofs root (overlay) and are thrown
    away at power-off; on an ext4 root with `vmimg run --persist` they are kept."""
    source = f"docker-daemon:{examples.image('counter-service')}"
    erofs = examples.bundle(source)
    for boot in range(2):
        bodies, exit_code, console = _serve_and_stop(examples, erofs, tmp_path / f"erofs{boot}")
        assert bodies["/"] == "starts=1\nwritten-by=app\n"  # a fresh overlay every boot
        assert "@@vmimg@@" not in console  # the workload's output only (run -v shows markers)
        assert exit_code == SIGTERM_EXIT  # busybox httpd does not catch SIGTERM

    ext4 = examples.bundle(source, "--writable-root")
    for boot in (1, 2):
        bodies, exit_code, _ = _serve_and_stop(
            examples, ext4, tmp_path / f"ext4-{boot}", persist=True
        )
        assert bodies["/"] == f"starts={boot}\nwritten-by=app\n"
        assert exit_code == SIGTERM_EXIT


def test_run_reports_a_port_in_use(examples: Examples) -> None:
    """A published port that is taken stops the run before the guest starts, and says why."""
    bundle = examples.bundle(f"docker-daemon:{examples.image('http-service')}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = examples.vmimg("run", str(bundle), "--publish", f"{port}:{HTTP_PORT}", timeout=120)
    assert r.returncode == 10, r.stdout[-2000:] + r.stderr
    assert "vmimg: error: the VM did not start" in r.stderr
    assert f"Could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:{HTTP_PORT}'" in r.stderr
    assert qemu_processes(bundle) == []
