"""Reference parsing, as skopeo's transports name images."""

from __future__ import annotations

import pytest

from vmimg.errors import ImageRefError, PlatformError
from vmimg.image.oci import Platform, parse_platform
from vmimg.image.reference import parse_reference


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest"),
    [
        ("docker://localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", None),
        ("localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", None),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None),
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("quay.io/org/app@sha256:" + "a" * 64, "quay.io", "org/app", None, "sha256:" + "a" * 64),
    ],
)
def test_registry_references(
    text: str, registry: str, repo: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref.transport == "docker" and ref.registry is not None
    assert (ref.registry.registry, ref.registry.repository) == (registry, repo)
    assert (ref.registry.tag, ref.registry.digest) == (tag, digest)


def test_other_transports() -> None:
    assert parse_reference("oci:/some/dir:v2").path == "/some/dir"
    assert parse_reference("oci:/some/dir:v2").tag == "v2"
    assert parse_reference("oci:/some/dir").tag is None
    assert parse_reference("oci-archive:/x.tar").transport == "oci-archive"
    assert parse_reference("docker-archive:/x.tar").path == "/x.tar"
    assert parse_reference("docker-daemon:app").tag == "app:latest"
    assert parse_reference("docker-daemon:localhost/app:v1").tag == "localhost/app:v1"


@pytest.mark.parametrize("bad", ["", "docker:no-slashes", "UPPER/Case", "a/b@sha256:short"])
def test_bad_references(bad: str) -> None:
    with pytest.raises(ImageRefError):
        parse_reference(bad)


def test_platform_normalisation() -> None:
    assert parse_platform("x86_64") == Platform("linux", "amd64")
    assert parse_platform("linux/aarch64") == Platform("linux", "arm64")
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64")
    assert parse_platform("linux/arm") == Platform("linux", "arm", "v7")
    with pytest.raises(PlatformError):
        parse_platform("a/b/c/d")
