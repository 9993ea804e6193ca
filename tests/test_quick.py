"""The warm-hit fast path (cli/quick): a repeated `vmimg rootfs` is answered from its hit
record without loading the full command line, and only while everything that decided the
first answer still holds; anything else, including a hostile record, goes the full way."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.hostile.cli import TIME_LIMIT, confined_command, confined_env, run_vmimg
from vmimg import netstrings
from vmimg.cli.quick import RECORD_SUFFIX, HitRecord, split_output
from vmimg.image.reference import parse_reference
from vmimg.rootfs.handout import SEAL_MAGIC, SEAL_RECORD, entry_untouched

# Python's own import log (-X importtime): shows whether the full command line was loaded.
IMPORT_LOG = {"PYTHONPROFILEIMPORTTIME": "1"}
CLICK_IMPORTED = re.compile(r"^import time:.*\| +click$", re.M)
LINE = re.compile(r"^(?P<out>\S+): erofs, (?P<size>\d+) bytes, .* from cache \(hardlink\)$")


def _rootfs(work: Path, ref: str, out: Path, *extra: str) -> tuple[str, bool]:
    """Run `vmimg rootfs`; (its stdout, whether it took the fast path)."""
    r = run_vmimg(work, "rootfs", ref, "--format", "erofs", "-o", str(out), *extra, env=IMPORT_LOG)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, CLICK_IMPORTED.search(r.stderr) is None


def _hits(work: Path) -> list[Path]:
    return sorted((work / "cache" / "hits").glob(f"*{RECORD_SUFFIX}"))


def _copy_layout(ref: str, dest: Path) -> str:
    """A private copy of the sample layout (tests change it): its oci: reference."""
    src = Path(ref.removeprefix("oci:").rsplit(":", 1)[0])
    for path in src.rglob("*"):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return f"oci:{dest}:latest"


@pytest.fixture
def layout(sample_ref: str, tmp_path: Path) -> str:
    return _copy_layout(sample_ref, tmp_path / "layout")


# -- the output option, found without click ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["src", "-o", "x.img", "--format", "erofs"], (["src", "--format", "erofs"], "x.img")),
        (["src", "--output", "x.img"], (["src"], "x.img")),
        (["src", "--output=x.img"], (["src"], "x.img")),
        (["src", "-ox.img"], (["src"], "x.img")),
        (["src"], None),  # no output
        (["src", "-o"], None),  # no value
        (["src", "-o", "a", "-o", "b"], None),  # twice: which one click takes is click's call
        (["src", "--output="], None),
        (["src", "--", "-o", "x.img"], None),  # after --, "-o" is a name
    ],
)
def test_split_output_finds_exactly_one_output(
    args: list[str], expected: tuple[list[str], str] | None
) -> None:
    assert split_output(args) == expected


def test_only_local_sources_have_deciding_files(tmp_path: Path) -> None:
    assert parse_reference("docker://registry.example/app:1").deciding_files() is None
    assert parse_reference("docker-daemon:app:1").deciding_files() is None
    layout = tmp_path / "l"
    assert parse_reference(f"oci:{layout}:v1").deciding_files() == (
        str(layout),
        str(layout / "index.json"),
    )
    assert parse_reference(f"oci-archive:{tmp_path}/a.tar").deciding_files() == (
        f"{tmp_path}/a.tar",
    )


# -- served, and not served ----------------------------------------------------------------


def test_a_repeated_conversion_is_served_without_loading_the_command_line(
    layout: str, tmp_path: Path
) -> None:
    _out, fast = _rootfs(tmp_path, layout, tmp_path / "a.erofs")
    assert not fast and len(_hits(tmp_path)) == 1  # the first run converts and records
    _hits(tmp_path)[0].unlink()
    full, fast = _rootfs(tmp_path, layout, tmp_path / "a.erofs")
    assert not fast and len(_hits(tmp_path)) == 1  # a hit the full way records too
    quick, fast = _rootfs(tmp_path, layout, tmp_path / "b.erofs")
    assert fast, "the third run loaded click: the fast path did not serve it"
    m = LINE.match(quick.strip())
    assert m, quick
    assert m["out"] == str(tmp_path / "b.erofs")  # the output it was given, not the recorded one
    assert quick.replace("b.erofs", "a.erofs") == full  # the full command's line, exactly
    a, b = os.stat(tmp_path / "a.erofs"), os.stat(tmp_path / "b.erofs")
    assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)  # both are the cache entry, hardlinked
    assert int(m["size"]) == b.st_size and not b.st_mode & 0o222


def test_a_changed_source_is_not_served_from_the_record(layout: str, tmp_path: Path) -> None:
    for name in ("a", "b"):
        _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs")
    index = Path(layout.removeprefix("oci:").rsplit(":", 1)[0]) / "index.json"
    index.write_bytes(index.read_bytes())  # the same bytes, rewritten: its stamp moves
    _out, fast = _rootfs(tmp_path, layout, tmp_path / "c.erofs")
    assert not fast
    _out, fast = _rootfs(tmp_path, layout, tmp_path / "d.erofs")
    assert fast  # the full run recorded the new stamps


def test_a_touched_entry_is_not_handed_out_by_the_fast_path(layout: str, tmp_path: Path) -> None:
    for name in ("a", "b"):
        _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs")
    good = (tmp_path / "a.erofs").read_bytes()
    entry = tmp_path / "a.erofs"  # a name of the cache entry itself
    os.chmod(entry, 0o644)
    with open(entry, "r+b") as f:
        f.seek(2048)
        f.write(b"damage")
    out, fast = _rootfs(tmp_path, layout, tmp_path / "c.erofs")
    assert not fast and "from cache" not in out  # converted again
    assert (tmp_path / "c.erofs").read_bytes() == good


def test_prune_takes_the_records_with_the_entries(layout: str, tmp_path: Path) -> None:
    for name in ("a", "b"):
        _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs")
    assert _hits(tmp_path)
    r = run_vmimg(tmp_path, "cache", "prune")
    assert r.returncode == 0, r.stderr
    assert _hits(tmp_path) == []
    out, fast = _rootfs(tmp_path, layout, tmp_path / "c.erofs")
    assert not fast and "from cache" not in out


def test_no_cache_and_json_runs_are_never_served_by_the_fast_path(
    layout: str, tmp_path: Path
) -> None:
    for _ in range(3):
        out, fast = _rootfs(tmp_path, layout, tmp_path / "n.erofs", "--no-cache")
        assert not fast and "from cache" not in out
    for _ in range(3):
        out, fast = _rootfs(tmp_path, layout, tmp_path / "j.erofs", "--json")
        assert not fast and json.loads(out)["cached"] in (True, False)
    assert _hits(tmp_path) == []


def test_an_explicit_cache_directory_gets_no_record(layout: str, tmp_path: Path) -> None:
    other = tmp_path / "other-cache"
    for name in ("a", "b", "c"):
        _out, fast = _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs", "--cache", str(other))
        assert not fast
    assert _hits(tmp_path) == [] and list((other / "hits").glob(f"*{RECORD_SUFFIX}")) == []


def test_an_output_that_cannot_be_written_gets_the_full_command_s_error(
    layout: str, tmp_path: Path
) -> None:
    for name in ("a", "b"):
        _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs")
    (tmp_path / "adir").mkdir()
    r = run_vmimg(tmp_path, "rootfs", layout, "--format", "erofs", "-o", str(tmp_path / "adir"))
    assert r.returncode == 2 and "is a directory." in r.stderr, r.stderr
    assert list((tmp_path / "adir").iterdir()) == []


# -- hostile records -----------------------------------------------------------------------


def _record(work: Path) -> tuple[Path, HitRecord]:
    """The one hit record in `work`'s cache, and what it says."""
    (path,) = _hits(work)
    fields = netstrings.read_file(str(path))
    assert fields is not None
    record = HitRecord.from_fields(fields)
    assert record is not None
    return path, record


