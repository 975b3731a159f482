"""The grader: every kind of submission an instructor receives, each with its expected CSV row.

Notebook 01 submissions are made in the test from ``solutions/01_*.ipynb`` (solved) and its
student version (built in memory by ``nbbuild``) plus a small edit each, rather than committing
seven copies that would go stale.  A mini two-exercise notebook in ``tests/fixtures/grading``
covers the fast paths (resume, per-cell timeouts, the CLI) in a few seconds each.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import nbformat
import pytest

from course_tools import grade
from course_tools.grade import GradeError, grade_folder, parse_check_names
from course_tools.nbbuild import canonical_solution, dumps, make_student

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "grading"
MINI = FIXTURES / "99_mini_solution.ipynb"
MINI_EXERCISES = ["add", "mul"]


# --------------------------------------------------------------------------- helpers


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
    expected["raises_at_import"] = {"status": "error", "scores": [0] * n,
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

    # The exercise function renamed: its check cell cannot find box_iou, and the solution's
    # label_anchors (which calls box_iou) then fails its check too.
    renamed = nbformat.from_dict(solution)
    at = find_cell(renamed, "def box_iou(")
    renamed.cells[at].source = renamed.cells[at].source.replace("def box_iou(", "def my_box_iou(")
    label_uses_iou = "box_iou(" in renamed.cells[find_cell(renamed, "def label_anchors")].source
    write(renamed, folder / "renamed_function.ipynb")
    expected["renamed_function"] = {
        "status": "error", "scores": [0, 1, 0 if label_uses_iou else 1] + [1] * (n - 3),
        "feedback": ["NameError: name 'box_iou' is not defined"]}
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
    root = tmp_path_factory.mktemp("nb01")
    subs = root / "submissions"
    subs.mkdir()
    expected = make_nb01_submissions(subs)
    before = fingerprint(subs)
    out = root / "out" / "grades.csv"
    # Three at a time on two cores: the endless one sleeps through its 60 s cell limit while the
    # others share the cores.  The limits leave room for a busy machine (notebook 01 takes ~20 s).
    rows = grade_folder(subs, notebook="01", out=out, timeout_cell=60, timeout_total=300, jobs=3,
                        quiet=True)
    return {"expected": expected, "exercises": exercises, "out": out, "rows": rows,
            "before": before, "after": fingerprint(subs), "subs": subs}


@pytest.mark.slow
def test_every_nb01_submission_gets_its_expected_row(nb01_graded) -> None:
    header, rows = read_csv(nb01_graded["out"])
    exercises = nb01_graded["exercises"]
    assert header == ["student", "notebook", "status", *exercises, "total", "max", "seconds",
                      "feedback-file"]
    assert sorted(rows) == sorted(nb01_graded["expected"])  # no submission stopped the others
    for student, want in nb01_graded["expected"].items():
        row = rows[student]
        got = (row["status"], scores(row, exercises))
        assert got == (want["status"], want["scores"]), f"{student}: {row}"
        assert row["notebook"] == "01"
        assert int(row["total"]) == sum(want["scores"]) and int(row["max"]) == len(exercises)
        assert float(row["seconds"]) >= 0


@pytest.mark.slow
def test_nb01_feedback_files(nb01_graded) -> None:
    out: Path = nb01_graded["out"]
    _, rows = read_csv(out)
    for student, want in nb01_graded["expected"].items():
        text = (out.parent / rows[student]["feedback-file"]).read_text()
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
def test_nb01_endless_submission_is_stopped_at_the_cell_limit(nb01_graded) -> None:
    endless = next(r for r in nb01_graded["rows"] if r.student == "endless")
    assert 60 <= endless.seconds < 200


# --------------------------------------------------------------------------- mini notebook (fast)


def mini_submissions(folder: Path) -> None:
    """The mini notebook solved, untouched, half done, and with a plain endless loop."""
    solution = nbformat.read(MINI, as_version=4)
    write(solution, folder / "a_solved.ipynb")
    write(make_student(solution, MINI.name), folder / "b_untouched.ipynb")
    half = nbformat.from_dict(solution)
    half.cells[find_cell(half, "def mul")].source = "def mul(a, b):\n    return a * b + 1"
    write(half, folder / "c_half.ipynb")
    loop = nbformat.from_dict(solution)
    # Interruptible: the per-cell limit stops it and the cells after it still run.
    loop.cells.insert(find_cell(loop, "check_add(add)") + 1,
                      nbformat.v4.new_code_cell("while True:\n    pass"))
    write(loop, folder / "d_loop.ipynb")


MINI_EXPECTED = {
    "a_solved": ("ok", [1, 1]),
    "b_untouched": ("ok", [0, 0]),
    "c_half": ("ok", [1, 0]),
    "d_loop": ("timeout", [1, 1]),
}


def test_mini_rows_and_resume(tmp_path: Path) -> None:
    subs = tmp_path / "subs"
    subs.mkdir()
    mini_submissions(subs)
    out = tmp_path / "grades.csv"
    before = fingerprint(subs)
    # First run "interrupted" after two students: grade a folder holding only those two.
    first = tmp_path / "first"
    first.mkdir()
    for name in ("a_solved.ipynb", "b_untouched.ipynb"):
        shutil.copy2(subs / name, first / name)
    kw = dict(notebook="99", exercises=MINI_EXERCISES, timeout_cell=15, timeout_total=120,
              quiet=True)
    grade_folder(first, out=out, feedback_dir=tmp_path / "fb", **kw)
    text_after_first = out.read_text()
    # --resume grades only the two others and keeps the first rows byte for byte.
    rows = grade_folder(subs, out=out, feedback_dir=tmp_path / "fb", resume=True, jobs=2, **kw)
    assert sorted(r.student for r in rows) == ["c_half", "d_loop"]
    assert out.read_text().startswith(text_after_first)
    header, table = read_csv(out)
    assert header == ["student", "notebook", "status", "add", "mul", "total", "max", "seconds",
                      "feedback-file"]
    got = {s: (r["status"], scores(r, MINI_EXERCISES)) for s, r in table.items()}
    assert got == MINI_EXPECTED
    assert table["c_half"]["feedback-file"] == "fb/c_half.txt"
    feedback = (tmp_path / "fb" / "c_half.txt").read_text()
    assert "[!] mul: 2 of 2 cases failed" in feedback and "expected 6, got 7" in feedback
    assert "a hidden case: output: wrong value" in feedback and "21" not in feedback  # no values
    assert "[x] add: passed all 2 cases" in feedback
    assert "[ ] add: not implemented yet" in (tmp_path / "fb" / "b_untouched.txt").read_text()
    assert "cell 4 ran longer than 15" in (tmp_path / "fb" / "d_loop.txt").read_text()
    assert fingerprint(subs) == before
    # A second --resume has nothing left to do.
    assert grade_folder(subs, out=out, feedback_dir=tmp_path / "fb", resume=True, **kw) == []


def test_unstoppable_loop_is_killed_at_the_notebook_limit(tmp_path: Path) -> None:
    """A loop that ignores Ctrl-C survives the per-cell interrupt; the notebook limit kills it."""
    nb = nbformat.read(MINI, as_version=4)
    nb.cells.insert(find_cell(nb, "check_add(add)") + 1, nbformat.v4.new_code_cell(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.1)"))
    path = tmp_path / "stubborn.ipynb"
    write(nb, path)
    row = grade.grade_submission(path, notebook="99", exercises=MINI_EXERCISES, timeout_cell=10,
                                 timeout_total=25)
    assert (row.status, row.scores) == ("timeout", {"add": 1, "mul": 0})
    assert 25 <= row.seconds < 60
    assert "notebook ran longer than 25" in row.feedback and "[ ] mul: its check did not run" in row.feedback


def test_without_resume_the_csv_starts_afresh(tmp_path: Path) -> None:
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copyfile(FIXTURES / "not_valid_json.ipynb", subs / "x.ipynb")
    out = tmp_path / "g.csv"
    out.write_text("old,content\n")
    rows = grade_folder(subs, notebook="99", exercises=MINI_EXERCISES, out=out, quiet=True)
    assert [(r.student, r.status, r.total) for r in rows] == [("x", "invalid", 0)]
    assert out.read_text().splitlines()[0].startswith("student,notebook,status,add,mul")
    # Resuming into a CSV of another grading is refused rather than mixing columns.
    with pytest.raises(GradeError, match="columns"):
        grade_folder(subs, notebook="99", exercises=["other"], out=out, resume=True, quiet=True)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subs = tmp_path / "subs"
    subs.mkdir()
    write(nbformat.read(MINI, as_version=4), subs / "s.ipynb")
    shutil.copyfile(FIXTURES / "not_valid_json.ipynb", subs / "t.ipynb")
    out = tmp_path / "g.csv"
    assert grade.main([str(subs), "--notebook", "99", "--out", str(out), "--exercises", "add,mul"]) == 0
    assert "graded 2 submissions" in capsys.readouterr().out
    _, table = read_csv(out)
    assert {s: (r["status"], r["total"]) for s, r in table.items()} == {"s": ("ok", "2"),
                                                                         "t": ("invalid", "0")}
    assert (tmp_path / "g-feedback" / "t.txt").exists()
    # Notebook 99 has no checks module and the mini notebook no `checks.nb99.check_*` cells:
    # without --exercises the CLI says so clearly instead of grading against nothing.
    assert grade.main([str(subs), "--notebook", "99", "--out", str(out), "--solution", str(MINI)]) == 2
    assert "no check cells" in capsys.readouterr().err
    assert grade.main([str(tmp_path / "missing"), "--notebook", "99", "--out", str(out),
                       "--exercises", "add"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_exercise_ids_from_check_cells() -> None:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("box_iou = checks.nb07.check_box_iou(box_iou)"),
        nbformat.v4.new_code_cell("e, d = checks.nb07.check_box_coding(e, d)\nprint(1)"),
        nbformat.v4.new_markdown_cell("checks.nb07.check_not_code(x)"),
        nbformat.v4.new_code_cell("box_iou = checks.nb07.check_box_iou(box_iou)  # again"),
    ])
    assert parse_check_names(nb) == ["box_iou", "box_coding"]


def test_scoring_only_counts_the_students_own_pass() -> None:
    records = [
        {"exercise": "add", "implemented": True, "passed": False, "n_cases": 2, "n_failed": 1,
         "messages": ["case '1 + 2': expected 3, got 4"]},       # fell back to the reference
        {"exercise": "mul", "implemented": False, "passed": False, "n_cases": 2, "n_failed": 2,
         "messages": ["not implemented yet"]},
        {"exercise": "unknown", "passed": True},                  # not an exercise of this notebook
    ]
    points, _ = grade.score(["add", "mul", "div"], records)
    assert points == {"add": 0, "mul": 0, "div": 0}
    points, _ = grade.score(["add"], records + [{"exercise": "add", "passed": True, "n_cases": 2}])
    assert points == {"add": 1}


def test_report_lines_written_by_student_code_are_ignored(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    report.write_text('{"exercise": "add", "passed": true}\nnot json\n[1, 2]\n{"no": "id"}\n')
    assert grade.read_report(report) == [{"exercise": "add", "passed": True}]
    assert grade.read_report(tmp_path / "missing.jsonl") == []


# --------------------------------------------------------------------------- the runner (nbrun)


def test_run_notebook_saves_outputs_only_when_ok(tmp_path: Path) -> None:
    from course_tools.nbrun import run_notebook

    good = tmp_path / "good.ipynb"
    write(nbformat.read(MINI, as_version=4), good)
    before = good.read_bytes()
    saved = tmp_path / "good.out.ipynb"
    result = run_notebook(good, profile="smoke", timeout_cell=60, timeout_total=120, save_to=saved)
    assert result.ok and result.error is None and result.saved_to == saved
    assert good.read_bytes() == before  # only save_to is written
    nb = nbformat.read(saved, as_version=4)
    assert nb.cells[-1].outputs[0]["text"] == "done: 4 9\n"
    assert all("execution" not in c.metadata for c in nb.cells)  # no timing churn in solutions/

    bad_nb = nbformat.read(MINI, as_version=4)
    bad_nb.cells[-1].source = "1 / 0"
    bad = tmp_path / "bad.ipynb"
    write(bad_nb, bad)
    result = run_notebook(bad, profile="smoke", timeout_cell=60, timeout_total=120,
                          save_to=tmp_path / "bad.out.ipynb", env_extra={"X": "1"})
    assert not result.ok and not result.timed_out
    assert result.error == "cell 6: ZeroDivisionError: division by zero"
    assert not (tmp_path / "bad.out.ipynb").exists()  # a failed run never replaces outputs


def test_nbrun_cli_inplace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from course_tools import nbrun

    path = tmp_path / "mini.ipynb"
    write(nbformat.read(MINI, as_version=4), path)
    code = nbrun.main([str(path), "--profile", "smoke", "--inplace", "--figures", str(tmp_path / "f")])
    out = capsys.readouterr().out
    assert code == 0 and "profile smoke" in out and "ok" in out and str(path) in out
    assert nbformat.read(path, as_version=4).cells[-1].outputs  # written back with outputs


def test_a_crashing_kernel_is_reported_with_its_last_words(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("print('hello')"),
        nbformat.v4.new_code_cell("import os\nos.write(2, b'fatal: out of cheese\\n')\nos._exit(3)"),
        nbformat.v4.new_code_cell("print('never')"),
    ])
    path = tmp_path / "crash.ipynb"
    write(nb, path)
    row = grade.grade_submission(path, notebook="99", exercises=["add"], timeout_cell=60,
                                 timeout_total=120)
    assert (row.status, row.scores) == ("error", {"add": 0})
    assert "the kernel died while running cell 1" in row.feedback
    assert "fatal: out of cheese" in row.feedback
