"""Every transport resolves to the same image: registry, layouts, archives, daemon."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests import layerkit as L
from tests.conftest import need, podman, skopeo_copy
from vmimg.errors import DigestError, ImageRefError, LayerError, PlatformError, SourceError
from vmimg.image import unsynced
from vmimg.image.cache import Cache
from vmimg.image.fetch import fetch_layers
from vmimg.image.image import Image
from vmimg.image.oci import Platform, parse_platform
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout
from vmimg.image.sources import SourceOptions, open_image

AMD64 = SourceOptions(Platform("linux", "amd64"))


def tree_digest(image: Image, cache: Cache) -> list[str]:
    """The layer diff_ids after fetching them all (each verified on the way)."""
    layers = fetch_layers(image, cache)
    assert all(os.path.exists(layer.tar_path) for layer in layers)
    return image.diff_ids


@pytest.fixture(scope="module")
def two_platform_layout(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("multi") / "layout")
    amd = ImageSpec([LayerSpec(L.layer(L.file("arch", b"amd64")))], platform=Platform())
    arm = ImageSpec(
        [LayerSpec(L.layer(L.file("arch", b"arm64")))], platform=Platform("linux", "arm64")
    )
    write_layout(root, {"multi": [amd, arm], "single": amd})
    return root


def test_oci_layout_and_index_platforms(two_platform_layout: str, cache: Cache) -> None:
    amd = open_image(f"oci:{two_platform_layout}:multi", cache, AMD64)
    arm = open_image(
        f"oci:{two_platform_layout}:multi", cache, SourceOptions(parse_platform("aarch64"))
    )
    assert str(amd.platform) == "linux/amd64" and str(arm.platform) == "linux/arm64"
    assert amd.digest != arm.digest
    with pytest.raises(
        PlatformError,
        match=r"no image for linux/s390x \(it has: linux/amd64, "
        r"linux/arm64\)",
    ):
        open_image(
            f"oci:{two_platform_layout}:multi", cache, SourceOptions(parse_platform("linux/s390x"))
        )
    with pytest.raises(ImageRefError, match="no image tagged 'nope'"):
        open_image(f"oci:{two_platform_layout}:nope", cache, AMD64)


def test_oci_archive_reads_in_place(two_platform_layout: str, cache: Cache, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(two_platform_layout, arcname=".")
    direct = open_image(f"oci:{two_platform_layout}:single", cache, AMD64)
    from_tar = open_image(f"oci-archive:{archive}:single", cache, AMD64)
    assert from_tar.digest == direct.digest
    assert tree_digest(from_tar, cache) == direct.diff_ids


def test_registry_pull_then_no_blob_requests(
    sample_ref: str, registry: str, tmp_path: Path
) -> None:
    skopeo_copy(sample_ref, f"docker://{registry}/sample/busybox:v1")
    cache = Cache.open(str(tmp_path / "c"))
    image = open_image(f"docker://{registry}/sample/busybox:v1", cache, AMD64)
    fetch_layers(image, cache)
    local = open_image(sample_ref, cache, AMD64)
    assert image.digest == local.digest
    # By digest with everything cached: works with the registry gone (no request at all).
    by_digest = f"{registry}/sample/busybox@{image.digest}"
    offline = open_image(by_digest.replace(registry, "127.0.0.1:9"), cache, AMD64)
    offline_image_layers = fetch_layers(offline, cache)
    assert len(offline_image_layers) == 1


def test_registry_index_picks_each_platform(
    two_platform_layout: str, registry: str, tmp_path: Path
) -> None:
    """A multi-platform index in a registry: the platform's manifest comes from the
    manifests endpoint (registries do not serve manifests as blobs), as docs/arm64.md's
    `vmimg build --platform linux/arm64 docker://...` needs."""
    subprocess.run(
        [need("skopeo"), "copy", "--quiet", "--all", "--dest-tls-verify=false",
         f"oci:{two_platform_layout}:multi", f"docker://{registry}/multi/arch:v1"],
        check=True, capture_output=True,
    )  # fmt: skip
    cache = Cache.open(str(tmp_path / "c"))
    ref = f"docker://{registry}/multi/arch:v1"
    amd = open_image(ref, cache, AMD64)
    arm = open_image(ref, cache, SourceOptions(parse_platform("linux/arm64")))
    assert str(amd.platform) == "linux/amd64" and str(arm.platform) == "linux/arm64"
    local = open_image(f"oci:{two_platform_layout}:multi", cache, AMD64)
    assert amd.digest == local.digest
    assert tree_digest(arm, cache) == arm.diff_ids


def test_registry_errors_are_one_line_and_named(
    registry: str, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMIMG_REGISTRY_RETRIES", "1")
    # A missing image or tag is the reference's fault (exit 3), not the source's.
    with pytest.raises(ImageRefError, match=r"/missing/image:v1: no such image or tag"):
        open_image(f"docker://{registry}/missing/image:v1", cache, AMD64)
    with pytest.raises(SourceError, match=r"127\.0\.0\.1:9 refused the connection$"):
        open_image("docker://127.0.0.1:9/nothing/here:v1", cache, AMD64)


def test_docker_archive_from_podman_save(
    sample_ref: str, podman_socket: str, cache: Cache, tmp_path: Path
) -> None:
    archive = tmp_path / "saved.tar"
    skopeo_copy(sample_ref, f"docker-archive:{tmp_path / 'in.tar'}:vmimg/sample:v1")
    podman("load", "-i", str(tmp_path / "in.tar"))
    podman("save", "-o", str(archive), "vmimg/sample:v1")
    image = open_image(f"docker-archive:{archive}", cache, AMD64)
    local = open_image(sample_ref, cache, AMD64)
    assert image.diff_ids == local.diff_ids
    assert tree_digest(image, cache) == local.diff_ids


def test_docker_daemon_through_podman_api(
    sample_ref: str, podman_socket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    skopeo_copy(sample_ref, f"docker-archive:{tmp_path / 'in.tar'}:vmimg/daemon:v1")
    podman("load", "-i", str(tmp_path / "in.tar"))
    monkeypatch.setenv("DOCKER_HOST", podman_socket)
    cache = Cache.open(str(tmp_path / "c"))
    image = open_image("docker-daemon:vmimg/daemon:v1", cache, AMD64)
    local = open_image(sample_ref, cache, AMD64)
    assert tree_digest(image, cache) == local.diff_ids
    image.close()
    # Second time: config and layers cached, so no export happens at all.
    again = open_image("docker-daemon:vmimg/daemon:v1", cache, AMD64)
    assert again.layers[0].digest == "" and again.diff_ids == local.diff_ids
    again.close()
    # A cached layer from another boot whose bytes a crash lost: exported again.
    torn = cache.layer_path(local.diff_ids[-1])
    os.chmod(torn, 0o644)
    Path(torn).write_bytes(bytes(os.path.getsize(torn)))
    os.setxattr(torn, unsynced.MARK, b"00000000-0000-4000-8000-000000000000")
    third = open_image("docker-daemon:vmimg/daemon:v1", cache, AMD64)
    assert tree_digest(third, cache) == local.diff_ids
    assert os.getxattr(torn, unsynced.MARK) == unsynced.boot_id()  # unpacked anew
    with pytest.raises(ImageRefError, match="no such image"):
        open_image("docker-daemon:vmimg/absent:v1", cache, AMD64)


def _corrupt_blob(layout: str, digest: str, data: bytes) -> None:
    path = os.path.join(layout, "blobs", "sha256", digest.split(":")[1])
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(data)


def _layout(tmp_path: Path, *layers: LayerSpec) -> tuple[str, dict[str, object]]:
    root = str(tmp_path / "layout")
    write_layout(root, {"t": ImageSpec(list(layers))})
    index = json.loads(Path(root, "index.json").read_text())
    manifest = json.loads(
        Path(root, "blobs", "sha256", index["manifests"][0]["digest"].split(":")[1]).read_text()
    )
    return root, manifest


def test_layer_digest_mismatch(tmp_path: Path, cache: Cache) -> None:
    root, manifest = _layout(tmp_path, LayerSpec(L.layer(L.file("f", b"x" * 1000))))
    digest = manifest["layers"][0]["digest"]  # type: ignore[index]
    blob = Path(root, "blobs", "sha256", digest.split(":")[1]).read_bytes()
    _corrupt_blob(root, digest, blob[:-1] + bytes([blob[-1] ^ 1]))
    image = open_image(f"oci:{root}:t", cache, AMD64)
    with pytest.raises((DigestError, LayerError), match=digest):
        fetch_layers(image, cache)
    assert os.listdir(os.path.join(cache.root, "tmp")) == []
    assert not os.path.exists(cache.layer_path(image.diff_ids[0]))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_layers(tmp_path: Path, cache: Cache, compression: str) -> None:
    data = L.layer(L.file("f", os.urandom(200_000)))
    root, manifest = _layout(tmp_path, LayerSpec(data, compression))
    layer = manifest["layers"][0]  # type: ignore[index]
    blob = Path(root, "blobs", "sha256", layer["digest"].split(":")[1]).read_bytes()
    _corrupt_blob(root, layer["digest"], blob[: len(blob) // 2])
    image = open_image(f"oci:{root}:t", cache, AMD64)
    with pytest.raises(LayerError, match=f"layer {layer['digest']}: truncated {compression}"):
        fetch_layers(image, cache)


def test_unknown_media_type_and_lying_manifest(tmp_path: Path, cache: Cache) -> None:
    root, _ = _layout(
        tmp_path, LayerSpec(L.layer(L.file("f")), media_type="application/x-something")
    )
    with pytest.raises(SourceError, match="unsupported layer media type 'application/x-something'"):
        open_image(f"oci:{root}:t", cache, AMD64)


def test_gzip_bomb_limit(tmp_path: Path) -> None:
    root, _manifest = _layout(tmp_path, LayerSpec(L.layer(L.file("zeros", bytes(5 << 20)))))
    cache = Cache.open(str(tmp_path / "cache"), max_unpacked_size=1 << 20)
    image = open_image(f"oci:{root}:t", cache, AMD64)
    with pytest.raises(LayerError, match="expands the image past --max-unpacked-size 1 MiB"):
        fetch_layers(image, cache)


def test_concurrent_processes_share_the_cache(sample_ref: str, tmp_path: Path) -> None:
    """Four processes fetch the same layers into one cache: all succeed, one copy results."""
    cache_dir = tmp_path / "shared"
    script = (
        "import sys; from vmimg.image.cache import Cache;"
        "from vmimg.image.fetch import fetch_layers;"
        "from vmimg.image.sources import SourceOptions, open_image;"
        "from vmimg.image.oci import Platform;"
        "c = Cache.open(sys.argv[1]); i = open_image(sys.argv[2], c, SourceOptions(Platform()));"
        "print(fetch_layers(i, c)[0].tar_path)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(cache_dir), sample_ref],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    paths = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    assert os.listdir(cache_dir / "tmp") == []


# -- dir: (skopeo's directory format) and docker-archive:FILE:NAME:TAG ---------------------


def test_dir_transport_single_and_multi_platform(
    two_platform_layout: str, sample_ref: str, cache: Cache, tmp_path: Path
) -> None:
    single = tmp_path / "single"
    skopeo_copy(sample_ref, f"dir:{single}")
    assert (single / "version").read_text().startswith("Directory Transport Version: 1.")
    image = open_image(f"dir:{single}", cache, AMD64)
    local = open_image(sample_ref, cache, AMD64)
    assert (image.digest, image.diff_ids) == (local.digest, local.diff_ids)
    assert tree_digest(image, cache) == local.diff_ids
    # The same directory named as a plain path is recognised by what it holds.
    assert open_image(str(single), cache, AMD64).digest == local.digest

    multi = tmp_path / "multi"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--all", f"oci:{two_platform_layout}:multi", f"dir:{multi}"],
        check=True,
        capture_output=True,
    )
    for arch in ("amd64", "arm64"):
        want = SourceOptions(Platform("linux", arch))
        got = open_image(f"dir:{multi}", cache, want)
        ref = open_image(f"oci:{two_platform_layout}:multi", cache, want)
        assert (got.digest, got.diff_ids) == (ref.digest, ref.diff_ids)
        assert str(got.platform) == f"linux/{arch}"


def test_dir_transport_refuses_what_is_not_one(cache: Cache, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{}")
    with pytest.raises(SourceError, match="version"):
        open_image(f"dir:{tmp_path / 'd'}", cache, AMD64)
    with pytest.raises(ImageRefError, match="no such directory"):
        open_image(f"dir:{tmp_path / 'none'}", cache, AMD64)


def test_docker_archive_with_name_and_tag(sample_ref: str, cache: Cache, tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    skopeo_copy(sample_ref, f"docker-archive:{archive}:vmimg/app:v1")
    local = open_image(sample_ref, cache, AMD64)
    named = open_image(f"docker-archive:{archive}:vmimg/app:v1", cache, AMD64)
    assert named.diff_ids == local.diff_ids
    with pytest.raises(ImageRefError, match="no image named 'vmimg/app:v2'"):
        open_image(f"docker-archive:{archive}:vmimg/app:v2", cache, AMD64)


@pytest.mark.parametrize(
    ("entries", "tag", "error", "message"),
    [
        (
            [["x"], 5, {"RepoTags": 7}, {"RepoTags": [["a"], 3]}],
            "a",
            ImageRefError,
            "no image named 'a:latest' in the archive",
        ),
        (["ab"], None, SourceError, "manifest.json entry 0 is not an object"),
        ([{"RepoTags": "a:1"}, 7], None, ImageRefError, r"holds several images; name one \(\)"),
        # the tagged entry is found past the malformed one; its own fault is named
        ([7, {"RepoTags": ["a:1"]}], "a:1", SourceError, "entry lacks Config or Layers"),
    ],
)
def test_docker_archive_manifest_entries_of_the_wrong_type(
    entries: list[object], tag: str | None, error: type[Exception], message: str,
    cache: Cache, tmp_path: Path,
) -> None:  # fmt: skip
    """Entries, and their RepoTags, of any JSON type: a one-line error, never a traceback."""
    archive = tmp_path / "hostile.tar"
    data = json.dumps(entries).encode()
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    ref = f"docker-archive:{archive}" + (f":{tag}" if tag else "")
    with pytest.raises(error, match=message):
        open_image(ref, cache, AMD64)