def _forge(work: Path, change: dict[str, str] | None, raw: bytes | None = None) -> None:
    """Replace the record's bytes (`raw`), or some of its fields by their position in
    to_fields (keys are field indexes, as text, or "+" to add fields)."""
    path, record = _record(work)
    if raw is not None:
        path.write_bytes(raw)
        return
    fields = record.to_fields()
    for where, value in (change or {}).items():
        if where == "+":
            fields.append(value)
        else:
            fields[int(where)] = value
    path.write_text(netstrings.pack(fields))


@pytest.mark.parametrize(
    "forgery",
    [
        {"raw": b"\xff not a record"},
        {"raw": b""},
        {"raw": b"11:vmimg-hit 3,;"},  # the magic alone
        {"raw": b"99999999:vmimg-hit 3,;"},  # a length running past the end
        {"raw": b"-1:x,;"},
        {"raw": b"11:vmimg-hit 3,"},  # cut short: no end mark
        {"change": {"0": "vmimg-hit 2"}},  # another version's
        {"change": {"+": "/etc/hostname"}},  # a path without its stamp
        {"change": {"10": "1 2 yes"}},  # a stamp that is not numbers
        {"change": {"10": "\u0661 2 3 4 5"}},  # digits, but not ASCII ones
        {"change": {"3": "../../../../etc/passwd"}},
        {"change": {"3": ".sealed"}},
        {"change": {"4": "maybe"}},  # linkable
        {"change": {"1": "another command line"}},  # another record in the same place
    ],
)
def test_a_damaged_record_sends_the_run_the_full_way(
    layout: str, tmp_path: Path, forgery: dict[str, object]
) -> None:
    for name in ("a", "b"):
        _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs")
    raw = forgery.get("raw")
    change = forgery.get("change")
    assert raw is None or isinstance(raw, bytes)
    assert change is None or isinstance(change, dict)
    _forge(tmp_path, change, raw)
    out, fast = _rootfs(tmp_path, layout, tmp_path / "c.erofs")
    assert not fast
    assert (tmp_path / "c.erofs").read_bytes() == (tmp_path / "a.erofs").read_bytes()
    assert out.startswith(f"{tmp_path / 'c.erofs'}: erofs")


