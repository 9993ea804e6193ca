"""JSON documents with one value swapped for a value of any type, for the tests that
feed vmimg's parsers every shape a hostile document could take."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# The keys image documents use, so that swapped-in objects are read, not ignored.
IMAGE_KEYS = [
    "mediaType", "digest", "size", "annotations", "platform", "manifests", "layers", "config",
    "schemaVersion", "os", "architecture", "variant", "rootfs", "diff_ids", "type", "Env",
    "Cmd", "Entrypoint", "User", "WorkingDir", "Config", "Layers", "RepoTags", "urls",
    "org.opencontainers.image.ref.name",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["sha256:" + "0" * 64, "linux", "amd64", "layers", ""])
)


def values(keys: list[str]) -> st.SearchStrategy[Any]:
    """Any JSON value, its objects keyed by `keys`."""
    return st.recursive(
        SCALARS,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(keys), inner, max_size=4)
        ),
        max_leaves=6,
    )


def keys_of(doc: Any) -> list[str]:
    """Every object key in `doc`, sorted."""
    if isinstance(doc, dict):
        return sorted({*doc, *(k for v in doc.values() for k in keys_of(v))})
    if isinstance(doc, list):
        return sorted({k for v in doc for k in keys_of(v)})
    return []


Where = tuple[str | int, ...]


def paths(doc: Any, here: Where = ()) -> list[Where]:
    """Every place in `doc` a value sits (the root excluded)."""
    out: list[Where] = []
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        out.append((*here, key))
        out += paths(value, (*here, key))
    return out


def swapped(doc: Any, path: Where, value: Any) -> Any:
    """A copy of `doc` with `value` at `path`."""
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc
