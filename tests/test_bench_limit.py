"""bench.limit, the physical limit bench.run measures: it reads every layer of the image whole
(its sha256s are the layer's digest and diff_id) and writes the bytes it is told to.
bench.run's derived figures: rows vmimg / peer, memory growth per entry, limit, warm share."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from bench import limit, run
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_every_layer_is_read_whole_and_the_image_bytes_written(tmp_path: Path) -> None:
    lower = _tar({"a": os.urandom(300_000), "b": b"x" * 100_000})
    upper = _tar({"c": b"hello\n"})
    layout = str(tmp_path / "layout")
    write_layout(
        layout,
        {"latest": ImageSpec([LayerSpec(lower, "gzip"), LayerSpec(upper, "zstd")]),
         "gzip": ImageSpec([LayerSpec(lower, "gzip"), LayerSpec(upper, "gzip")])},
    )  # fmt: skip
    descs = limit.layers(layout, "latest")
    assert [d["mediaType"].rsplit("+", 1)[1] for d in descs] == ["gzip", "zstd"]
    for desc, plain in zip(descs, (lower, upper), strict=True):
        compressed_sha, plain_sha = limit.decompress_and_hash(layout, desc)
        assert "sha256:" + compressed_sha == desc["digest"]
        assert plain_sha == hashlib.sha256(plain).hexdigest()
    out = tmp_path / "out"
    assert limit.main([layout, "latest", str(5 * limit.CHUNK + 7), str(out)]) == 0
    assert out.stat().st_size == 5 * limit.CHUNK + 7
    # The peers get the all-gzip tag's blobs, in order; mke2fs a size that holds the layer.
    blobs = run.peer_layers(layout)
    assert [os.path.basename(b) for b in blobs] == [
        d["digest"].split(":")[1] for d in limit.layers(layout, "gzip")
    ]
    n, inodes, size = run.size_hint(blobs[0])
    assert n == "-N" and int(inodes) >= 2 and int(size.rstrip("k")) * 1024 > len(lower)


def _result(fixture: str, name: str, seconds: list[float], peak: float, size: int) -> run.Result:
    return run.Result(fixture, name, "x", seconds, [peak], size, size)


def test_derived_figures() -> None:
    results = [
        _result("minbase", run.COLD_EXT4, [2.0, 3.0, 2.5], 50, 100),
        _result("minbase", run.MKE2FS, [1.0, 1.2, 1.1], 20, 400),
        _result("minbase", run.COLD_LZ4HC, [4.0], 60, 102),
        _result("minbase", run.MKFS_EROFS_LZ4HC, [5.0], 30, 100),
        _result("minbase", run.LIMIT, [1.0, 0.9, 1.1], 22, 0),
        _result("minbase", "vmimg ext4 (warm)", [0.1, 0.125, 0.2], 30, 100),
        _result("smallfiles", run.COLD_EROFS, [7.0], 100.0, 0),
        _result("smallfiles400k", run.COLD_EROFS, [28.0], 400.0, 0),
    ]
    rows = run.rows(results)
    assert [(r["work"], round(r["ratio"], 3)) for r in rows] == [
        ("Debian minbase, 2 layers -> ext4", round(2.5 / 1.1, 3)),
        ("Debian minbase -> erofs lz4hc", 0.8),
    ]
    assert rows[1]["compare_size"] and rows[1]["size_ratio"] == 1.02
    (mem,) = run.memory(results)
    assert mem["peak_mib"] == [100.0, 400.0]
    assert mem["growth_kib_per_entry"] == 300 * 1024 / 300_000
    assert run.limit(results)["ratio"] == 2.5
    (warm,) = run.warm(results)
    assert warm["percent"] == 5.0 and warm["fmt"] == "ext4"
    lines = run.ratios(results)
    assert lines[1].endswith("= 0.80x (size 1.020)")
    assert any("1.02 KiB per entry" in line for line in lines)
