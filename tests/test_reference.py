"""Reference parsing, as skopeo's transports name images."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmimg.arch import Arch, oci_architecture
from vmimg.errors import ImageRefError, PlatformError
from vmimg.image.oci import Platform, parse_platform
from vmimg.image.reference import BUNDLE, parse_reference


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
    assert parse_platform("linux/ARMHF") == Platform("linux", "arm", "v7")
    assert parse_platform("linux/x86-64") == Platform("linux", "amd64")
    with pytest.raises(PlatformError):
        parse_platform("a/b/c/d")


@pytest.mark.parametrize(
    ("arch", "names", "elf", "image", "qemu"),
    [
        (Arch.X86_64, ("x86_64", "amd64", "x86-64", "X86_64"), 62, "bzImage", "qemu-system-x86_64"),
        (Arch.ARM64, ("arm64", "aarch64", "ARM64"), 183, "Image", "qemu-system-aarch64"),
    ],
)
def test_one_arch_vocabulary(
    arch: Arch, names: tuple[str, ...], elf: int, image: str, qemu: str
) -> None:
    """Every spelling of an architecture, and what each outside vocabulary calls it."""
    assert all(Arch.parse(name) is arch for name in names)
    assert Arch.from_kernel(arch.value) is arch and Arch.from_oci(arch.oci) is arch
    assert Arch.from_kernel(arch.oci if arch is Arch.X86_64 else arch.gnu) is None
    assert Arch.from_elf_machine(elf) is arch and arch.elf_machine == elf
    assert (arch.kernel_image, arch.qemu) == (image, qemu)
    assert arch.cross_prefix == f"{arch.gnu}-linux-gnu-"
    assert oci_architecture(arch.gnu) == arch.oci
    assert Arch.parse("riscv64") is None and oci_architecture("RISCV64") == "riscv64"


def test_local_paths_are_local_and_a_missing_one_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for typo in ("./bundel", "../bundel", "/nonexistent/bundle"):
        with pytest.raises(ImageRefError, match=f"{typo}: no such file or directory"):
            parse_reference(typo)
    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "index.json").write_text("{}")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "vm.json").write_text("{}")
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "manifest.json").write_text("{}")
    (tmp_path / "copied" / "version").write_text("Directory Transport Version: 1.1\n")
    (tmp_path / "saved.tar").write_bytes(b"")
    assert parse_reference("layout").transport == "oci"  # exists: local, not docker.io
    assert parse_reference("./layout").path == "./layout"
    assert parse_reference("bundle").transport == BUNDLE
    assert parse_reference(str(tmp_path / "copied")).transport == "dir"
    assert parse_reference("saved.tar").transport == "docker-archive"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageRefError, match="not an OCI layout"):
        parse_reference("./empty")


@pytest.mark.parametrize("text", ["containers-storage:x", "foo:", "ostree:/repo", "sif:x.sif"])
def test_unknown_transports_fail_at_once_listing_ours(text: str) -> None:
    with pytest.raises(ImageRefError, match=r"unsupported transport .*docker://.*dir:DIR"):
        parse_reference(text)


def test_names_with_a_colon_that_are_images() -> None:
    # An image name and tag, and a registry with a port: never taken for transports.
    assert parse_reference("busybox:1.36").registry.tag == "1.36"  # type: ignore[union-attr]
    assert parse_reference("localhost:5000/app").registry.registry == "localhost:5000"  # type: ignore[union-attr]
    assert parse_reference("myhost:5000/a/b:v1").registry.repository == "a/b"  # type: ignore[union-attr]


def test_dir_and_docker_archive_names() -> None:
    assert parse_reference("dir:/some/dir").path == "/some/dir"
    ref = parse_reference("docker-archive:/x.tar:vmimg/app:v1")
    assert (ref.path, ref.tag) == ("/x.tar", "vmimg/app:v1")
    assert parse_reference("docker-archive:/x.tar:app").tag == "app:latest"
    assert parse_reference("docker-archive:/x.tar").tag is None
