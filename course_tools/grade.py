"""Grade a folder of submitted notebooks: one fresh kernel each, time limits, a CSV and feedback.

Each ``*.ipynb`` in the submissions folder is copied into its own temporary folder and executed
there (the submission itself is only ever read) in a fresh kernel, in the ``smoke`` profile by
default, with a per-cell and a per-notebook time limit.  The notebook's check cells append one
JSON line per exercise to ``$COURSE_GRADE_REPORT`` (see :mod:`course_utils.checks`); an exercise
earns its point only when the student's *own* function passed every case, printed and hidden.
When a check falls back to the reference implementation the point is not earned.

The CSV is written one row per submission as soon as it is graded and flushed, so an interrupted
run keeps what it graded and ``--resume`` goes on with the others.  Each student also gets a short
feedback text built from the checks' messages and, when the notebook failed, the cause.

Usage::

    python -m course_tools.grade submissions/ --notebook 01 --out grades.csv

CSV columns: ``student`` (file name without ``.ipynb``), ``notebook``, ``status`` (``ok``: ran
to the end without error; ``error``: a cell raised; ``timeout``: a cell or the whole notebook
ran out of time; ``invalid``: not a readable notebook), one column per exercise (1 or 0),
``total``, ``max``, ``seconds`` (wall time) and ``feedback-file`` (relative to the CSV's folder).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import importlib
import json
import multiprocessing
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .nbrun import REPO_ROOT, RunResult, run_notebook

STATUSES = ("ok", "timeout", "error", "invalid")
FIXED_BEFORE = ("student", "notebook", "status")
FIXED_AFTER = ("total", "max", "seconds", "feedback-file")
# A check cell: ``name = checks.nb01.check_name(name)`` (several names for a pair of functions).
CHECK_CALL = re.compile(r"checks\.nb(\d+)\.check_(\w+)\s*\(")


class GradeError(ValueError):
    """A problem with the grading set-up itself (not with a submission)."""


# --------------------------------------------------------------------------- exercises


def solution_path(notebook: str, root: Path = REPO_ROOT) -> Path:
    """``solutions/<notebook>_*.ipynb`` of this checkout."""
    found = sorted((root / "solutions").glob(f"{notebook}_*.ipynb"))
    if not found:
        raise GradeError(f"no solution notebook solutions/{notebook}_*.ipynb in {root}")
    return found[0]


def parse_check_names(nb: nbformat.NotebookNode) -> list[str]:
    """The exercise names of a notebook's check cells, in order (``check_box_iou`` -> ``box_iou``)."""
    names: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            for match in CHECK_CALL.finditer(cell.source):
                if match.group(2) not in names:
                    names.append(match.group(2))
    return names


def exercise_ids(notebook: str, solution: Path | None = None) -> list[str]:
    """The exercises of ``notebook``, in order.

    ``course_utils.checks.nbXX.EXERCISES`` when that module exists (the ids the checks record),
    otherwise the names found in the solution notebook's check cells.
    """
    try:
        module = importlib.import_module(f"course_utils.checks.nb{notebook}")
    except ModuleNotFoundError:
        module = None
    if module is not None and getattr(module, "EXERCISES", None):
        return list(module.EXERCISES)
    path = solution if solution is not None else solution_path(notebook)
    names = parse_check_names(nbformat.read(path, as_version=4))
    if not names:
        raise GradeError(f"{path}: no check cells (checks.nb{notebook}.check_...) found")
    return names


def _matches(exercise: str, recorded: str) -> bool:
    """Whether a recorded result belongs to ``exercise`` (ids, or a name parsed from a cell)."""
    return recorded == exercise or exercise in re.split(r"[^\w]+", recorded)


# --------------------------------------------------------------------------- one submission


@dataclass
class GradeRow:
    """The grade of one submission (one CSV row) and its feedback text."""

    student: str
    notebook: str
    status: str
    scores: dict[str, int]
    seconds: float
    feedback: str
    feedback_file: str = ""
    cell_errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.scores.values())

    @property
    def max(self) -> int:
        return len(self.scores)

    def csv_row(self, exercises: Sequence[str]) -> list[str]:
        return ([self.student, self.notebook, self.status]
                + [str(self.scores.get(e, 0)) for e in exercises]
                + [str(self.total), str(self.max), f"{self.seconds:.1f}", self.feedback_file])


