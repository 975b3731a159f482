"""Helpers shared by the grader's tests (``test_grade.py``, ``test_grade_nb01.py``)."""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path

import nbformat

from course_tools import sandbox
from course_tools.nbbuild import dumps

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "grading"
HEADER_END = ["total", "max", "seconds", "integrity", "isolation", "feedback-file"]
sys.path.insert(0, str(FIXTURES))
from attacks import ATTACKS  # noqa: E402 - the hostile submissions, for test_grade_nb01.py

__all__ = ["ATTACKS", "FIXTURES", "HEADER_END", "REPO", "find_cell", "fingerprint", "has_sandbox",
           "read_csv", "scores", "write"]


def has_sandbox() -> bool:
    return sandbox.detect() == "bwrap"


def read_csv(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    return header, {r["student"]: r for r in rows}


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file: grading must leave submissions untouched."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def find_cell(nb: nbformat.NotebookNode, text: str) -> int:
    """Index of the first code cell whose source contains ``text``."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and text in cell.source:
            return i
    raise AssertionError(f"no code cell contains {text!r}")


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    path.write_text(dumps(nb), encoding="utf-8")


def scores(row: dict[str, str], exercises: list[str]) -> list[int]:
    return [int(row[e]) for e in exercises]


