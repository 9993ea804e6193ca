"""bench.table: the README's and docs/comparison.md's benchmark sections are what the
generator makes from the committed results, and the generator renders a results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import table

SAMPLE = {
    "machine": {"date": "2026-01-02 03:04:05 UTC", "cores": 2, "cpu": "x86_64",
                "kernel": "6.1.0", "python": "3.11.2", "mke2fs": "mke2fs 1.47.0",
                "mkfs.erofs": "mkfs.erofs 1.5", "umoci": "umoci version 0.4.7",
                "load": "3.0, 2.0, 1.0 (1, 5, 15 min averages at the end)"},
    "results": [
        {"fixture": "minbase", "name": "vmimg ext4", "fmt": "ext4", "seconds": [0.5, 0.4, 0.7],
         "peak_rss_mb": [30.2, 36.6, 31.0], "output_bytes": 100 << 20,
         "allocated_bytes": 20 << 20, "median": 0.5},
        {"fixture": "minbase", "name": "umoci unpack + mke2fs -d", "fmt": "ext4",
         "seconds": [6.0, 7.0, 6.5], "peak_rss_mb": [24.0], "output_bytes": 90 << 20,
         "allocated_bytes": 90 << 20, "median": 6.5},
    ],
    "ratios": ["minbase: umoci unpack + mke2fs -d / vmimg ext4 = 13.00x"],
}  # fmt: skip


def test_the_docs_hold_what_the_published_results_give() -> None:
    assert table.main(["--check"]) == 0


def test_a_results_file_becomes_a_section(tmp_path: Path) -> None:
    body = table.section(SAMPLE)
    assert "| minbase | vmimg ext4 | 0.50 | 0.30 | 37 | 100.0 (20.0 allocated) |" in body
    assert "| minbase | umoci unpack + mke2fs -d | 6.50 | 1.00 | 24 | 90.0 |" in body
    assert "2026-01-02 03:04:05 UTC, 2 cores" in body and "mke2fs 1.47.0" in body
    assert "Load average during the run: 3.0, 2.0, 1.0" in body
    assert body.endswith("- minbase: umoci unpack + mke2fs -d / vmimg ext4 = 13.00x")
    doc = f"before\n{table.BEGIN.format('X')}\nold\n{table.END.format('X')}\nafter\n"
    new = table.replace_section(doc, "X", body, "doc")
    assert new.startswith("before\n") and new.endswith("after\n") and "old" not in new
    assert table.replace_section(new, "X", body, "doc") == new


def test_unusable_inputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(table.TableError, match=r"no .* markers"):
        table.replace_section("no markers here\n", "X", "body", "doc")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"machine": {}}))
    assert table.main(["--results", str(bad), "--check"]) == 2
    assert "not a bench.run results file" in capsys.readouterr().err
    bad.write_text("{")
    assert table.main(["--results", str(bad)]) == 2
