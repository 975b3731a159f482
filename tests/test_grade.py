"""The grader's fast paths, on a mini two-exercise notebook (``tests/fixtures/grading``): resume,
per-cell and per-notebook limits, the CLI, a dying worker, the sandbox itself, exit() and crashes.
Notebook 01's submissions, hostile ones included, are graded in ``test_grade_nb01.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from grading_helpers import (
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

from course_tools import grade, sandbox
from course_tools.grade import GradeError, grade_folder, parse_check_names
from course_tools.nbbuild import make_student

MINI = FIXTURES / "99_mini_solution.ipynb"
MINI_EXERCISES = ["add", "mul"]
MINI_CHECKS = "tests.fixtures.grading.mini_checks"
MINI_KW = dict(notebook="99", solution=MINI, checks_module=MINI_CHECKS)

needs_sandbox = pytest.mark.skipif(not has_sandbox(), reason="bubblewrap is not installed (make installs it)")


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
    kw = dict(**MINI_KW, timeout_cell=15, timeout_total=120, quiet=True)
    grade_folder(first, out=out, feedback_dir=tmp_path / "fb", **kw)
    text_after_first = out.read_text()
    # --resume grades only the two others and keeps the first rows byte for byte.
    rows = grade_folder(subs, out=out, feedback_dir=tmp_path / "fb", resume=True, jobs=2, **kw)
    assert sorted(r.student for r in rows) == ["c_half", "d_loop"]
    assert out.read_text().startswith(text_after_first)
    header, table = read_csv(out)
    assert header == ["student", "notebook", "status", "add", "mul", *HEADER_END]
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
    setup = grade.prepare(**MINI_KW, timeout_cell=10, timeout_total=25, isolation=sandbox.detect())
    row = grade.grade_submission(path, setup)
    # the scores come from the definitions, which the grader loads whether or not the run got there
    assert (row.status, row.scores) == ("timeout", {"add": 1, "mul": 1})
    assert 25 <= row.seconds < 60
    assert "notebook ran longer than 25" in row.feedback


def test_without_resume_the_csv_starts_afresh(tmp_path: Path) -> None:
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copyfile(FIXTURES / "not_valid_json.ipynb", subs / "x.ipynb")
    out = tmp_path / "g.csv"
    out.write_text("old,content\n")
    rows = grade_folder(subs, **MINI_KW, out=out, quiet=True)
    assert [(r.student, r.status, r.total) for r in rows] == [("x", "invalid", 0)]
    assert out.read_text().splitlines()[0].startswith("student,notebook,status,add,mul")
    # Resuming into a CSV of another grading is refused rather than mixing columns.
    with pytest.raises(GradeError, match="columns"):
        grade_folder(subs, **MINI_KW, exercises=["other"], out=out, resume=True, quiet=True)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subs = tmp_path / "subs"
    subs.mkdir()
    write(nbformat.read(MINI, as_version=4), subs / "s.ipynb")
    shutil.copyfile(FIXTURES / "not_valid_json.ipynb", subs / "t.ipynb")
    out = tmp_path / "g.csv"
    cli = ["--notebook", "99", "--out", str(out), "--solution", str(MINI), "--checks", MINI_CHECKS]
    assert grade.main([str(subs), *cli]) == 0
    assert "graded 2 submissions" in capsys.readouterr().out
    _, table = read_csv(out)
    assert {s: (r["status"], r["total"]) for s, r in table.items()} == {"s": ("ok", "2"),
                                                                         "t": ("invalid", "0")}
    assert (tmp_path / "g-feedback" / "t.txt").exists()
    # Notebook 99 has no course checks module: without --checks the CLI says so clearly.
    assert grade.main([str(subs), "--notebook", "99", "--out", str(out), "--solution", str(MINI)]) == 2
    assert "no checks module course_utils.checks.nb99" in capsys.readouterr().err
    assert grade.main([str(tmp_path / "missing"), *cli]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_exercise_ids_from_check_cells() -> None:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("box_iou = checks.nb07.check_box_iou(box_iou)"),
        nbformat.v4.new_code_cell("e, d = checks.nb07.check_box_coding(e, d)\nprint(1)"),
        nbformat.v4.new_markdown_cell("checks.nb07.check_not_code(x)"),
        nbformat.v4.new_code_cell("box_iou = checks.nb07.check_box_iou(box_iou)  # again"),
    ])
    assert parse_check_names(nb) == ["box_iou", "box_coding"]


def test_csv_cells_never_start_a_formula() -> None:
    for cell, safe in [("=2+3", "'=2+3"), ("+1", "'+1"), ("-x", "'-x"), ("@SUM(A1)", "'@SUM(A1)"),
                       ("alice", "alice"), ("3.5", "3.5")]:
        assert grade.csv_safe(cell) == safe
        assert grade._csv_unsafe(grade.csv_safe(cell)) == cell


def test_a_dying_worker_costs_only_its_own_row(tmp_path: Path) -> None:
    """Without a sandbox a cell can kill the process that grades it: only that row is lost."""
    subs = tmp_path / "subs"
    subs.mkdir()
    write(nbformat.read(MINI, as_version=4), subs / "a.ipynb")
    killer = nbformat.read(MINI, as_version=4)
    killer.cells.insert(2, nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"))
    write(killer, subs / "b.ipynb")
    rows = grade_folder(subs, **MINI_KW, out=tmp_path / "g.csv", jobs=2, isolation="none", quiet=True)
    assert {r.student: (r.status, r.total, r.isolation) for r in rows} == {
        "a": ("ok", 2, "none"), "b": ("crashed", 0, "none")}
    assert "grading process died" in next(r for r in rows if r.student == "b").feedback


def test_without_a_sandbox_the_grader_refuses_unless_told(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "detect", lambda: "none")
    (tmp_path / "subs").mkdir()
    with pytest.raises(GradeError, match="--no-sandbox"):
        grade_folder(tmp_path / "subs", **MINI_KW, out=tmp_path / "g.csv", quiet=True)
    assert grade_folder(tmp_path / "subs", **MINI_KW, out=tmp_path / "g.csv", quiet=True,
                        isolation="none") == []


@needs_sandbox
def test_the_sandbox_allows_only_its_own_folder(tmp_path: Path) -> None:
    secret = tmp_path / "hidden"
    secret.mkdir()
    (secret / "other.ipynb").write_text("classmate")
    work = tmp_path / "work"
    work.mkdir()
    sandbox.prepare_work(work)
    probe = f"""