def read_submission(path: Path) -> tuple[nbformat.NotebookNode | None, str | None]:
    """The notebook at ``path``, or ``(None, why)`` when it is not a readable notebook."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read the file: {exc}"
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # noqa: BLE001 - any nbformat failure means "not a notebook"
        return None, f"not a Jupyter notebook: {exc}"
    if not isinstance(nb.get("cells"), list):
        return None, "not a Jupyter notebook: it has no list of cells"
    return nb, None


def read_report(path: Path) -> list[dict]:
    """The check results a run appended to ``$COURSE_GRADE_REPORT`` (bad lines are skipped:
    a student's code could have written into the file)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("exercise"), str):
            records.append(record)
    return records


def score(exercises: Sequence[str], records: Sequence[dict]) -> tuple[dict[str, int], dict[str, dict]]:
    """Points per exercise and the record that decided each.

    One point when a record of that exercise has ``passed`` true: the student's own function
    passed every case.  A fallback to the reference records ``passed`` false, so earns nothing.
    """
    scores: dict[str, int] = {}
    decided: dict[str, dict] = {}
    for exercise in exercises:
        mine = [r for r in records if _matches(exercise, r["exercise"])]
        passed = [r for r in mine if r.get("passed") is True]
        scores[exercise] = 1 if passed else 0
        if passed or mine:
            decided[exercise] = passed[0] if passed else mine[-1]
    return scores, decided


def feedback_text(student: str, notebook: str, status: str, exercises: Sequence[str],
                  scores: dict[str, int], decided: dict[str, dict], cause: str | None,
                  cell_errors: Sequence[str]) -> str:
    """The short text a student gets back."""
    total = sum(scores.values())
    lines = [f"Notebook {notebook}, submission '{student}': {total}/{len(exercises)} exercises passed.",
             f"Status: {status}" + (f" ({cause})" if cause else "")]
    lines.append("")
    for exercise in exercises:
        record = decided.get(exercise)
        if record is None:
            lines.append(f"[ ] {exercise}: its check did not run (the check cell is missing, "
                         "was not reached, or raised before checking)")
        elif scores[exercise]:
            lines.append(f"[x] {exercise}: passed all {record.get('n_cases', '?')} cases")
        elif not record.get("implemented", True):
            lines.append(f"[ ] {exercise}: not implemented yet")
        else:
            lines.append(f"[!] {exercise}: {record.get('n_failed', '?')} of "
                         f"{record.get('n_cases', '?')} cases failed")
            lines += [f"      - {m}" for m in record.get("messages", [])[:8]]
    if cell_errors:
        lines += ["", "Cells that raised an error:"]
        lines += [f"  - {e}" for e in cell_errors[:10]]
        if len(cell_errors) > 10:
            lines.append(f"  - ... and {len(cell_errors) - 10} more")
    return "\n".join(lines) + "\n"


def _status(run: RunResult) -> str:
    if run.timed_out:
        return "timeout"
    return "ok" if run.ok else "error"


def grade_submission(path: Path, *, notebook: str, exercises: Sequence[str],
                     profile: str = "smoke", timeout_cell: float = 60,
                     timeout_total: float = 300) -> GradeRow:
    """Grade one submission on a copy in a fresh temporary folder (``path`` is only read)."""
    student = path.stem
    start = time.monotonic()
    nb, why = read_submission(path)
    if nb is None:
        scores = {e: 0 for e in exercises}
        return GradeRow(student, notebook, "invalid", scores, time.monotonic() - start,
                        feedback_text(student, notebook, "invalid", exercises, scores, {}, why, []))
    # ignore_cleanup_errors: files a submission left read-only must not stop the grading.
    with tempfile.TemporaryDirectory(prefix=f"grade-{student[:40]}-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        copy = work / path.name
        shutil.copyfile(path, copy)
        report = work / "grade-report.jsonl"
        run = run_notebook(
            copy, profile=profile, timeout_cell=timeout_cell, timeout_total=timeout_total,
            cwd=work, allow_errors=True,  # one broken cell must not cost the later exercises
            kernel_log=work / "kernel.log",  # a hundred kernels' start-up warnings help nobody
            env_extra={"COURSE_GRADE_REPORT": str(report), "COURSE_FIGURES": str(work / "figures")})
        records = read_report(report)
        crash = _log_tail(work / "kernel.log") if run.error and "died" in run.error.lower() else ""
    status = _status(run)
    scores, decided = score(exercises, records)
    cell_errors = [str(e) for e in run.cell_errors]
    cause = run.error if status != "ok" else None
    text = feedback_text(student, notebook, status, exercises, scores, decided, cause, cell_errors)
    if crash:
        text += "\nThe kernel's last words:\n" + crash
    return GradeRow(student, notebook, status, scores, time.monotonic() - start, text,
                    cell_errors=cell_errors)


def _log_tail(path: Path, n: int = 8) -> str:
    """The last ``n`` lines of a kernel's stderr (why it died), or ``""``."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line for line in lines if "running over TCP without encryption" not in line]
    return "".join(f"  {line}\n" for line in lines[-n:])


# --------------------------------------------------------------------------- a folder


def csv_header(exercises: Sequence[str]) -> list[str]:
    return [*FIXED_BEFORE, *exercises, *FIXED_AFTER]


def graded_students(out: Path, header: Sequence[str]) -> set[str]:
    """Students already in ``out`` (for ``--resume``); the header must match this grading."""
    with out.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        existing = next(reader, None)
        if existing is None:
            return set()
        if list(existing) != list(header):
            raise GradeError(f"{out}: its columns {existing} are not those of this grading "
                             f"{list(header)}; use another --out or drop --resume")
        return {row[0] for row in reader if row}


def list_submissions(folder: Path) -> list[Path]:
    """The ``*.ipynb`` files of ``folder`` (not recursive), sorted by name."""
    if not folder.is_dir():
        raise GradeError(f"{folder}: not a folder of submissions")
    return sorted(p for p in folder.glob("*.ipynb") if p.is_file())


def _grade_one(args: tuple) -> GradeRow:
    """Top-level so that a process pool can pickle it."""
    path, kwargs = args
    return grade_submission(path, **kwargs)


def _graded(paths: Sequence[Path], jobs: int, kwargs: dict) -> Iterable[GradeRow]:
    """Grade ``paths`` in order (``jobs == 1``) or in ``jobs`` processes, as they finish."""
    if jobs <= 1:
        for path in paths:
            yield grade_submission(path, **kwargs)
        return
    # spawn: a fresh interpreter per worker, no state forked from this process.
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        pending = [pool.submit(_grade_one, (p, kwargs)) for p in paths]
        for done in futures.as_completed(pending):
            yield done.result()


def grade_folder(submissions: Path, *, notebook: str, out: Path, exercises: Sequence[str] | None = None,
                 feedback_dir: Path | None = None, profile: str = "smoke",
                 timeout_cell: float = 60, timeout_total: float = 300, resume: bool = False,
                 jobs: int = 1, solution: Path | None = None, quiet: bool = False) -> list[GradeRow]:
    """Grade every submission in ``submissions`` into ``out`` (CSV) and per-student feedback.

    Rows are appended and flushed one by one.  With ``resume``, students already in ``out`` are
    skipped; without it ``out`` is started afresh.  Returns the rows graded by this call.
    """
    submissions, out = Path(submissions), Path(out)
    exercises = list(exercises) if exercises else exercise_ids(notebook, solution)
    header = csv_header(exercises)
    feedback_dir = Path(feedback_dir) if feedback_dir else out.parent / f"{out.stem}-feedback"
    paths = list_submissions(submissions)
    done = graded_students(out, header) if resume and out.exists() else set()
    todo = [p for p in paths if p.stem not in done]
    if not quiet and done:
        print(f"resuming: {len(done)} already graded, {len(todo)} to go")
    feedback_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    append = resume and out.exists() and out.stat().st_size > 0
    kwargs = dict(notebook=notebook, exercises=exercises, profile=profile,
                  timeout_cell=timeout_cell, timeout_total=timeout_total)
    rows: list[GradeRow] = []
    with out.open("a" if append else "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if not append:
            writer.writerow(header)
            f.flush()
        for row in _graded(todo, jobs, kwargs):
            fb = feedback_dir / f"{row.student}.txt"
            fb.write_text(row.feedback, encoding="utf-8")
            row.feedback_file = _relative(fb, out.parent)
            writer.writerow(row.csv_row(exercises))
            f.flush()  # an interrupted run keeps every row written so far
            rows.append(row)
            if not quiet:
                print(f"{row.status:8s} {row.total}/{row.max}  {row.seconds:6.1f} s  {row.student}",
                      flush=True)
    return rows


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.grade",
        description="Grade a folder of submitted notebooks: each runs on a copy, in a fresh kernel "
                    "with time limits; writes a CSV row per submission (as it goes) and a "
                    "feedback text per student.",
        epilog="status: ok (ran to the end), error (a cell raised), timeout (a cell or the "
               "notebook ran out of time), invalid (not a readable notebook). An exercise "
               "scores 1 only when the student's own code passed its check.")
    parser.add_argument("submissions", type=Path, help="folder of submitted *.ipynb files")
    parser.add_argument("--notebook", required=True, help="the notebook number, e.g. 01")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="CSV to write (grades.csv)")
    parser.add_argument("--feedback-dir", type=Path, default=None,
                        help="folder for <student>.txt feedback (default: <out stem>-feedback/)")
    parser.add_argument("--profile", default="smoke", help="COURSE_PROFILE for the runs (smoke)")
    parser.add_argument("--timeout-cell", type=float, default=60, help="seconds per cell (60)")
    parser.add_argument("--timeout-total", type=float, default=300, help="seconds per notebook (300)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and grade only the other students")
    parser.add_argument("--jobs", type=int, default=1, help="submissions graded at once (1)")
    parser.add_argument("--solution", type=Path, default=None,
                        help="solution notebook to read exercise ids from when the checks module "
                             "has no EXERCISES (default: solutions/<notebook>_*.ipynb)")
    parser.add_argument("--exercises", default=None,
                        help="comma-separated exercise ids, overriding both of the above")
    args = parser.parse_args(argv)
    exercises = [e.strip() for e in args.exercises.split(",") if e.strip()] if args.exercises else None
    notebook = args.notebook.zfill(2)
    try:
        rows = grade_folder(args.submissions, notebook=notebook, out=args.out, exercises=exercises,
                            feedback_dir=args.feedback_dir, profile=args.profile,
                            timeout_cell=args.timeout_cell, timeout_total=args.timeout_total,
                            resume=args.resume, jobs=args.jobs, solution=args.solution)
    except GradeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    print(f"graded {len(rows)} submissions into {args.out}: "
          + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
