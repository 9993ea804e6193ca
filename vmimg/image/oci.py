"""OCI and Docker image models: descriptors, manifests, indexes, configs, platforms.

Only what vmimg needs, parsed strictly enough that a manifest that lies
(wrong media type, missing fields) is reported instead of half-used.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmimg.arch import Arch, oci_architecture
from vmimg.errors import PlatformError, SourceError

# Manifests, indexes and configs are small: refuse bigger ones (containerd's limit too).
MAX_DOCUMENT_BYTES = 4 << 20

# Manifest and index media types.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

# Layer media types, by compression. Non-distributable ("foreign") layers are
# accepted: they are ordinary layers that some registries may not serve.
_LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


def layer_compression(media_type: str) -> str:
    """'none', 'gzip' or 'zstd' as the media type says; SourceError if not a layer type."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise SourceError(f"unsupported layer media type {media_type!r}") from None


# What a platform that names no architecture is taken for.
DEFAULT_ARCHITECTURE = Arch.X86_64.oci
DEFAULT_PLATFORM = f"linux/{DEFAULT_ARCHITECTURE}"  # what --platform picks by default


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = DEFAULT_ARCHITECTURE
    variant: str = ""

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


# Normalisation as containerd's platforms package does it (the names: vmimg/arch.py).
_DEFAULT_VARIANT = {"arm": "v7"}


def normalize_platform(p: Platform) -> Platform:
    arch = oci_architecture(p.architecture)
    variant = p.variant.lower()
    if p.architecture.lower() == "armel" and not variant:
        variant = "v6"
    if arch == Arch.ARM64.oci and variant == "v8":
        variant = ""  # arm64 and arm64/v8 are the same platform
    variant = variant or _DEFAULT_VARIANT.get(arch, "")
    return Platform(p.os.lower(), arch, variant)


def parse_platform(text: str) -> Platform:
    """'linux/amd64', 'linux/arm/v7', 'arm64', 'x86_64' ..., normalised."""
    parts = text.split("/")
    if len(parts) == 1:
        return normalize_platform(Platform("linux", parts[0]))
    if len(parts) == 2:
        return normalize_platform(Platform(parts[0], parts[1]))
    if len(parts) == 3:
        return normalize_platform(Platform(parts[0], parts[1], parts[2]))
    raise PlatformError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")


