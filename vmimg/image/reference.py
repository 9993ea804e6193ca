"""Image references, named the way containers-transports(5) (skopeo) names them.

docker://HOST/REPO:TAG    docker://HOST/REPO@sha256:HEX    HOST/REPO:TAG (same)
oci:PATH[:TAG]            an OCI image layout directory
oci-archive:PATH[:TAG]    the same, as a tar file
docker-archive:PATH[:NAME[:TAG]]  a `docker save` / `podman save` tarball
docker-daemon:NAME[:TAG]  an image in a local Docker-API engine
dir:PATH                  skopeo's directory format (manifest.json, version, blobs by hex digest)
PATH                      an existing path, or one starting with /, ./ or ../: local (what it
                          holds decides: OCI layout, dir: image, vmimg bundle, archive file)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from vmimg.errors import ImageRefError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

# distribution/reference grammar, simplified to what matters for validation.
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")

TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "docker-daemon", "dir")
# What `vmimg ... --help` and errors show as the forms a SOURCE may take.
SUPPORTED_FORMS = (
    "docker://HOST/REPO:TAG, oci:DIR[:TAG], oci-archive:FILE[:TAG], "
    "docker-archive:FILE[:NAME:TAG], docker-daemon:NAME[:TAG], dir:DIR, or a local path"
)
# A local path, whatever exists there: the prefixes no image name can start with.
LOCAL_PREFIXES = ("/", "./", "../")
# A bundle directory is a local reference too (vmimg verify, run, inspect); no transport
# name, so that nothing mistakes it for an image.
BUNDLE = "bundle"
BUNDLE_FILE = "vm.json"
OCI_LAYOUT_FILES = ("index.json", "oci-layout")
DIR_FORMAT_FILES = ("manifest.json", "version")
# Per local transport: the files in its path (besides the path itself) that decide which
# image a reference names; blobs are named by their digests, so they cannot change it.
DECIDING_FILES = {
    "oci": ("index.json",),
    "oci-archive": (),
    "docker-archive": (),
    "dir": ("manifest.json",),
}
# "WORD:" that is not one of ours; a registry's HOST:PORT/ is not that.
_TRANSPORT_RE = re.compile(r"^([a-z][a-z0-9-]*):(.*)$", re.S)
_PORT_RE = re.compile(r"^\d+(/|$)")


@dataclass(frozen=True)
class RegistryRef:
    """A repository in a registry, with a tag or a digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes in /v2/<repo>/manifests/<reference>: the digest wins over the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> RegistryRef:
        return RegistryRef(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


@dataclass(frozen=True)
class ImageRef:
    """A parsed SOURCE argument: a transport and what it needs."""

    transport: str
    registry: RegistryRef | None = None
    path: str | None = None
    tag: str | None = None  # tag in an OCI layout, or NAME[:TAG] for docker-archive/daemon
    original: str = ""

    def __str__(self) -> str:
        return self.original or self.transport

    def deciding_files(self) -> tuple[str, ...] | None:
        """The local files whose state decides which image this names (DECIDING_FILES), or
        None when something else decides (a registry, a daemon). While they are unchanged,
        a past resolution still holds (cli/quick)."""
        names = DECIDING_FILES.get(self.transport)
        if names is None or self.path is None:
            return None
        return (self.path, *(os.path.join(self.path, n) for n in names))


def parse_registry_ref(text: str) -> RegistryRef:
    """Parse HOST/REPO[:TAG][@DIGEST], filling Docker's defaults for short names."""
    original = text
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise ImageRefError(f"invalid digest in reference {original!r}")
    tag = None
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ImageRefError(f"invalid tag in reference {original!r}")
    parts = text.split("/", 1)
    if len(parts) == 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, repo = parts
    else:
        registry, repo = DEFAULT_REGISTRY, text
        if "/" not in repo:
            repo = f"library/{repo}"
    if not repo or not _REPO_RE.match(repo):
        raise ImageRefError(f"invalid repository name in reference {original!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return RegistryRef(registry, repo, tag, digest)


def _split_path_tag(rest: str) -> tuple[str, str | None]:
    """PATH[:TAG] where the path itself may contain ':' but the tag has no '/'."""
    if ":" in rest:
        path, tag = rest.rsplit(":", 1)
        if tag and "/" not in tag and path:
            return path, tag
    return rest, None


def is_local(text: str) -> bool:
    """Whether `text` names a local path: it exists, or only a path can start so."""
    return text.startswith(LOCAL_PREFIXES) or text in (".", "..") or os.path.lexists(text)


def local_reference(text: str) -> ImageRef:
    """A local path as a reference; what it holds decides the transport. A missing path
    is an error at once (a typo must not become a registry lookup)."""
    if not os.path.lexists(text):
        raise ImageRefError(f"{text}: no such file or directory")
    if not os.path.isdir(text):
        # Both kinds of archive: docker-archive reads an OCI layout tar as well.
        return ImageRef("docker-archive", path=text, original=text)
    if os.path.isfile(os.path.join(text, BUNDLE_FILE)):
        return ImageRef(BUNDLE, path=text, original=text)
    if any(os.path.isfile(os.path.join(text, f)) for f in OCI_LAYOUT_FILES):
        return ImageRef("oci", path=text, original=text)
    if all(os.path.isfile(os.path.join(text, f)) for f in DIR_FORMAT_FILES):
        return ImageRef("dir", path=text, original=text)
    raise ImageRefError(
        f"{text}: a directory, but not an OCI layout (index.json), a dir: image "
        f"(manifest.json, version) or a vmimg bundle (vm.json)"
    )


def _unknown_transport(text: str) -> str | None:
    """The transport name of a `NAME:...` that is neither ours nor an image name
    (`busybox:1.36`) nor a registry with a port (`localhost:5000/app`); else None."""
    m = _TRANSPORT_RE.match(text)
    if m is None:
        return None
    name, rest = m.groups()
    if name in TRANSPORTS or _PORT_RE.match(rest):
        return None
    if name in OTHER_TRANSPORTS or not _TAG_RE.match(rest):
        return name
    return None


# containers-transports(5) names these too; vmimg does not read them.
OTHER_TRANSPORTS = ("containers-storage", "ostree", "sif", "tarball", "atomic")


def _split_archive_name(rest: str) -> tuple[str, str | None]:
    """docker-archive's PATH[:NAME[:TAG]]: the path ends at the first ':' (as skopeo
    reads it), unless the whole text is an existing file; a NAME without a tag is
    NAME:latest."""
    if os.path.isfile(rest) or ":" not in rest:
        return rest, None
    path, name = rest.split(":", 1)
    if not name:
        return path, None
    if ":" not in name.rsplit("/", 1)[-1]:
        name = f"{name}:{DEFAULT_TAG}"
    return path, name


def parse_reference(text: str) -> ImageRef:
    """Parse a SOURCE argument into an `ImageRef`; a clear error if it is malformed."""
    if not text:
        raise ImageRefError("empty image reference")
    if is_local(text):
        return local_reference(text)
    unknown = _unknown_transport(text)
    if unknown is not None:
        raise ImageRefError(f"unsupported transport {unknown}: in {text!r}; use {SUPPORTED_FORMS}")
    transport, sep, rest = text.partition(":")
    if sep and transport in TRANSPORTS:
        if transport == "docker":
            if not rest.startswith("//"):
                raise ImageRefError(f"docker transport needs docker://HOST/REPO: {text!r}")
            return ImageRef("docker", registry=parse_registry_ref(rest[2:]), original=text)
        if not rest:
            raise ImageRefError(f"{transport}: needs a path or name: {text!r}")
        if transport == "docker-daemon":
            name = rest if ":" in rest.rsplit("/", 1)[-1] else f"{rest}:{DEFAULT_TAG}"
            return ImageRef("docker-daemon", tag=name, original=text)
        if transport == "docker-archive":
            path, tag = _split_archive_name(rest)
        elif transport == "dir":
            path, tag = rest, None  # the format holds one image: no tag
        else:
            path, tag = _split_path_tag(rest)
        return ImageRef(transport, path=path, tag=tag, original=text)
    # A bare reference means the registry, as it does for docker pull.
    return ImageRef("docker", registry=parse_registry_ref(text), original=text)
