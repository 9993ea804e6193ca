"""Every corpus case through the real CLI, confined: exact errors or documented safe results.

Each run has its own cwd, HOME and cache in a temporary directory and a 1 GiB
address-space limit. After it: a failure left one line on stderr and nothing
in the output directory; a success left exactly the output file, and the
extracted image holds what the case documents. In both cases the cwd and HOME
stay empty, the cache holds no temporary file, and the host is untouched (no
`vmimg-hostile-*` file anywhere we look, /etc/shadow and /etc/passwd unchanged).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need
from tests.hostile.cli import run_vmimg
from tests.hostile.corpus import CASES, HOST_MARKER, Case, Fail, Ok, Outcome, pattern

HOST_FILES = ("/etc/shadow", "/etc/passwd", "/etc/hosts")
HOST_DIRS = ("/", "/tmp", "/etc", "/root", "/var/tmp")
MIN_CASES = 40

# Cases whose every run takes seconds (hundreds of layers, a decompression bomb): slow tier.
SLOW_CASES = frozenset({"500-layers", "zstd-bomb"})


def _marks(case: Case, index: int, fmt: str) -> tuple[pytest.MarkDecorator, ...]:
    """The fast tier runs each case once, in one format (rotating, so every writer meets
    hostile trees there); the other formats, and the slow cases, run in the slow tier."""
    formats = list(case.outcomes(index))
    fast = formats[index % len(formats)]
    return () if fmt == fast and case.name not in SLOW_CASES else (pytest.mark.slow,)


RUNS = [
    pytest.param(case, fmt, outcome, id=f"{case.name}-{fmt}", marks=_marks(case, i, fmt))
    for i, case in enumerate(CASES)
    for fmt, outcome in case.outcomes(i).items()
]


def test_corpus_is_complete() -> None:
    assert len(CASES) >= MIN_CASES
    assert len({c.name for c in CASES}) == len(CASES)


def _host_state() -> dict[str, object]:
    state: dict[str, object] = {}
    for path in HOST_FILES:
        st = os.stat(path)
        with open(path, "rb") as f:
            state[path] = (st.st_mtime_ns, st.st_mode, hashlib.sha256(f.read()).hexdigest())
    for d in HOST_DIRS:
        state[d] = sorted(n for n in os.listdir(d) if HOST_MARKER in n)
    return state


@pytest.fixture(scope="module")
def host_before() -> dict[str, object]:
    return _host_state()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each case's image, built once for all formats."""
    return {}


def _source(case: Case, sources: dict[str, str], factory: pytest.TempPathFactory) -> str:
    if case.name not in sources:
        sources[case.name] = case.build(factory.mktemp(case.name))
    return sources[case.name]


def extract(out: Path, fmt: str, dest: Path) -> None:
    """Unpack an image with the format's own tool."""
    dest.mkdir()
    if fmt == "tar":
        cmd = [need("tar"), "--numeric-owner", "-xpf", str(out), "-C", str(dest)]
    elif fmt == "ext4":
        cmd = [need("debugfs"), "-R", f"rdump / {dest}", str(out)]
    else:
        cmd = [need("fsck.erofs"), f"--extract={dest}", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)


def check_safe_result(ok: Ok, out: Path, fmt: str, tmp: Path) -> None:
    if ok.check is not None:
        ok.check(out, fmt)
        return
    dest = tmp / "extracted"
    extract(out, fmt, dest)
    root = os.fsencode(dest)
    for path, data in ok.files.items():
        disk = root + path
        assert os.path.lexists(disk), f"{fmt}: {path!r} missing"
        if data is not None:
            with open(disk, "rb") as f:
                assert f.read() == data, f"{fmt}: {path!r} content"
    for path in ok.absent:
        assert not os.path.lexists(root + path), f"{fmt}: {path!r} should be gone"


@pytest.mark.parametrize(("case", "fmt", "outcome"), RUNS)
def test_case(
    case: Case,
    fmt: str,
    outcome: Outcome,
    sources: dict[str, str],
    host_before: dict[str, object],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    source = _source(case, sources, tmp_path_factory)
    work = tmp_path / "work"
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / f"root.{fmt}"
    r = run_vmimg(work, "rootfs", source, "--format", fmt, "-o", str(out), "-q", env=case.env)
    if isinstance(outcome, Fail):
        lines = r.stderr.splitlines()
        assert r.returncode == outcome.code, r.stderr
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("vmimg: error: ")
        message = lines[0][len("vmimg: error: ") :]
        assert pattern(outcome.message).fullmatch(message), message
        assert os.listdir(outdir) == []  # no partial output, no temporary file
    else:
        assert r.returncode == 0, r.stderr
        assert os.listdir(outdir) == [out.name]
        check_safe_result(outcome, out, fmt, tmp_path)
    assert os.listdir(work / "cwd") == [] and os.listdir(work / "home") == []
    tmp_in_cache = work / "cache" / "tmp"
    assert not tmp_in_cache.exists() or os.listdir(tmp_in_cache) == []
    assert _host_state() == host_before