import os, socket
print("uid", os.getuid())
print("secret", os.listdir({str(secret)!r}))
for path in [{str(REPO / "x")!r}, "/tmp/x", {str(work / "mine.txt")!r}]:
    try:
        open(path, "w").write("x"); print("wrote", path)
    except OSError as e:
        print("refused", path)
try:
    socket.create_connection(("127.0.0.1", 22), timeout=2); print("net yes")
except OSError:
    print("net no")
print("processes", sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:3])
"""
    cmd = sandbox.command([sys.executable, "-c", probe], isolation="bwrap", work=work, hide=[secret])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=work,
                         env=sandbox.minimal_env(work)).stdout
    assert "secret []" in out and "net no" in out
    assert f"refused {REPO / 'x'}" in out and "refused /tmp/x" in out and f"wrote {work / 'mine.txt'}" in out
    assert "processes [1, 2" in out  # its own PID namespace
    if sandbox._running_as_root():
        assert f"uid {sandbox.NOBODY}" in out


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
    setup = grade.prepare(**MINI_KW, exercises=["add"], isolation=sandbox.detect())
    row = grade.grade_submission(path, setup)
    assert (row.status, row.scores) == ("error", {"add": 0})
    assert "the kernel died while running cell 1" in row.feedback
    assert "fatal: out of cheese" in row.feedback


def test_exit_is_blamed_on_the_cell_that_called_it(tmp_path: Path) -> None:
    from course_tools.nbrun import run_notebook

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("exit()"),
                                         nbformat.v4.new_code_cell("x = 2"),
                                         nbformat.v4.new_code_cell("x = 3")])
    write(nb, tmp_path / "e.ipynb")
    result = run_notebook(tmp_path / "e.ipynb", timeout_cell=30, timeout_total=60, allow_errors=True)
    assert result.error is not None and result.error.startswith("cell 1 called exit()")
