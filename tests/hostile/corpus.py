"""The hostile-image corpus: each case builds an image and states its exact outcome.

A case's `build` writes an OCI layout under a fresh directory and returns the
source reference. Its outcome is either `Fail` (the exit code and the exact
one-line message, as a template: {layer}, {digest} and {n} stand for a layer
name, a digest and a number) or `Ok` (the documented safe result: paths that
must hold given bytes, paths that must be absent, or a check of its own).
docs/security.md lists the same cases in prose.

Host paths that a broken extractor would create are all named
`vmimg-hostile-*`; the tests check that none appears anywhere on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import layerkit as L
from tests.zstdframes import block, frame_header, skippable
from vmimg.image.ocilayout import LAYER_MEDIA_TYPES, ImageSpec, LayerSpec, compress, write_layout

Builder = Callable[[Path], str]
Check = Callable[[Path, str], None]

FORMATS = ("tar", "ext4", "erofs")
HOST_MARKER = "vmimg-hostile"
TAG = "t"
ZERO_DIFF_ID = "sha256:" + "0" * 64  # for layers refused before their diff_id is checked
GZIP_TYPE = LAYER_MEDIA_TYPES["gzip"]
ZSTD_TYPE = LAYER_MEDIA_TYPES["zstd"]
TAR_TYPE = LAYER_MEDIA_TYPES["none"]
TB = 1 << 40
BOMB_MEMBER = 64 << 20  # zeros per compressed member of a bomb
BOMB_MEMBERS = 64  # 4 GiB claimed in all
BOMB_LIMIT = "256M"  # VMIMG_MAX_UNPACKED_SIZE for the bomb cases
WIDE_WINDOW = "(the frame's window is over 128 MiB, the most vmimg accepts)"  # zstd's refusal

_PLACEHOLDERS = {
    "{layer}": r"layer sha256:[0-9a-f]{64}",
    "{digest}": r"sha256:[0-9a-f]{64}",
    "{n}": r"\d+",
    "{any}": r".*",
}


def pattern(template: str) -> re.Pattern[str]:
    """A regex matching exactly `template`, its placeholders standing for what varies."""
    parts = re.split("(" + "|".join(re.escape(p) for p in _PLACEHOLDERS) + ")", template)
    return re.compile("".join(_PLACEHOLDERS.get(p, re.escape(p)) for p in parts))


@dataclass(frozen=True)
class Fail:
    code: int
    message: str  # template of the whole line after "vmimg: error: "


@dataclass(frozen=True)
class Ok:
    files: dict[bytes, bytes | None] = field(default_factory=dict)  # None: present, any type
    absent: tuple[bytes, ...] = ()
    check: Check | None = None  # replaces extraction when the output is not extractable


Outcome = Fail | Ok


@dataclass(frozen=True)
class Case:
    name: str
    build: Builder
    outcome: Outcome | dict[str, Outcome]  # one for every format, or one per format
    env: dict[str, str] = field(default_factory=dict)

    def outcomes(self, index: int) -> dict[str, Outcome]:
        """What to run: every format for a safe result or a per-format outcome; one
        format (rotating through them) for a failure that happens before any writer."""
        if isinstance(self.outcome, dict):
            return self.outcome
        if isinstance(self.outcome, Ok):
            return dict.fromkeys(FORMATS, self.outcome)
        return {FORMATS[index % len(FORMATS)]: self.outcome}


# -- building images ---------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def put_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest


def read_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


Edit = Callable[[dict[str, Any]], None]


def relink(
    layout: Path,
    config: Edit | None = None,
    manifest: Edit | None = None,
    entry: Edit | None = None,
) -> None:
    """Edit the config, the manifest and index.json's entry of a one-image layout,
    storing each edited document and pointing its parent at it."""
    index = json.loads((layout / "index.json").read_bytes())
    desc = index["manifests"][0]
    man = json.loads(read_blob(layout, desc["digest"]))
    if config is not None:
        cfg = json.loads(read_blob(layout, man["config"]["digest"]))
        config(cfg)
        data = _dumps(cfg)
        man["config"].update(digest=put_blob(layout, data), size=len(data))
    if manifest is not None:
        manifest(man)
    data = _dumps(man)
    desc.update(digest=put_blob(layout, data), size=len(data))
    if entry is not None:
        entry(desc)
    (layout / "index.json").write_bytes(_dumps(index))


def image(
    *layers: bytes | LayerSpec,
    config: dict[str, Any] | None = None,
    then: Callable[[Path], None] | None = None,
) -> Builder:
    """A one-image layout from layer tars (gzip unless a LayerSpec says otherwise)."""

    def build(root: Path) -> str:
        layout = root / "layout"
        specs = [x if isinstance(x, LayerSpec) else LayerSpec(x) for x in layers]
        write_layout(str(layout), {TAG: ImageSpec(specs, config=config or {})})
        if then is not None:
            then(layout)
        return f"oci:{layout}:{TAG}"

    return build


def raw_layer(blob: bytes, media_type: str, diff_id: str) -> Callable[[Path], None]:
    """A `then` step: the image's only layer becomes these exact blob bytes."""

    def edit(layout: Path) -> None:
        desc = {"mediaType": media_type, "digest": put_blob(layout, blob), "size": len(blob)}
        relink(
            layout,
            config=lambda c: c["rootfs"].update(diff_ids=[diff_id]),
            manifest=lambda m: m.update(layers=[desc]),
        )

    return edit


