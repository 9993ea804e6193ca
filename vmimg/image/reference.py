"""Image references, named the way containers-transports(5) (skopeo) names them.

docker://HOST/REPO:TAG    docker://HOST/REPO@sha256:HEX    HOST/REPO:TAG (same)
oci:PATH[:TAG]            an OCI image layout directory
oci-archive:PATH[:TAG]    the same, as a tar file
docker-archive:PATH[:REF] a `docker save` / `podman save` tarball
docker-daemon:NAME[:TAG]  an image in a local Docker-API engine
"""

from __future__ import annotations

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

TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "docker-daemon")


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


def parse_reference(text: str) -> ImageRef:
    """Parse a SOURCE argument into an `ImageRef`; a clear error if it is malformed."""
    if not text:
        raise ImageRefError("empty image reference")
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
        path, tag = _split_path_tag(rest)
        return ImageRef(transport, path=path, tag=tag, original=text)
    # A bare reference means the registry, as it does for docker pull.
    return ImageRef("docker", registry=parse_registry_ref(text), original=text)
