"""Multi-platform: one build for amd64 and arm64, one index pushed, each platform pulled back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need
from vmimg.bundle.format import read_vm_json
from vmimg.image.sample import write_sample

pytestmark = [pytest.mark.boot, pytest.mark.slow, pytest.mark.timeout(3600)]
PLATFORMS = "linux/amd64,linux/arm64"


def vmimg_user_cache(*args: str) -> subprocess.CompletedProcess[str]:
    """vmimg with the user's cache, where both guest kernels are built once per machine."""
    env = {k: v for k, v in os.environ.items() if k != "VMIMG_CACHE"}
    return subprocess.run(
        [sys.executable, "-m", "vmimg", *args], capture_output=True, text=True, env=env,
        timeout=3000,
    )  # fmt: skip


def test_build_push_index_and_pull_each_platform(registry: str, tmp_path: Path) -> None:
    ref = write_sample(str(tmp_path / "layout"), tuple(PLATFORMS.split(",")))
    target = f"{registry}/multi/sample:v1"
    r = vmimg_user_cache("build", ref, "-o", str(tmp_path / "out"), "--platform", PLATFORMS,
                         "--push", target, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [b["platform"] for b in result["bundles"]] == ["linux/amd64", "linux/arm64"]
    assert read_vm_json(str(tmp_path / "out" / "arm64")).doc["arch"] == "arm64"
    raw = subprocess.run(
        [need("skopeo"), "inspect", "--raw", "--tls-verify=false", f"docker://{target}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    index = json.loads(raw)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["artifactType"] == "application/vnd.vmimg.bundle.v1"
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    for plat, arch in (("linux/amd64", "x86_64"), ("linux/arm64", "arm64")):
        out = tmp_path / f"pulled-{arch}"
        r = vmimg_user_cache("pull", target, "-o", str(out), "--platform", plat)
        assert r.returncode == 0, r.stderr
        assert read_vm_json(str(out)).doc["arch"] == arch
        built = tmp_path / "out" / plat.split("/")[1]
        for name in ("vm.json", "kernel", "rootfs.erofs", "manifest"):
            assert (out / name).read_bytes() == (built / name).read_bytes(), name
    r = vmimg_user_cache("verify", target, "--platform", "linux/arm64", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)[0]["passed"]
