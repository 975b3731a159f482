"""The grader on notebook 01: every kind of submission an instructor receives, each with its row.

Submissions are made in the test from ``solutions/01_*.ipynb`` (solved) and its student version
(built in memory by ``nbbuild``) plus a small edit each, rather than committing copies that would
go stale; the hostile ones (self-awarded marks, patched checks, wrapped references, tampering,
escaping processes, killing the worker, deleting its folder, exit()) are described in
``fixtures/grading/attacks.py``.  All are graded once, three at a time, with the sandbox on.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import nbformat
import pytest
from grading_helpers import (
    ATTACKS,
    FIXTURES,
    HEADER_END,
    REPO,
    find_cell,
    fingerprint,
    has_sandbox,
    read_csv,
    scores,
    write,
)

from course_tools import grade
from course_tools.grade import GradeError, grade_folder
from course_tools.nbbuild import canonical_solution, make_student

# --------------------------------------------------------------------------- notebook 01


def _nb01_solution() -> Path | None:
    found = sorted((REPO / "solutions").glob("01_*.ipynb"))
    return found[0] if found else None


def make_nb01_submissions(folder: Path) -> dict[str, dict]:
    """Write one notebook-01 submission per case into ``folder``; return what to expect of each.

    Expectations are ``{"status": ..., "scores": [...] or None (all zero), "feedback": [...]}``
    with ``scores`` in the order of ``checks.nb01.EXERCISES``.
    """
    path = _nb01_solution()
    assert path is not None
    solution = canonical_solution(nbformat.read(path, as_version=4), path.name)
    student = make_student(solution, path.name)
    n = len(grade.exercise_ids("01"))
    expected: dict[str, dict] = {}

    write(solution, folder / "solved.ipynb")
    expected["solved"] = {"status": "ok", "scores": [1] * n, "feedback": ["5/5", "[x]"]}

    write(student, folder / "untouched.ipynb")
    expected["untouched"] = {"status": "ok", "scores": [0] * n, "feedback": ["not implemented yet"]}

    # An endless loop right after exercise 1.1 is checked: the per-cell limit interrupts it and
    # the rest of the notebook still runs, so every exercise is graded; the status says timeout.
    # (It sleeps rather than spins so that it does not slow the other submissions down.)
    endless = nbformat.from_dict(solution)
    at = find_cell(endless, "check_box_iou(")
    endless.cells.insert(at + 1, nbformat.v4.new_code_cell(
        "import time\nwhile True:\n    time.sleep(0.1)"))
    write(endless, folder / "endless.ipynb")
    expected["endless"] = {"status": "timeout", "scores": [1] * n,
                           "feedback": [f"cell {at + 1} ran longer than"]}

    # Raises at import: the first import cell fails, so nothing after it can check anything.
    broken = nbformat.from_dict(solution)
    at = find_cell(broken, "from course_utils import")
    broken.cells[at].source = "import course_utils_no_such_module\n" + broken.cells[at].source
    write(broken, folder / "raises_at_import.ipynb")
    # The scores come from the student's definitions, which need no such module.
    expected["raises_at_import"] = {"status": "error", "scores": [1] * n,
                                    "feedback": ["ModuleNotFoundError", "course_utils_no_such_module"]}

    shutil.copyfile(FIXTURES / "not_valid_json.ipynb", folder / "not_json.ipynb")
    expected["not_json"] = {"status": "invalid", "scores": [0] * n, "feedback": ["not valid JSON"]}

    # Cells reordered and deleted: exercise 1.5 (code + check) moved up to right after 1.1's
    # check, and the anchor_grid exercise cell deleted (its check then raises NameError).
    moved = nbformat.from_dict(solution)
    enc, enc_check = find_cell(moved, "def encode_boxes"), find_cell(moved, "check_box_coding(")
    block = [moved.cells[enc], moved.cells[enc_check]]
    del moved.cells[enc_check], moved.cells[enc]
    at = find_cell(moved, "check_box_iou(")
    moved.cells[at + 1:at + 1] = block
    del moved.cells[find_cell(moved, "def anchor_grid")]
    write(moved, folder / "reordered_deleted.ipynb")
    expected["reordered_deleted"] = {"status": "error", "scores": [1, 0] + [1] * (n - 2),
                                     "feedback": ["NameError", "anchor_grid"]}

    # The exercise function renamed: 1.1 finds no box_iou; label_anchors (which calls box_iou)
    # is then checked with the reference box_iou, as the notebook's check cells would hand over.
    renamed = nbformat.from_dict(solution)
    at = find_cell(renamed, "def box_iou(")
    renamed.cells[at].source = renamed.cells[at].source.replace("def box_iou(", "def my_box_iou(")
    write(renamed, folder / "renamed_function.ipynb")
    expected["renamed_function"] = {"status": "error", "scores": [0] + [1] * (n - 1),
                                    "feedback": ["name 'box_iou' is not defined"]}

    # Odd file names: a formula, an upper-case suffix, a case collision (invalid notebooks, fast).
    bad = (FIXTURES / "not_valid_json.ipynb").read_bytes()
    for name in ("=2+3.ipynb", "Carol.IPYNB", "Alice.ipynb", "alice.ipynb"):
        (folder / name).write_bytes(bad)
        expected[name[:-6]] = {"status": "invalid", "scores": [0] * n, "feedback": ["not valid JSON"]}
    (folder / "dave.ipynb.txt").write_bytes(bad)
    return expected


def make_attacks(folder: Path, solution: nbformat.NotebookNode, student: nbformat.NotebookNode,
                 marker: str) -> dict[str, dict]:
    """One submission per entry of ``fixtures/grading/attacks.py``; what to expect of each."""
    expected = {}
    for name, attack in ATTACKS.items():
        nb = nbformat.from_dict(solution if attack["base"] == "solution" else student)
        for key, source in attack.get("replace", {}).items():
            nb.cells[find_cell(nb, key)].source = source
        if attack.get("cells"):
            at = find_cell(nb, attack["after"] or "import ")
            for k, source in enumerate(attack["cells"]):
                nb.cells.insert(at + 1 + k, nbformat.v4.new_code_cell(source.replace("{marker}", marker)))
        write(nb, folder / f"{name}.ipynb")
        expected[name] = {**attack["expected"], "feedback": attack["feedback"]}
    return expected


@pytest.fixture(scope="module")
def nb01_graded(tmp_path_factory: pytest.TempPathFactory):
    """Grade all notebook-01 submissions once (two at a time) for the tests below."""
    if _nb01_solution() is None:
        pytest.skip("solutions/01_*.ipynb does not exist yet")
    try:
        exercises = grade.exercise_ids("01")
    except GradeError as exc:
        pytest.skip(str(exc))
    if not has_sandbox():
        pytest.skip("bubblewrap is not installed (make installs it)")
    root = tmp_path_factory.mktemp("nb01")
    subs = root / "submissions"
    subs.mkdir()
    expected = make_nb01_submissions(subs)
    path = _nb01_solution()
    solution = canonical_solution(nbformat.read(path, as_version=4), path.name)
    marker = f"attack{uuid.uuid4().hex[:10]}"
    expected.update(make_attacks(subs, solution, make_student(solution, path.name), marker))
    before = fingerprint(subs)
    out = root / "out" / "grades.csv"
    # Three at a time on two cores: the endless one sleeps through its 30 s cell limit while the
    # others share the cores.  The limits leave room for a busy machine.
    rows = grade_folder(subs, notebook="01", out=out, timeout_cell=30, timeout_total=300, jobs=3,
                        quiet=True)
    leftovers = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    planted = [str(p) for p in Path("/tmp").glob(f"*/**/planted_{marker}*")]
    return {"expected": expected, "exercises": exercises, "out": out, "rows": rows,
            "before": before, "after": fingerprint(subs), "subs": subs, "marker": marker,
            "leftovers": leftovers, "planted": planted, "root": root}


@pytest.mark.slow
def test_every_nb01_submission_gets_its_expected_row(nb01_graded) -> None:
    header, rows = read_csv(nb01_graded["out"])
    exercises = nb01_graded["exercises"]
    assert header == ["student", "notebook", "status", *exercises, *HEADER_END]
    expected = {("'" + s if s.startswith("=") else s): w for s, w in nb01_graded["expected"].items()}
    assert sorted(rows) == sorted(expected)  # no submission stopped the others
    for student, want in expected.items():
        row = rows[student]
        got = (row["status"], scores(row, exercises))
        assert got == (want["status"], want["scores"]), f"{student}: {row}"
        assert (row["integrity"], row["isolation"]) == ("ok", "bwrap")
        assert row["notebook"] == "01"
        assert int(row["total"]) == sum(want["scores"]) and int(row["max"]) == len(exercises)
        assert float(row["seconds"]) >= 0


@pytest.mark.slow
def test_nb01_feedback_files(nb01_graded) -> None:
    out: Path = nb01_graded["out"]
    _, rows = read_csv(out)
    for student, want in nb01_graded["expected"].items():
        text = (out.parent / rows["'" + student if student.startswith("=") else student]["feedback-file"]).read_text()
        assert text.startswith(f"Notebook 01, submission '{student}'")
        for fragment in want["feedback"]:
            assert fragment in text, f"{student}: {fragment!r} not in feedback:\n{text}"
    # Hidden cases never leak their values into feedback.
    assert "hidden case" not in (out.parent / rows["solved"]["feedback-file"]).read_text()


@pytest.mark.slow
def test_nb01_submissions_are_never_modified(nb01_graded) -> None:
    assert nb01_graded["after"] == nb01_graded["before"]
    assert sorted(p.name for p in nb01_graded["subs"].iterdir()) == sorted(nb01_graded["before"])


@pytest.mark.slow
def test_report_lines_written_by_student_code_earn_nothing(nb01_graded) -> None:
    """A cell that appends "passed" lines to every report file it can find gets 0/5."""
    row = next(r for r in nb01_graded["rows"] if r.student == "self_awarded")
    assert (row.status, row.total) == ("ok", 0)


@pytest.mark.slow
def test_no_attack_reaches_outside_its_sandbox(nb01_graded) -> None:
    out: Path = nb01_graded["out"]
    marker = nb01_graded["marker"]
    assert nb01_graded["leftovers"] == ""  # no process outlived its grading
    assert nb01_graded["planted"] == []    # no file planted anywhere under /tmp
    for path in [out, *out.parent.rglob("*.txt")]:
        assert marker not in path.read_text(), f"{path} was rewritten by a submission"
    assert not list(nb01_graded["root"].rglob(f"planted_{marker}*"))


@pytest.mark.slow
def test_files_that_are_not_graded_are_listed_with_a_reason(nb01_graded) -> None:
    out: Path = nb01_graded["out"]
    text = (out.parent / "grades-not-graded.txt").read_text()
    assert "not graded: dave.ipynb.txt: an .ipynb file saved with another extension" in text
    assert "Alice.ipynb and alice.ipynb differ only in case" in text
    names = {r["feedback-file"].lower() for r in read_csv(out)[1].values()}
    assert len(names) == len(read_csv(out)[1])  # feedback files distinct even ignoring case


@pytest.mark.slow
def test_nb01_endless_submission_is_stopped_at_the_cell_limit(nb01_graded) -> None:
    endless = next(r for r in nb01_graded["rows"] if r.student == "endless")
    assert 30 <= endless.seconds < 200


