"""Image documents of any JSON shape: index.json, a manifest, a config and a docker-archive's
manifest.json with one value swapped for another of any type. Opening the image and fetching
its layers either works or fails with one of vmimg's own errors (a one-line message), never
a TypeError or AttributeError from deep inside."""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import layerkit as L
from tests.hostile.corpus import put_blob, read_blob
from tests.hostile.shapes import IMAGE_KEYS, paths, swapped, values
from vmimg.errors import VmimgError
from vmimg.image.cache import Cache
from vmimg.image.fetch import fetch_layers
from vmimg.image.oci import Platform
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout
from vmimg.image.sources import SourceOptions, open_image

AMD64 = SourceOptions(Platform("linux", "amd64"))


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def base_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "layout"
    spec = ImageSpec(
        [LayerSpec(L.layer(L.file("a", b"1"))), LayerSpec(L.layer(L.file("b", b"2")))],
        config={"Cmd": ["/a"], "Env": ["X=1"]},
    )
    write_layout(str(root), {"t": spec})
    return root


def _open_and_fetch(ref: str, cache_dir: str) -> None:
    try:
        image = open_image(ref, Cache.open(cache_dir), AMD64)
        fetch_layers(image, Cache.open(cache_dir))
    except VmimgError as e:
        assert "\n" not in str(e), str(e)


SHAPES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SHAPES
@given(data=st.data())
def test_layout_documents_of_any_shape(base_layout: Path, data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["index", "manifest", "config"]))
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout"
        shutil.copytree(base_layout, layout)
        index = json.loads((layout / "index.json").read_bytes())
        manifest = json.loads(read_blob(layout, index["manifests"][0]["digest"]))
        config = json.loads(read_blob(layout, manifest["config"]["digest"]))
        doc = {"index": index, "manifest": manifest, "config": config}[which]
        path = data.draw(st.sampled_from(paths(doc)))
        doc = swapped(doc, path, data.draw(values(IMAGE_KEYS)))
        if which == "config":
            blob = _dumps(doc)
            manifest["config"].update(digest=put_blob(layout, blob), size=len(blob))
        if which in ("config", "manifest"):
            blob = _dumps(doc if which == "manifest" else manifest)
            index["manifests"][0].update(digest=put_blob(layout, blob), size=len(blob))
        (layout / "index.json").write_bytes(_dumps(doc if which == "index" else index))
        _open_and_fetch(f"oci:{layout}:t", str(Path(tmp) / "cache"))


@SHAPES
@given(data=st.data())
def test_docker_archive_manifest_of_any_shape(base_layout: Path, data: st.DataObject) -> None:
    index = json.loads((base_layout / "index.json").read_bytes())
    manifest = json.loads(read_blob(base_layout, index["manifests"][0]["digest"]))
    config_digest = manifest["config"]["digest"]
    entries = [
        {
            "Config": f"blobs/sha256/{config_digest[7:]}",
            "RepoTags": ["app:v1"],
            "Layers": [f"blobs/sha256/{d['digest'][7:]}" for d in manifest["layers"]],
        }
    ]
    path = data.draw(st.sampled_from(paths(entries)))
    entries = swapped(entries, path, data.draw(values(IMAGE_KEYS)))
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "image.tar"
        (Path(tmp) / "manifest.json").write_bytes(_dumps(entries))
        with tarfile.open(archive, "w") as tf:
            tf.add(Path(tmp) / "manifest.json", arcname="manifest.json")
            tf.add(base_layout / "blobs", arcname="blobs")
        _open_and_fetch(f"docker-archive:{archive}:app:v1", str(Path(tmp) / "cache"))
