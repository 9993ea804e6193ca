"""vmimg's own Dockerfile, built for real and taken apart by vmimg.

`podman build` of the repository's Dockerfile on the local debian:bookworm-slim, then
`vmimg rootfs docker-daemon:... --format tar`, extracted, and vmimg run inside it with
chroot: the image holds a working vmimg, and vmimg reads an image as big as its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need
from tests.e2e.conftest import Examples
from tests.e2e.images import REPO
from vmimg import __version__

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

SELF_REF = "localhost/vmimg-self:e2e"


def secret_args() -> tuple[str, ...]:
    """The host's CA bundle as the Dockerfile's build secret: where a TLS-intercepting proxy
    stands between this machine and PyPI, the build's pip must trust what the host trusts."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        path = os.environ.get(var)
        if path and os.path.isfile(path):
            return ("--secret", f"id=ca-certificates,src={path}")
    return ()


# Building the guest kernel into the image takes about ten minutes on two cores; the
# kernel build has its own tests, so this one leaves it to the first `vmimg build`.
BUILD_ARGS = ("--build-arg", "PREBUILD_KERNEL=0", *secret_args())


def _on_path(root: Path, name: str, path_var: str) -> str:
    """Where `name` is on the image's PATH, as a path inside the image."""
    for d in path_var.split(":"):
        candidate = f"{d.rstrip('/')}/{name}"
        if os.path.lexists(root / candidate.lstrip("/")):
            return candidate
    raise AssertionError(f"{name} is not on the image's PATH {path_var}")


def test_vmimg_image_holds_a_working_vmimg(examples: Examples, tmp_path: Path) -> None:
    if not (REPO / "Dockerfile").exists():
        pytest.fail("the repository has no Dockerfile")
    examples.podman.build(REPO, SELF_REF, *BUILD_ARGS, layers=False)

    r = examples.vmimg("inspect", f"docker-daemon:{SELF_REF}", "--json")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)["config"]
    assert config["Entrypoint"] == ["vmimg"]
    env = dict(e.split("=", 1) for e in config["Env"])

    rootfs_tar = tmp_path / "rootfs.tar"
    r = examples.vmimg("rootfs", f"docker-daemon:{SELF_REF}", "--format", "tar",
                       "-o", str(rootfs_tar))  # fmt: skip
    assert r.returncode == 0, r.stderr
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run([need("tar"), "-xpf", str(rootfs_tar), "-C", str(root), "--numeric-owner"],
                   check=True)  # fmt: skip

    vmimg = _on_path(root, "vmimg", env["PATH"])
    chroot_env = {"PATH": env["PATH"], "LANG": env.get("LANG", "C.UTF-8"), "HOME": "/root",
                  "VMIMG_CACHE": "/tmp/vmimg-cache"}  # fmt: skip

    def in_image(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([need("chroot"), str(root), *args], capture_output=True,
                              text=True, env=chroot_env, timeout=600, check=False)  # fmt: skip

    version = in_image(vmimg, "--version")
    assert version.returncode == 0, version.stderr
    assert __version__ in version.stdout
    assert version.stdout == examples.vmimg("--version").stdout  # the vmimg of this tree

    # More than --version: the image's vmimg writes the sample and converts it to erofs,
    # and the host's fsck.erofs accepts the result.
    sample = in_image(vmimg, "sample", "/tmp/sample")
    assert sample.returncode == 0, sample.stderr
    erofs = in_image(vmimg, "rootfs", sample.stdout.strip(), "--format", "erofs",
                     "-o", "/tmp/sample.erofs")  # fmt: skip
    assert erofs.returncode == 0, erofs.stderr
    fsck = subprocess.run([need("fsck.erofs"), str(root / "tmp" / "sample.erofs")],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    shutil.rmtree(root)  # a gigabyte or so; do not keep it in pytest's tmp dirs