def host_platform() -> Platform:
    return normalize_platform(Platform("linux", _platform.machine()))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    platform: Platform | None = None
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, d: Any, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise SourceError(f"{what}: descriptor is not an object")
        try:
            media_type = d["mediaType"]
            digest = d["digest"]
            size = d["size"]
        except KeyError as e:
            raise SourceError(f"{what}: descriptor lacks {e.args[0]!r}") from None
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or not isinstance(digest, str)
        ):
            raise SourceError(f"{what}: descriptor has an invalid size or digest")
        if not isinstance(media_type, str):
            raise SourceError(f"{what}: descriptor has an invalid mediaType")
        annotations = d.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(v, str) for v in annotations.values()
        ):
            raise SourceError(f"{what}: descriptor has invalid annotations")
        artifact_type = d.get("artifactType")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise SourceError(f"{what}: descriptor has an invalid artifactType")
        plat = None
        if isinstance(d.get("platform"), dict):
            pd = d["platform"]
            fields = [pd.get(k, "") for k in ("os", "architecture", "variant")]
            if not all(isinstance(f, str) for f in fields):
                raise SourceError(f"{what}: descriptor has an invalid platform")
            plat = Platform(*fields)
        return cls(media_type, digest, size, dict(annotations), plat, artifact_type)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform:
            out["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        return out


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{what} is not a JSON object")
    return obj


def sniff_media_type(obj: dict[str, Any], declared: str | None) -> str:
    """The media type of a manifest or index, checking the document against the declaration."""
    inner = obj.get("mediaType")
    kind = "index" if "manifests" in obj else "manifest" if "layers" in obj else None
    mt = declared or inner
    if not mt:
        mt = {"index": OCI_INDEX, "manifest": OCI_MANIFEST}.get(kind or "", "")
    if (
        inner
        and declared
        and inner != declared
        and declared not in ("application/json", "text/plain")
    ):
        raise SourceError(f"media type {declared!r} declared, but the document says {inner!r}")
    if mt in INDEX_TYPES and kind != "index":
        raise SourceError(f"document declared as {mt} has no 'manifests' list")
    if mt in MANIFEST_TYPES and kind != "manifest":
        raise SourceError(f"document declared as {mt} has no 'layers' list")
    if mt not in INDEX_TYPES + MANIFEST_TYPES:
        raise SourceError(f"unsupported manifest media type {mt!r}")
    return mt


def select_platform(index: dict[str, Any], want: Platform, where: str) -> Descriptor:
    """Pick the manifest for `want` from an index; error lists what there is."""
    found: list[Descriptor] = []
    for i, d in enumerate(index.get("manifests") or []):
        desc = Descriptor.from_json(d, f"{where} manifests[{i}]")
        if desc.media_type not in MANIFEST_TYPES:
            continue  # nested indexes and attestations are not images
        if desc.platform is None:
            continue
        if desc.platform.os == "unknown":
            continue  # buildkit attestation manifests
        found.append(desc)
        if normalize_platform(desc.platform) == want:
            return desc
    have = ", ".join(sorted({str(normalize_platform(d.platform)) for d in found if d.platform}))
    raise PlatformError(f"{where} has no image for {want} (it has: {have or 'none'})")


# The image config's "config" object, field by field, as the OCI image spec types it
# (and Docker's own image config adds). A JSON null is an absent field, as Go reads it;
# any other wrong type is refused: a string Entrypoint is not split into characters,
# nor guessed into one argument.
_STRING_FIELDS = ("User", "WorkingDir", "StopSignal", "Hostname", "Domainname")
_STRING_LIST_FIELDS = ("Cmd", "Entrypoint", "Shell", "OnBuild")
_OBJECT_FIELDS = ("ExposedPorts", "Volumes")
_PLATFORM_FIELDS = ("os", "architecture", "variant")


def _type_name(value: object) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    if isinstance(value, bool | str | list | dict):
        return names[type(value)]
    return "a number" if isinstance(value, int | float) else "null"


_ALL_FINE = object()


def _holding(value: list[Any] | dict[str, Any], item: type) -> str | None:
    """None if every item (or object value) is an `item`, else what the odd one is."""
    items = value if isinstance(value, list) else list(value.values())
    odd = next((v for v in items if not isinstance(v, item)), _ALL_FINE)
    return None if odd is _ALL_FINE else f"{_type_name(value)} holding {_type_name(odd)}"


def _string(value: object) -> str | None:
    return None if isinstance(value, str) else f"must be a string, not {_type_name(value)}"


def _container(value: object, kind: type, item: type, want: str) -> str | None:
    if not isinstance(value, kind):
        return f"must be {want}, not {_type_name(value)}"
    assert isinstance(value, list | dict)
    odd = _holding(value, item)
    return None if odd is None else f"must be {want}, not {odd}"


def _strings(value: object) -> str | None:
    return _container(value, list, str, "a list of strings")


def _env(value: object) -> str | None:
    problem = _strings(value)
    if problem is None:
        assert isinstance(value, list)
        bad = next((v for v in value if "=" not in v or v.startswith("=")), None)
        if bad is not None:
            return f"has {bad[:64]!r}, not KEY=VALUE"
    return problem


def _objects(value: object) -> str | None:
    return _container(value, dict, dict, "an object of objects")


def _labels(value: object) -> str | None:
    return _container(value, dict, str, "an object of strings")


_FIELD_CHECKS: dict[str, Callable[[object], str | None]] = {
    **dict.fromkeys(_STRING_FIELDS, _string),
    **dict.fromkeys(_STRING_LIST_FIELDS, _strings),
    **dict.fromkeys(_OBJECT_FIELDS, _objects),
    "Env": _env,
    "Labels": _labels,
}


def check_run_config(config: object, what: str) -> dict[str, Any]:
    """The "config" object of an image config, every field vmimg knows type-checked."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SourceError(f"{what}: config must be an object, not {_type_name(config)}")
    for name, value in config.items():
        if value is None:
            continue
        check = _FIELD_CHECKS.get(name)
        problem = check(value) if check is not None else None
        if problem is not None:
            raise SourceError(f"{what}: config.{name} {problem}")
    return config


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config vmimg uses, plus the raw document."""

    raw: dict[str, Any]
    diff_ids: list[str]
    platform: Platform

    @property
    def config(self) -> dict[str, Any]:
        """The run config (Entrypoint, Cmd, Env...), its null fields dropped."""
        c = self.raw.get("config")
        if not isinstance(c, dict):
            return {}
        return {k: v for k, v in c.items() if v is not None}

    @classmethod
    def parse(cls, data: bytes, what: str) -> ImageConfig:
        raw = load_json(data, what)
        rootfs = raw.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise SourceError(f"{what} has no rootfs.diff_ids")
        diff_ids = rootfs["diff_ids"]
        if not all(isinstance(d, str) for d in diff_ids):
            raise SourceError(f"{what} has an invalid diff_id")
        for name in _PLATFORM_FIELDS:
            if raw.get(name) is not None and not isinstance(raw[name], str):
                raise SourceError(f"{what}: {name} must be a string, not {_type_name(raw[name])}")
        check_run_config(raw.get("config"), what)
        plat = Platform(raw.get("os") or "linux", raw.get("architecture") or DEFAULT_ARCHITECTURE,
                        raw.get("variant") or "")  # fmt: skip
        return cls(raw, list(diff_ids), plat)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    raw: dict[str, Any]

    @classmethod
    def parse(cls, obj: dict[str, Any], media_type: str, what: str) -> Manifest:
        config = Descriptor.from_json(obj.get("config"), f"{what} config")
        raw_layers = obj.get("layers")
        if not isinstance(raw_layers, list):
            raise SourceError(f"{what} has no layers list")
        layers = [Descriptor.from_json(d, f"{what} layers[{i}]") for i, d in enumerate(raw_layers)]
        for layer in layers:
            layer_compression(layer.media_type)  # reject unknown layer types up front
        return cls(media_type, config, layers, obj)
