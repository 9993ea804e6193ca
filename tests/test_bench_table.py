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


def test_the_rows_vmimg_against_its_peers_and_the_derived_figures() -> None:
    doc = {
        **SAMPLE,
        "rows": [
            {"fixture": "minbase", "work": "Debian minbase, 2 layers -> ext4",
             "vmimg": "vmimg ext4 (empty cache)", "peer": "mke2fs -d layer1.tar.gz",
             "vmimg_s": 1.36, "peer_s": 1.25, "ratio": 1.088, "vmimg_peak_mib": 52.4,
             "peer_peak_mib": 21.0, "vmimg_bytes": 100 << 20, "peer_bytes": 90 << 20,
             "size_ratio": 1.11, "compare_size": False},
            {"fixture": "minbase", "work": "Debian minbase -> erofs lz4hc",
             "vmimg": "vmimg erofs lz4hc (empty cache)", "peer": "mkfs.erofs -zlz4hc",
             "vmimg_s": 4.0, "peer_s": 5.0, "ratio": 0.8, "vmimg_peak_mib": 60,
             "peer_peak_mib": 30, "vmimg_bytes": 51 << 20, "peer_bytes": 50 << 20,
             "size_ratio": 1.02, "compare_size": True},
        ],
        "memory": [{"contender": "vmimg ext4 (empty cache)", "entries": [100_000, 400_000],
                    "peak_mib": [180.0, 480.0], "growth_kib_per_entry": 1.024}],
        "limit": {"fixture": "minbase", "contender": "vmimg ext4 (empty cache)",
                  "cold_s": 1.36, "limit_s": 0.85, "ratio": 1.6},
        "warm": [{"fixture": "minbase", "fmt": "erofs", "warm_s": 0.05, "cold_s": 1.27,
                  "percent": 3.94, "handout": "hardlink"},
                 {"fixture": "minbase", "fmt": "ext4", "warm_s": 0.03, "cold_s": 1.36,
                  "percent": 2.2, "handout": "reflink", "place": "on XFS with reflink"}],
    }  # fmt: skip
    body = table.section(doc)
    assert (
        "| Debian minbase, 2 layers -> ext4 | 1.36 s, 52 MiB peak | mke2fs -d layer1.tar.gz: "
        "1.25 s, 21 MiB peak | 1.09 |" in body
    )
    assert (
        "| Debian minbase -> erofs lz4hc | 4.00 s, 60 MiB peak, 51.0 MiB image | "
        "mkfs.erofs -zlz4hc: 5.00 s, 30 MiB peak, 50.0 MiB image | 0.80 (size 1.020) |" in body
    )
    assert (
        "- Peak RSS, vmimg ext4 (empty cache): 180 MiB at 100,000 entries, 480 MiB at "
        "400,000; growth 1.02 KiB per entry." in body
    )
    assert ": 0.85 s; vmimg ext4 (empty cache): 1.36 s, 1.60x the limit." in body
    assert "minbase -> erofs: 0.05 s, 4% of the cold 1.27 s (hardlink)." in body
    assert "minbase -> ext4 on XFS with reflink: 0.03 s, 2% of the cold 1.36 s (reflink)." in body
    # The full table stays; the ratio lines are the rows' own, not repeated.
    assert "| minbase | vmimg ext4 | 0.50 | 0.30 | 37 | 100.0 (20.0 allocated) |" in body
    assert "13.00x" not in body