def one(*entries: L.E) -> Builder:
    return image(L.layer(*entries))


def tar_of(*members: tuple[tarfile.TarInfo, bytes], end: bool = True) -> bytes:
    """Hand-made tar bytes: headers as given (sizes may lie), data as given."""
    out = b""
    for info, data in members:
        # GNU's base-256 numbers hold sizes ustar's octal fields cannot
        big = info.size >= 1 << 33
        header = info.tobuf(tarfile.GNU_FORMAT if big else tarfile.PAX_FORMAT)
        out += header + data
        out += bytes(-len(out) % tarfile.BLOCKSIZE)
    return out + (bytes(2 * tarfile.BLOCKSIZE) if end else b"")


def info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.size, i.type, i.mtime = size, kind, L.DEFAULT_MTIME
    return i


def sparse_file(name: str, runs: list[tuple[int, bytes]], size: int, smap: str = "") -> L.E:
    """A GNU sparse 0.1 member: `runs` are (logical offset, bytes); `size` the logical size.
    `smap` replaces the map the runs make (to lie about them)."""
    smap = smap or ",".join(f"{off},{len(data)}" for off, data in runs)
    pax = {
        "GNU.sparse.major": "0",
        "GNU.sparse.minor": "1",
        "GNU.sparse.map": smap,
        "GNU.sparse.name": name,
        "GNU.sparse.size": str(size),
    }
    return L.file(name, b"".join(d for _o, d in runs), pax=pax)


def bomb(kind: str) -> bytes:
    """4 GiB of tar (a header, then zeros) in a few MiB: copies of one compressed
    member, which is still a valid gzip or zstd stream."""
    head = tar_of((info("zeros", BOMB_MEMBER * BOMB_MEMBERS), b""), end=False)
    member = compress(bytes(BOMB_MEMBER), kind)
    return compress(head, kind) + member * BOMB_MEMBERS