def test_an_unforged_record_is_served(layout: str, tmp_path: Path) -> None:
    """The forgeries' control: the record rewritten as it is still answers."""
    for name in ("a", "b"):
        _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs")
    _forge(tmp_path, {})
    _out, fast = _rootfs(tmp_path, layout, tmp_path / "c.erofs")
    assert fast


def test_a_record_naming_a_file_outside_the_cache_is_refused(layout: str, tmp_path: Path) -> None:
    """Even a sealed-looking directory elsewhere: a record hands out its own cache's entries."""
    for name in ("a", "b"):
        _rootfs(tmp_path, layout, tmp_path / f"{name}.erofs")
    _path, record = _record(tmp_path)
    entry = Path(record.entry_dir)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for f in entry.iterdir():
        (decoy / f.name).write_bytes(b"secret" if f.name.startswith("rootfs") else f.read_bytes())
    for f in decoy.iterdir():
        os.utime(f, ns=(0, 0))
    seal = [SEAL_MAGIC, record.file, f"{len(b'secret')} 0"]
    netstrings.write_file(str(decoy / SEAL_RECORD), seal)
    assert entry_untouched(str(decoy))  # a seal as good as a real one
    _forge(tmp_path, {"2": str(decoy)})
    _out, fast = _rootfs(tmp_path, layout, tmp_path / "c.erofs")
    assert not fast
    assert (tmp_path / "c.erofs").read_bytes() != b"secret"


def test_an_ext4_hit_is_a_writable_copy(layout: str, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b", "c"):
        out = tmp_path / f"{name}.ext4"
        r = run_vmimg(
            tmp_path, "rootfs", layout, "--format", "ext4", "-o", str(out), env=IMPORT_LOG
        )
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append((r.stdout, CLICK_IMPORTED.search(r.stderr) is None))
    assert [fast for _out, fast in runs] == [False, True, True]
    assert runs[1][0].strip().endswith("from cache (copy)")
    c = os.stat(tmp_path / "c.ext4")
    assert stat.S_IMODE(c.st_mode) == 0o644 and c.st_nlink == 1
    assert (tmp_path / "c.ext4").read_bytes() == (tmp_path / "b.ext4").read_bytes()


def test_hit_record_round_trips() -> None:
    stamps = {"/l": [1, -2, 3], "/a,b\n:c": [0], "/\udcff": [7, 8]}  # odd paths, a byte not UTF-8
    record = HitRecord("/c/outputs/k", "rootfs.erofs", True, stamps, "erofs", "i", "d", "p", "k")
    again = HitRecord.from_fields(record.to_fields())
    assert again is not None and again.to_fields() == record.to_fields()
    assert again.stamps == stamps and again.linkable is True


def test_a_closed_stdout_is_one_error_line_on_either_path(layout: str, tmp_path: Path) -> None:
    """The result line cannot be written (the reader went away): exit 1 and one line on
    stderr, whether the fast path or the full command line answered."""
    _rootfs(tmp_path, layout, tmp_path / "a.erofs")  # records the hit
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        for extra in ([], ["--no-cache"]):  # fast path, then the full command line
            cmd = confined_command("rootfs", layout, "--format", "erofs", "-o", "b.erofs", *extra)
            r = subprocess.run(
                cmd,
                cwd=tmp_path / "cwd",
                env=confined_env(tmp_path),
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=TIME_LIMIT,
            )
            assert r.returncode == 1, (extra, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert lines[-1].startswith("vmimg: error:") and "Traceback" not in r.stderr, r.stderr
    finally:
        os.close(write_end)
