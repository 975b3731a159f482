"""Numbers in a solution's prose must be printed by code, not typed.

Rule: a markdown cell of ``solutions/*.ipynb`` may not contain a decimal
number that looks measured (two decimals and two significant digits, or three
significant digits: ``0.993``, ``0.94``, ``54.3``; not ``0.7`` or ``3.1``)
that equals a quality number committed in ``benchmarks/results/*.json``
(every number under ``metrics`` and under ``rows[].ours``), rounded the ways
prose writes it: 3, 2 or 1 decimals, and x100 as a percentage with 2, 1 or 0
decimals.  Numbers in a paragraph that names the profile they were measured in (a
backticked `` `cpu` ``, `` `smoke` `` or `` `full` ``; a table inherits this from
the paragraph before it) and the seed's own numbers (``paper`` in the JSONs)
are allowed.  Integers without a decimal point are ignored, so are the table rows
of the first markdown cell (the run-time header) and the settings listed in
``SETTINGS`` below.  Such a number belongs in a code cell that prints it from
the run.  Section, exercise, figure, table and equation numbers are skipped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))

# Values that prose may type because they are settings or facts of the method,
# not measurements; each is here only because a results JSON happens to hold
# the same rounded value.
SETTINGS = {
    "0.95",  # SAM's stability-score threshold of Table 3.2 (notebook 08), a setting
    "0.88",  # SAM's predicted-IoU threshold of Table 3.2 (notebook 08), a setting
}

# A paragraph (or the table that follows it) that names the profile its numbers
# were measured in, e.g. "What we measured in `cpu`", states them as the house
# rule allows.
_PROFILE = re.compile(r"`(cpu|smoke|full)`")

# Metric keys that hold timings or machine facts rather than quality numbers.
_TIMING_KEY = re.compile(r"(^|_)(s|us|ms|wall|minutes|seconds|per_s|per_minute|images_per_s|"
                         r"timestamp|threads|limits|gb|gib)($|_)")

_NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)")


def _numbers(obj, key=""):
    """Every float (or number inside a string) under ``obj``, skipping timings."""
    if isinstance(obj, bool) or _TIMING_KEY.search(key.lower() or "-"):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, str):
        for tok in re.findall(r"\d+\.\d+", obj):
            yield float(tok)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v, key)


def _significant(tok: str) -> int:
    return len(tok.replace(".", "").lstrip("0"))


def _measured_looking(tok: str) -> bool:
    """``0.993``, ``0.94``, ``54.3``: yes; ``0.7``, ``3.1`` (a section), ``1.0``: no."""
    decimals = len(tok.split(".")[1])
    return (decimals >= 2 and _significant(tok) >= 2) or _significant(tok) >= 3


# Section, exercise, figure, table and equation numbers (``§4.2``, ``Exercise 1.3``).
_REFERENCE = re.compile(r"(§|§\s|Exercise\s|Fig\.\s?|Figure\s|Table\s|Eq\.\s?|Section\s)$")


def _renderings(value: float):
    for d in (3, 2, 1):
        yield f"{value:.{d}f}"
    if abs(value) <= 1.0:
        for d in (2, 1):
            yield f"{value * 100:.{d}f}"


def committed_numbers(paths=RESULTS) -> dict[str, str]:
    """Rounded renderings of committed quality numbers -> the file they come from."""
    out: dict[str, str] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        values = list(_numbers(data.get("metrics", {})))
        values += [v for row in data.get("rows", []) for v in _numbers(row.get("ours"))]
        for value in values:
            for tok in _renderings(value):
                if _measured_looking(tok) and tok not in SETTINGS:
                    out.setdefault(tok, Path(path).name)
    # the seed's own numbers (``paper``) are quotes, not run output: prose may type them
    for path in paths:
        data = json.loads(Path(path).read_text())
        paper = list(_numbers(data.get("paper", {})))
        paper += [v for row in data.get("rows", []) for v in _numbers(row.get("paper"))]
        for value in paper:
            for tok in _renderings(value):
                out.pop(tok, None)
    return out


def _blocks(lines: list[str]):
    """Paragraphs of a markdown cell, each with whether it (or, for a table, the paragraph
    just before it) names a profile."""
    block: list[str] = []
    prev_named = False
    for ln in lines + [""]:
        if ln.strip():
            block.append(ln)
            continue
        if block:
            named = bool(_PROFILE.search("\n".join(block)))
            is_table = block[0].lstrip().startswith("|")
            yield block, named or (is_table and prev_named)
            prev_named = named
            block = []


def typed_numbers(nb, name: str, committed: dict[str, str]) -> list[str]:
    """``notebook cell N: 'tok' (from file)`` for each committed number typed in markdown."""
    found = []
    md_seen = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.splitlines()
        if md_seen == 0:  # header: its run-time table rows are timings
            lines = [ln for ln in lines if not ln.lstrip().startswith("|")]
        md_seen += 1
        for ln in (ln for block, named in _blocks(lines) if not named for ln in block):
            for m in _NUMBER.finditer(ln):
                tok = m.group(0)
                if _REFERENCE.search(ln[: m.start()]):
                    continue
                if tok in committed:
                    found.append(f"{name} cell {i}: {tok!r} (in {committed[tok]}): {ln.strip()[:100]}")
    return found


@pytest.fixture(scope="module")
def committed():
    return committed_numbers()


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_no_typed_run_numbers(path, committed):
    nb = nbformat.read(path, as_version=4)
    found = typed_numbers(nb, path.name, committed)
    assert not found, "numbers from a run typed in markdown:\n" + "\n".join(found)


def test_rule_catches_a_typed_recall(committed):
    row = json.loads((ROOT / "benchmarks/results/retrieval_cpu.json").read_text())["rows"][1]
    r1 = str(row["ours"]).split("/")[0].strip()          # e.g. "54.3"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# header\n| cpu | 12.34 s |"),
        nbformat.v4.new_markdown_cell(f"SCAN reaches R@1 = {r1} on the test set; lr 0.7 / 0.3."),
    ])
    found = typed_numbers(nb, "synthetic.ipynb", committed)
    assert len(found) == 1 and "cell 1" in found[0] and repr(r1) in found[0]


def test_settings_are_not_flagged(committed):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# h"),
        nbformat.v4.new_markdown_cell("IoU thresholds 0.7 / 0.3, lr 5e-05, 20 epochs."),
    ])
    assert typed_numbers(nb, "s.ipynb", committed) == []


def test_profile_stated_paragraph_and_its_table_pass(committed):
    row = json.loads((ROOT / "benchmarks/results/retrieval_cpu.json").read_text())["rows"][1]
    r1 = str(row["ours"]).split("/")[0].strip()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# h"),
        nbformat.v4.new_markdown_cell(f"What we measured in `cpu`:\n\n| run | R@1 |\n|---|---|\n| a | {r1} |\n\n"
                                      f"Here R@1 was {r1}."),
    ])
    found = typed_numbers(nb, "s.ipynb", committed)
    assert len(found) == 1 and "Here R@1" in found[0]
