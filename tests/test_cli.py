"""The command line as users meet it: outputs, JSON, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import layerkit as L
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout

VMIMG = [sys.executable, "-m", "vmimg"]


def vmimg(
    *args: str, cache: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "VMIMG_CACHE": str(cache), **(env or {})}
    return subprocess.run([*VMIMG, *args], capture_output=True, text=True, env=full_env)


def test_rootfs_tar_then_cached_identical(sample_ref: str, tmp_path: Path) -> None:
    out1, out2 = tmp_path / "a.tar", tmp_path / "b.tar"
    first = vmimg("rootfs", sample_ref, "-o", str(out1), "--json", cache=tmp_path / "c")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["cached"] is False and result["size"] == out1.stat().st_size
    second = vmimg("rootfs", sample_ref, "-o", str(out2), "--json", cache=tmp_path / "c")
    assert json.loads(second.stdout)["cached"] is True
    assert out1.read_bytes() == out2.read_bytes()
    third = vmimg(
        "rootfs", sample_ref, "-o", str(out2), "--no-cache", "--json", cache=tmp_path / "c"
    )
    assert json.loads(third.stdout)["cached"] is False
    assert out1.read_bytes() == out2.read_bytes()


def test_source_date_epoch_clamps_mtimes(sample_ref: str, tmp_path: Path) -> None:
    out = tmp_path / "a.tar"
    r = vmimg(
        "rootfs",
        sample_ref,
        "-o",
        str(out),
        cache=tmp_path / "c",
        env={"SOURCE_DATE_EPOCH": "1000"},
    )
    assert r.returncode == 0, r.stderr
    listing = subprocess.run(
        ["tar", "--full-time", "-tvf", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert "1970-01-01 00:16:40" in listing and "2023" not in listing


def test_inspect_json(sample_ref: str, tmp_path: Path) -> None:
    r = vmimg("inspect", sample_ref, "--json", cache=tmp_path / "c")
    info = json.loads(r.stdout)
    assert info["platform"] == "linux/amd64"
    assert info["config"]["Cmd"][0] == "/bin/sh"
    assert info["layers"][0]["mediaType"].endswith("tar+gzip")


def test_bad_layer_path_one_line_error_no_output(tmp_path: Path) -> None:
    root = str(tmp_path / "layout")
    bad = L.layer(L.file("ok", b"fine"), L.file("../../etc/evil", b"x"))
    digests = write_layout(root, {"bad": ImageSpec([LayerSpec(bad)])})
    assert digests
    out = tmp_path / "out" / "root.tar"
    out.parent.mkdir()
    r = vmimg("rootfs", f"oci:{root}:bad", "-o", str(out), "-q", cache=tmp_path / "c")
    assert r.returncode == 5
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("vmimg: error: layer sha256:")
    assert "entry '../../etc/evil': path leaves the root" in lines[0]
    assert os.listdir(out.parent) == []  # no partial output, no temporary left behind
    assert not Path("/etc/evil").exists()


@pytest.mark.parametrize(
    ("source", "code", "text"),
    [
        ("oci:/nonexistent/dir:tag", 3, "no such directory: /nonexistent/dir"),
        ("docker://Bad Name", 3, "invalid"),
        ("docker-archive:/nonexistent.tar", 3, "no such file: /nonexistent.tar"),
    ],
)
def test_reference_errors(tmp_path: Path, source: str, code: int, text: str) -> None:
    r = vmimg("rootfs", source, "-o", str(tmp_path / "x"), cache=tmp_path / "c")
    assert r.returncode == code
    assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_json_errors(tmp_path: Path) -> None:
    r = vmimg("inspect", "oci:/nonexistent:x", "--json", cache=tmp_path / "c")
    assert r.returncode == 3
    assert json.loads(r.stdout) == {"error": "no such directory: /nonexistent", "exit_code": 3}


def test_sample_command(tmp_path: Path) -> None:
    r = vmimg("sample", str(tmp_path / "s"), cache=tmp_path / "c")
    assert r.returncode == 0
    assert r.stdout.strip() == f"oci:{tmp_path / 's'}:latest"
