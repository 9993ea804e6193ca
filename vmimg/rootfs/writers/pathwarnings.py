"""Warnings that name paths, bounded: a writer that clamps a time or a size says which path,
but a hostile tree with a million odd entries must not make a million lines."""

from __future__ import annotations

import os

SHOWN_WARNINGS_MAX = 20  # warnings of one kind listed by path; the rest are counted


class PathWarnings:
    """Warnings of one kind ("mtime clamped"), one per path up to SHOWN_WARNINGS_MAX:
    a hostile tree with a million odd entries must not make a million lines."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.shown: list[str] = []
        self.more = 0

    def add(self, path: bytes) -> None:
        if len(self.shown) < SHOWN_WARNINGS_MAX:
            self.shown.append(f"{os.fsdecode(path)}: {self.what}")
        else:
            self.more += 1

    def lines(self) -> list[str]:
        if not self.more:
            return list(self.shown)
        return [*self.shown, f"{self.more} more paths: {self.what}"]