def gzip_layer(tar: bytes, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """A `then` step: layer 0 becomes `edit(gzip(tar))`, its diff_id that of `tar`."""
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    return raw_layer(edit(compress(tar, "gzip")), GZIP_TYPE, diff_id)


def zstd_layer(tar: bytes, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    return raw_layer(edit(compress(tar, "zstd")), ZSTD_TYPE, diff_id)


def skipped_around(blob: bytes) -> bytes:
    return skippable(b"before") + blob + skippable(b"", 15)


def flip_middle(blob: bytes) -> bytes:
    mid = len(blob) // 2
    return blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1 :]


def half(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


# -- edits of a valid image ----------------------------------------------------------


def corrupt_layer_blob(layout: Path) -> None:
    """The blob's bytes change; the manifest still names the old digest."""
    man = json.loads(
        read_blob(
            layout, json.loads((layout / "index.json").read_bytes())["manifests"][0]["digest"]
        )
    )
    path = layout / "blobs" / "sha256" / man["layers"][0]["digest"][7:]
    path.write_bytes(flip_middle(path.read_bytes()))


def lie_layer_size(layout: Path) -> None:
    relink(layout, manifest=lambda m: m["layers"][0].update(size=m["layers"][0]["size"] - 10))


def lie_diff_id(layout: Path) -> None:
    relink(layout, config=lambda c: c["rootfs"]["diff_ids"].__setitem__(0, ZERO_DIFF_ID))


def lie_config_digest(layout: Path) -> None:
    """The manifest names a config digest; the blob stored under it is another document."""

    def man(m: dict[str, Any]) -> None:
        real = read_blob(layout, m["config"]["digest"])
        (layout / "blobs" / "sha256" / ZERO_DIFF_ID[7:]).write_bytes(real)
        m["config"].update(digest=ZERO_DIFF_ID)

    relink(layout, manifest=man)


def lie_config_size(layout: Path) -> None:
    relink(layout, manifest=lambda m: m["config"].update(size=5 << 20))


def index_says_index(layout: Path) -> None:
    relink(layout, entry=lambda e: e.update(mediaType="application/vnd.oci.image.index.v1+json"))


def manifest_says_index(layout: Path) -> None:
    relink(layout, manifest=lambda m: m.update(mediaType="application/vnd.oci.image.index.v1+json"))


def layer_type(media_type: str) -> Callable[[Path], None]:
    return lambda layout: relink(
        layout, manifest=lambda m: m["layers"][0].update(mediaType=media_type)
    )


def traversal_digest(layout: Path) -> None:
    relink(layout, entry=lambda e: e.update(digest="sha256:../../../../../../etc/shadow"))


def not_json_manifest(layout: Path) -> None:
    data = b"{ this is not json"
    relink(layout, entry=lambda e: e.update(digest=put_blob(layout, data), size=len(data)))


def config_edit(edit: Edit) -> Callable[[Path], None]:
    return lambda layout: relink(layout, config=edit)


def platform_index(root: Path) -> str:
    layout = root / "layout"
    from vmimg.image.oci import Platform

    arm = ImageSpec([LayerSpec(L.layer(L.file("f")))], platform=Platform("linux", "arm64"))
    s390 = ImageSpec([LayerSpec(L.layer(L.file("f")))], platform=Platform("linux", "s390x"))
    write_layout(str(layout), {TAG: [arm, s390]})
    return f"oci:{layout}:{TAG}"


def untagged_two_images(root: Path) -> str:
    """Two tagged images without platforms, named by no tag."""
    layout = root / "layout"
    one_file = ImageSpec([LayerSpec(L.layer(L.file("f")))])
    write_layout(str(layout), {"a": one_file, "b": one_file})
    return f"oci:{layout}"


def index_entries(entries: Any) -> Callable[[Path], None]:
    """A `then` step: index.json's manifests become `entries`."""

    def edit(layout: Path) -> None:
        index = json.loads((layout / "index.json").read_bytes())
        (layout / "index.json").write_bytes(_dumps({**index, "manifests": entries}))

    return edit


def many_layers(count: int) -> Builder:
    tars = [L.layer(L.file(f"layer/{i:04d}", b"%d" % i)) for i in range(count)]
    return image(*[LayerSpec(t, "none") for t in tars])


def deep_path(depth: int) -> str:
    return "/".join(f"d{i}" for i in range(depth)) + "/bottom"


# A path of exactly PATH_MAX (4096) bytes: legal. One byte more is refused.
PATH_4096 = "/".join(["n" * 255] * 15 + ["m" * 200, "f" * 55])
NAME_3839 = "/".join(["s" * 255] * 15)  # a symlink target: 15 directories deep


def check_path_4096(out: Path, fmt: str) -> None:
    """The 4096-byte path is in the image with its bytes. No host tool extracts a path
    that long under a directory, so each format's reader looks it up in place."""
    want = b"at PATH_MAX"
    if fmt == "tar":
        with tarfile.open(out) as tf:
            f = tf.extractfile(PATH_4096)
            assert f is not None and f.read() == want
    elif fmt == "ext4":
        cat = subprocess.run(["debugfs", "-R", f"cat /{PATH_4096}", str(out)], capture_output=True)
        assert cat.stdout == want, cat.stderr[-200:]
    else:
        # dump.erofs cannot show an inode whose path is 4096 bytes (its buffer holds 4096
        # with the NUL): its directory's listing names it, a regular file, and fsck reads it.
        subprocess.run(["fsck.erofs", str(out)], check=True, capture_output=True)
        parent, _, leaf = PATH_4096.rpartition("/")
        ls = subprocess.run(
            ["dump.erofs", "--ls", f"--path=/{parent}", str(out)], capture_output=True, text=True
        )
        assert re.search(rf"^\s*\d+\s+1\s+{leaf}$", ls.stdout, re.M), ls.stdout[-300:]


# -- safe-result checks ------------------------------------------------------------------


def check_sparse_terabyte(out: Path, fmt: str) -> None:
    """The 1 TB file stays a hole: the image is small on disk whatever its claimed size."""
    assert out.stat().st_blocks * 512 < 64 << 20, f"{fmt}: {out.stat().st_blocks * 512} bytes"
    if fmt == "tar":
        listing = os.popen(f"tar -tvf {out}").read()
        assert str(TB) in listing


CAP = b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
LONG255 = "n" * 255
LONG256 = "n" * 256

CASES: list[Case] = [
    # -- paths that try to leave the root
    Case(
        "dotdot",
        one(L.file(f"../../../../tmp/{HOST_MARKER}-dotdot", b"x")),
        Fail(
            5,
            "{layer}: entry '../../../../tmp/vmimg-hostile-dotdot': path leaves the root: "
            "'../../../../tmp/vmimg-hostile-dotdot'",
        ),
    ),
    Case(
        "dotdot-inside",
        one(L.dir("a"), L.file(f"a/../../{HOST_MARKER}-inside", b"x")),
        Fail(
            5,
            "{layer}: entry 'a/../../vmimg-hostile-inside': path leaves the root: "
            "'a/../../vmimg-hostile-inside'",
        ),
    ),
    Case(
        "absolute-path",
        one(L.file(f"/tmp/{HOST_MARKER}-abs", b"absolute")),
        Ok({f"/tmp/{HOST_MARKER}-abs".encode(): b"absolute"}),
    ),
    Case(
        "symlink-out-then-write-through",
        one(
            L.symlink("escape", "/../../../../tmp"),
            L.file(f"escape/{HOST_MARKER}-through", b"stays inside"),
        ),
        Ok({f"/tmp/{HOST_MARKER}-through".encode(): b"stays inside", b"/escape": None}),
    ),
    Case(
        "relative-symlink-out-then-write-through",
        one(
            L.dir("a/b"),
            L.symlink("a/b/up", "../../../../.."),
            L.file(f"a/b/up/{HOST_MARKER}-rel", b"r"),
        ),
        Ok({f"/{HOST_MARKER}-rel".encode(): b"r"}),
    ),
    Case(
        "symlink-out-in-lower-write-in-upper",
        image(
            L.layer(L.dir("etc"), L.symlink("config", "../../../../../../etc")),
            L.layer(L.file(f"config/{HOST_MARKER}-passwd", b"inside")),
        ),
        Ok({f"/etc/{HOST_MARKER}-passwd".encode(): b"inside"}),
    ),
    Case(
        "symlink-loop-in-parent",
        one(L.symlink("a", "b"), L.symlink("b", "a"), L.file("a/x", b"x")),
        Fail(5, "{layer}: entry 'a/x': too many levels of symbolic links"),
    ),
    # -- hardlinks
    Case(
        "hardlink-to-host-shadow",
        one(L.hardlink("shadow", "/etc/shadow")),
        Fail(5, "{layer}: entry 'shadow': hardlink to missing '/etc/shadow'"),
    ),
    Case(
        "hardlink-dotdot",
        one(L.hardlink("shadow", "../../../../etc/shadow")),
        Fail(5, "{layer}: entry 'shadow': path leaves the root: '../../../../etc/shadow'"),
    ),
    Case(
        "hardlink-through-symlink-out",
        one(L.symlink("hostetc", "/etc"), L.hardlink("s", "hostetc/shadow")),
        Fail(5, "{layer}: entry 's': hardlink to missing 'hostetc/shadow'"),
    ),
    Case(
        "hardlink-to-missing",
        one(L.hardlink("x", "nothing/here")),
        Fail(5, "{layer}: entry 'x': hardlink to missing 'nothing/here'"),
    ),
    Case(
        "hardlink-to-directory",
        one(L.dir("d"), L.hardlink("h", "d")),
        Fail(5, "{layer}: entry 'h': hardlink to directory 'd'"),
    ),
    Case(
        "hardlink-to-image-shadow",
        one(L.file("etc/shadow", b"image's own"), L.hardlink("copy", "/etc/shadow")),
        Ok({b"/copy": b"image's own", b"/etc/shadow": b"image's own"}),
    ),
    # -- whiteouts
    Case(
        "whiteout-dotdot",
        one(L.file(".wh..."), L.file("f")),
        Fail(5, "{layer}: entry '.wh...': invalid whiteout"),
    ),
    Case(
        "whiteout-dot",
        one(L.file("etc/.wh..")),
        Fail(5, "{layer}: entry 'etc/.wh..': invalid whiteout"),
    ),
    Case("whiteout-bare", one(L.file(".wh.")), Fail(5, "{layer}: entry '.wh.': invalid whiteout")),
    Case(
        "whiteout-of-root",
        one(L.file("/.wh.")),
        Fail(5, "{layer}: entry '/.wh.': invalid whiteout"),
    ),
    Case(
        "whiteout-leaving-root",
        one(L.file("../.wh.etc")),
        Fail(5, "{layer}: entry '../.wh.etc': path leaves the root: '../.wh.etc'"),
    ),
    Case(
        "opaque-root",
        image(
            L.layer(L.file("lower", b"l")), L.layer(L.file(".wh..wh..opq"), L.file("upper", b"u"))
        ),
        Ok({b"/upper": b"u"}, absent=(b"/lower",)),
    ),
    Case(
        "whiteout-through-symlink-out",
        image(
            L.layer(L.file("etc/passwd", b"image"), L.symlink("hostetc", "/../etc")),
            L.layer(L.whiteout("hostetc/passwd")),
        ),
        Ok({b"/hostetc": None}, absent=(b"/etc/passwd",)),
    ),
    Case(
        "whiteout-of-nothing",
        one(L.whiteout("no/such/thing"), L.file("f", b"f")),
        Ok({b"/f": b"f"}, absent=(b"/no",)),
    ),
    # -- duplicates and type changes
    Case(
        "duplicate-entries",
        one(L.file("dup", b"first"), L.dir("dup"), L.file("dup", b"last wins")),
        Ok({b"/dup": b"last wins"}),
    ),
    Case(
        "dir-file-dir",
        image(
            L.layer(L.file("d/child", b"c")),
            L.layer(L.file("d", b"now a file")),
            L.layer(L.file("d/new", b"a dir again")),
        ),
        Ok({b"/d/new": b"a dir again"}, absent=(b"/d/child",)),
    ),
    Case(
        "file-then-child-same-layer",
        one(L.file("x", b"file"), L.file("x/y", b"child")),
        Ok({b"/x/y": b"child"}),
    ),
    # -- names
    Case(
        "name-256-bytes",
        one(L.file(LONG256, b"x")),
        Fail(5, "{layer}: entry '" + LONG256 + "': a name longer than 255 bytes"),
    ),
    Case(
        "name-255-bytes", one(L.file(f"d/{LONG255}", b"ok")), Ok({f"/d/{LONG255}".encode(): b"ok"})
    ),
    Case(
        "invalid-utf8-name",
        one(L.file("bad\udcff\udcfe", b"bytes")),
        Ok({b"/bad\xff\xfe": b"bytes"}),
    ),
    Case(
        "nul-in-pax-path",
        one(L.file("a", b"x", pax={"path": "evil\x00/etc/shadow"})),
        Fail(5, "{layer}: entry 'evil\\x00/etc/shadow': NUL byte in a name"),
    ),
    Case(
        "nul-in-pax-linkpath",
        one(L.symlink("s", "t", pax={"linkpath": "/etc/shadow\x00"})),
        Fail(5, "{layer}: entry 's': NUL byte in a name"),
    ),
    Case(
        "nul-in-xattr-name",
        one(L.file("f", b"", pax={"SCHILY.xattr.user.a\x00b": "v"})),
        Fail(5, "{layer}: entry 'f': invalid xattr name b'user.a\\x00b'"),
    ),
    Case(
        "symlink-target-4096-bytes",
        one(L.symlink("s", "t" * 4096)),
        Fail(5, "{layer}: entry 's': symlink target longer than 4095 bytes"),
    ),
    Case(
        "empty-symlink",
        one(L.symlink("s", "")),
        Fail(5, "{layer}: entry 's': symlink with an empty target"),
    ),
    Case(
        "deep-path",
        one(L.file(deep_path(300), b"deep")),
        Ok({b"/" + deep_path(300).encode(): b"deep"}),
    ),
    Case(
        "path-40000-directories-deep",
        one(L.file("d/" * 40_000 + "f", b"x")),
        Fail(
            5,
            "{layer}: entry '" + "d/" * 150 + "'... (80001 bytes): path longer than 4096 bytes",
        ),
    ),
    Case(
        "path-4097-bytes",
        one(L.file(PATH_4096 + "f", b"x")),
        Fail(
            5,
            "{layer}: entry '" + PATH_4096[:300] + "'... (4097 bytes): path longer than 4096 bytes",
        ),
    ),
    Case("path-4096-bytes", one(L.file(PATH_4096, b"at PATH_MAX")), Ok(check=check_path_4096)),
    Case(
        "path-past-path-max-through-symlink",
        one(L.symlink("s", NAME_3839), L.file("s/" + "y" * 255 + "/f", b"x")),
        Fail(5, "{layer}: entry 's/" + "y" * 255 + "/f': path longer than 4096 bytes"),
    ),
    # -- sizes and header fields
    Case(
        "sparse-terabyte",
        one(sparse_file("big", [(0, b"head"), (TB - 4, b"tail")], TB)),
        Ok(check=check_sparse_terabyte),
    ),
    Case(
        "sparse-map-claims-terabyte-of-data",
        one(sparse_file("big", [(0, b"x")], TB, smap=f"0,{TB}")),
        Fail(
            5,
            "{layer}: entry 'big': claims 1099511627776 bytes of data; the layer ends before that",
        ),
    ),
    Case(
        "sparse-map-overlapping-runs",
        one(sparse_file("s", [(10, b"abc"), (5, b"abc")], 20)),
        Fail(5, "{layer}: entry 's': sparse map run (5, 3) overlaps or leaves the file"),
    ),
    Case(
        "sparse-map-not-numbers",
        one(
            L.file(
                "s",
                b"",
                pax={
                    "GNU.sparse.major": "0",
                    "GNU.sparse.minor": "1",
                    "GNU.sparse.map": "0,x",
                    "GNU.sparse.size": "9",
                },
            )
        ),
        Fail(5, "{layer}: invalid tar: invalid literal for int() with base 10: 'x'"),
    ),
    Case(
        "size-larger-than-stream",
        image(tar_of((info("big", 1 << 30), b"only this"), end=False)),
        Fail(
            5, "{layer}: entry 'big': claims 1073741824 bytes of data; the layer ends before that"
        ),
    ),
    Case(
        "terabyte-pax-header",
        image(tar_of((info("././@PaxHeader", TB, tarfile.XHDTYPE), b""))),
        Fail(5, "{layer}: invalid tar: extended header of 1099511627776 bytes (more than 1048576)"),
    ),
    Case(
        "terabyte-gnu-long-name",
        image(tar_of((info("././@LongLink", TB, tarfile.GNUTYPE_LONGNAME), b""))),
        Fail(5, "{layer}: invalid tar: extended header of 1099511627776 bytes (more than 1048576)"),
    ),
    Case(
        "corrupt-second-header",
        image(L.layer(L.file("a", b"a"))[:1024] + b"\xff" * 512 + bytes(1024)),
        Fail(5, "{layer}: invalid tar header at offset {n}"),
    ),
    Case(
        "not-a-tar",
        image(LayerSpec(bytes(range(256)) * 8, "none")),
        Fail(5, "{layer}: invalid tar: invalid header"),
    ),
    Case(
        "xattr-100k",
        one(L.file("f", b"", pax={"SCHILY.xattr.user.big": "v" * 100_000})),
        Fail(5, "{layer}: entry 'f': xattr b'user.big' of 100000 bytes (Linux's limit is 65536)"),
    ),
    Case(
        "xattr-60k",
        one(L.file("f", b"x", pax={"SCHILY.xattr.user.big": "v" * 60_000})),
        {
            "tar": Ok({b"/f": b"x"}),
            "ext4": Fail(7, "/f: xattrs do not fit in one 4 KiB block"),
            "erofs": Ok({b"/f": b"x"}),
        },
    ),
    Case(
        "uid-2-to-the-40",
        one(L.file("f", b"", pax={"uid": str(1 << 40)})),
        Fail(5, "{layer}: entry 'f': uid/gid 1099511627776:0 outside 0..4294967295"),
    ),
    Case(
        "mtime-beyond-64-bits",
        one(L.file("f", b"far", pax={"mtime": "9" * 30}), L.file("g", b"g")),
        Ok({b"/f": b"far", b"/g": b"g"}),
    ),
    Case(
        "mtime-5000-digits",
        one(L.file("f", b"far", pax={"mtime": "-" + "9" * 5000})),
        Ok({b"/f": b"far"}),
    ),
    Case(
        "mtime-not-a-number",
        one(L.file("f", b"", pax={"mtime": "nan"})),
        Fail(5, "{layer}: entry 'f': invalid PAX mtime 'nan'"),
    ),
    Case(
        "mtime-before-1970",
        one(L.file("old", b"1960", mtime=-315_619_200)),
        Ok({b"/old": b"1960"}),
    ),
    # -- compression
    Case(
        "gzip-bomb",
        image(then=raw_layer(bomb("gzip"), GZIP_TYPE, ZERO_DIFF_ID)),
        Fail(5, "{layer}: expands the image past --max-unpacked-size 256 MiB; refusing it"),
        env={"VMIMG_MAX_UNPACKED_SIZE": BOMB_LIMIT},
    ),
    Case(
        "zstd-bomb",
        image(then=raw_layer(bomb("zstd"), ZSTD_TYPE, ZERO_DIFF_ID)),
        Fail(5, "{layer}: expands the image past --max-unpacked-size 256 MiB; refusing it"),
        env={"VMIMG_MAX_UNPACKED_SIZE": BOMB_LIMIT},
    ),
    Case(
        "gzip-truncated",
        image(then=gzip_layer(L.layer(L.file("f", os.urandom(100_000))), half)),
        Fail(5, "{layer}: truncated gzip stream"),
    ),
    Case(
        "gzip-corrupted",
        image(then=gzip_layer(L.layer(L.file("f", b"abc" * 50_000)), flip_middle)),
        Fail(5, "{layer}: corrupt gzip data: {any}"),
    ),
    Case(
        "gzip-trailing-garbage",
        image(then=gzip_layer(L.layer(L.file("f", b"abc")), lambda b: b + b"garbage!")),
        Fail(5, "{layer}: data after the end of the gzip stream"),
    ),
    Case(
        "zstd-truncated",
        image(then=zstd_layer(L.layer(L.file("f", os.urandom(100_000))), half)),
        Fail(5, "{layer}: truncated zstd stream"),
    ),
    Case(
        "zstd-corrupted",
        # zstd frames without a checksum decode the flipped byte: the diff_id catches it
        image(then=zstd_layer(L.layer(L.file("f", b"abc" * 50_000)), flip_middle)),
        Fail(4, "{layer} (uncompressed): digest {digest} does not match the expected {digest}"),
    ),
    Case(
        "zstd-bad-frame-header",
        image(then=zstd_layer(L.layer(L.file("f", b"abc")), lambda b: b[:4] + b"\xff" + b[5:])),
        Fail(5, "{layer}: corrupt zstd data: {any}"),
    ),
    Case(
        "zstd-trailing-garbage",
        image(then=zstd_layer(L.layer(L.file("f", b"abc")), lambda b: b + b"garbage!")),
        Fail(5, "{layer}: data after the end of the zstd stream"),
    ),
    Case(
        "zstd-window-too-large",
        # a frame that asks for a 256 MiB window (zstd --long=28 writes such frames)
        image(
            then=raw_layer(frame_header(28) + block(0, 1, b"x", last=True), ZSTD_TYPE, ZERO_DIFF_ID)
        ),
        Fail(
            5,
            "{layer}: corrupt zstd data: Frame requires too much memory for decoding "
            + WIDE_WINDOW,
        ),
    ),
    Case(
        "zstd-skippable-frames",
        # skippable frames before and after the frame: skipped, as zstd -d skips them
        image(then=zstd_layer(L.layer(L.file("f", b"skipped around")), skipped_around)),
        Ok({b"/f": b"skipped around"}),
    ),
    # -- digests, sizes and lying documents
    Case(
        "layer-digest-mismatch",
        image(LayerSpec(L.layer(L.file("f", b"x" * 5000)), "none"), then=corrupt_layer_blob),
        Fail(4, "{layer}: digest {digest} does not match the expected {digest}"),
    ),
    Case(
        "layer-size-lie",
        image(L.layer(L.file("f", b"x" * 5000)), then=lie_layer_size),
        Fail(4, "{layer}: blob is larger than its descriptor's size {n}"),
    ),
    Case(
        "diff-id-mismatch",
        image(L.layer(L.file("f", b"x")), then=lie_diff_id),
        Fail(4, "{layer} (uncompressed): digest {digest} does not match the expected {digest}"),
    ),
    Case(
        "config-digest-mismatch",
        image(L.layer(L.file("f", b"x")), then=lie_config_digest),
        Fail(
            4,
            "config "
            + ZERO_DIFF_ID
            + ": digest {digest} does not match the expected "
            + ZERO_DIFF_ID,
        ),
    ),
    Case(
        "config-size-claim",
        image(L.layer(L.file("f", b"x")), then=lie_config_size),
        Fail(4, "config {digest} claims 5242880 bytes; refusing"),
    ),
    Case(
        "index-entry-says-index",
        image(L.layer(L.file("f")), then=index_says_index),
        Fail(
            4,
            "media type 'application/vnd.oci.image.index.v1+json' declared, but the document "
            "says 'application/vnd.oci.image.manifest.v1+json'",
        ),
    ),
    Case(
        "manifest-says-index",
        image(L.layer(L.file("f")), then=manifest_says_index),
        Fail(
            4,
            "media type 'application/vnd.oci.image.manifest.v1+json' declared, but the document "
            "says 'application/vnd.oci.image.index.v1+json'",
        ),
    ),
    Case(
        "layer-says-tar-is-gzip",
        image(LayerSpec(L.layer(L.file("f", b"sniffed")), "gzip", media_type=TAR_TYPE)),
        Ok({b"/f": b"sniffed"}),
    ),
    Case(
        "layer-says-gzip-is-zstd",
        image(LayerSpec(L.layer(L.file("f", b"sniffed")), "zstd", media_type=GZIP_TYPE)),
        Ok({b"/f": b"sniffed"}),
    ),
    Case(
        "layer-unknown-media-type",
        image(L.layer(L.file("f")), then=layer_type("application/x-evil")),
        Fail(4, "unsupported layer media type 'application/x-evil'"),
    ),
    Case(
        "digest-with-path-traversal",
        image(L.layer(L.file("f")), then=traversal_digest),
        Fail(4, "invalid digest 'sha256:../../../../../../etc/shadow'"),
    ),
    Case(
        "manifest-not-json",
        image(L.layer(L.file("f")), then=not_json_manifest),
        Fail(4, "manifest of oci:{any}:t is not valid JSON: {any}"),
    ),
    Case(
        "index-without-platform",
        platform_index,
        Fail(4, "oci:{any}:t has no image for linux/amd64 (it has: linux/arm64, linux/s390x)"),
    ),
    Case(
        "untagged-ref-to-several-images",
        untagged_two_images,
        Fail(
            4,
            "oci:{any} has no image for linux/amd64 (it has: none); its images are tagged a, b: "
            "name one, as oci:{any}:a",
        ),
    ),
    Case(
        "index-annotations-not-objects",
        image(L.layer(L.file("f")), then=index_entries([{"annotations": "x"}, [1], 7])),
        Fail(3, "oci:{any}:t: no image tagged 't'"),
    ),
    Case(
        "index-manifests-not-a-list",
        image(L.layer(L.file("f")), then=index_entries({"annotations": {}})),
        Fail(4, "oci:{any}:t index.json: manifests is not a list"),
    ),
    Case(
        "config-for-other-platform",
        image(L.layer(L.file("f")), then=config_edit(lambda c: c.update(architecture="arm64"))),
        Fail(4, "oci:{any}:t is for linux/arm64, not linux/amd64"),
    ),
    Case(
        "config-diff-ids-not-a-list",
        image(L.layer(L.file("f")), then=config_edit(lambda c: c.update(rootfs={"diff_ids": 5}))),
        Fail(4, "config {digest} has no rootfs.diff_ids"),
    ),
    Case(
        "config-huge-env",
        image(L.layer(L.file("f", b"config kept")), config={"Env": ["X=" + "e" * 1000] * 3000}),
        Ok({b"/f": b"config kept"}),
    ),
    Case(
        "config-nulls-are-absent-fields",
        image(
            L.layer(L.file("f", b"nulls")),
            config={"Cmd": None, "Entrypoint": None, "Env": None, "WorkingDir": None},
        ),
        Ok({b"/f": b"nulls"}),
    ),
    *(
        Case(
            f"config-{field.lower()}-{kind}",
            image(L.layer(L.file("f")), config={field: value}),
            Fail(4, "config {digest}: config." + field + " " + message),
        )
        for field, kind, value, message in [
            ("Entrypoint", "string", "/bin/sh -c", "must be a list of strings, not a string"),
            ("Cmd", "number", 42, "must be a list of strings, not a number"),
            (
                "Cmd",
                "list-of-lists",
                [["sh"]],
                "must be a list of strings, not a list holding a list",
            ),
            ("Env", "string", "A=1", "must be a list of strings, not a string"),
            ("Env", "no-equals", ["PATH"], "has 'PATH', not KEY=VALUE"),
            ("Env", "empty-key", ["=x"], "has '=x', not KEY=VALUE"),
            ("User", "object", {"a": [1]}, "must be a string, not an object"),
            ("User", "number", 0, "must be a string, not a number"),
            ("WorkingDir", "list", ["/"], "must be a string, not a list"),
            ("StopSignal", "number", 9, "must be a string, not a number"),
            ("ExposedPorts", "list", ["80/tcp"], "must be an object of objects, not a list"),
            ("Volumes", "string", "/data", "must be an object of objects, not a string"),
            (
                "Labels",
                "number-value",
                {"a": 1},
                "must be an object of strings, not an object holding a number",
            ),
        ]
    ),
    Case(
        "config-not-an-object",
        image(L.layer(L.file("f")), then=config_edit(lambda c: c.update(config=["sh"]))),
        Fail(4, "config {digest}: config must be an object, not a list"),
    ),
    Case(
        "500-layers",
        many_layers(500),
        Ok({b"/layer/0000": b"0", b"/layer/0499": b"499"}),
    ),
]
