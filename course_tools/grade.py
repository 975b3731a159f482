"""Grade a folder of submitted notebooks: scores from the grader alone, each submission sandboxed.

For each ``*.ipynb`` (any case) in the submissions folder:

1. its bytes are hashed; a copy runs in a fresh kernel inside the sandbox
   (:mod:`course_tools.sandbox`: no network, its own temporary folder as the only writable place,
   the submissions, CSV and feedback folders hidden, memory/CPU/file/process limits, every process
   it starts killed with it), in the ``smoke`` profile by default, with a per-cell and a
   per-notebook time limit.  This run gives the **status** and the cells that raised, nothing else;
2. the **scores** come from :mod:`course_tools.grade_scoring`: per check, the student's definitions
   alone run the check's cases in another sandboxed child, which returns outputs only, and this
   process compares them with the reference.  Handing over the reference scores 0;
3. the file is hashed again: a change is reported and the row marked (``integrity``).

The CSV is written one row per submission as soon as it is graded and flushed, so an interrupted
run keeps what it graded and ``--resume`` goes on with the others.  Each student also gets a
feedback text built from the grader's own comparisons and, when the notebook failed, the cause.

Usage::

    python -m course_tools.grade submissions/ --notebook 01 --out grades.csv [--jobs 2]

CSV columns: ``student`` (file name without ``.ipynb``), ``notebook``, ``status`` (``ok``: ran
to the end without error; ``error``: a cell raised; ``timeout``: a cell or the whole notebook
ran out of time; ``invalid``: not a readable notebook; ``crashed``: its grading process died),
one column per exercise (1 or 0), ``total``, ``max``, ``seconds`` (wall time), ``integrity``
(``ok``, or ``changed`` when the file changed while it was graded), ``isolation`` (``bwrap``, or
``none`` under ``--no-sandbox``) and ``feedback-file`` (relative to the CSV's folder).  No cell
starts with ``=``, ``+``, ``-`` or ``@`` (a quote is put first), so spreadsheets read no formula.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import multiprocessing
import multiprocessing.connection
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import sandbox
from .grade_scoring import CheckVerdict, check_calls, make_plan, score_notebook
from .nbrun import REPO_ROOT, RunResult, WrappedKernelManager, run_notebook

STATUSES = ("ok", "timeout", "error", "invalid", "crashed")
FIXED_BEFORE = ("student", "notebook", "status")
FIXED_AFTER = ("total", "max", "seconds", "integrity", "isolation", "feedback-file")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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
    names = [check.removeprefix("check_") for _, check, _ in check_calls(nb)]
    return list(dict.fromkeys(names))


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
    integrity: str = "ok"
    isolation: str = "bwrap"

    @property
    def total(self) -> int:
        return sum(self.scores.values())

    @property
    def max(self) -> int:
        return len(self.scores)

    def csv_row(self, exercises: Sequence[str]) -> list[str]:
        cells = ([self.student, self.notebook, self.status]
                 + [str(self.scores.get(e, 0)) for e in exercises]
                 + [str(self.total), str(self.max), f"{self.seconds:.1f}", self.integrity,
                    self.isolation, self.feedback_file])
        return [csv_safe(c) for c in cells]


def csv_safe(cell: str) -> str:
    """``cell`` as a spreadsheet shows it, never as a formula (OWASP's CSV-injection rule)."""
    return "'" + cell if cell.startswith(FORMULA_START) else cell


def _csv_unsafe(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell


def read_submission(data: bytes | Path) -> tuple[nbformat.NotebookNode | None, str | None]:
    """The notebook in ``data`` (bytes, or a path to read), or ``(None, why)`` when it is not one."""
    try:
        raw = data.read_bytes() if isinstance(data, Path) else data
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read the file: {exc}"
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # noqa: BLE001 - any nbformat failure means "not a notebook"
        return None, f"not a Jupyter notebook: {exc}"
    if not isinstance(nb.get("cells"), list):
        return None, "not a Jupyter notebook: it has no list of cells"
    return nb, None


def feedback_text(student: str, notebook: str, status: str, exercises: Sequence[str],
                  verdicts: dict[str, CheckVerdict], cause: str | None,
                  cell_errors: Sequence[str]) -> str:
    """The short text a student gets back."""
    total = sum(1 for e in exercises if e in verdicts and verdicts[e].passed)
    lines = [f"Notebook {notebook}, submission '{student}': {total}/{len(exercises)} exercises passed.",
             f"Status: {status}" + (f" ({cause})" if cause else "")]
    lines.append("")
    for exercise in exercises:
        v = verdicts.get(exercise)
        if v is None:
            lines.append(f"[ ] {exercise}: its check could not run (the grader has no check for it)")
        elif v.passed:
            lines.append(f"[x] {exercise}: passed all {v.n_cases} cases")
        elif not v.implemented:
            lines.append(f"[ ] {exercise}: not implemented yet")
        else:
            lines.append(f"[!] {exercise}: {v.n_failed} of {v.n_cases} cases failed")
            lines += [f"      - {m}" for m in v.messages[:8]]
    if cell_errors:
        lines += ["", "Cells that raised an error when the notebook ran:"]
        lines += [f"  - {e}" for e in cell_errors[:10]]
        if len(cell_errors) > 10:
            lines.append(f"  - ... and {len(cell_errors) - 10} more")
    return "\n".join(lines) + "\n"


def _status(run: RunResult) -> str:
    if run.timed_out:
        return "timeout"
    return "ok" if run.ok else "error"


@dataclass(frozen=True)
class Setup:
    """What every submission of one grading shares (picklable, for the worker processes)."""

    notebook: str
    exercises: tuple[str, ...]
    checks_module: str
    plan: tuple
    profile: str = "smoke"
    timeout_cell: float = 60
    timeout_total: float = 300
    isolation: str = "bwrap"
    hide: tuple[str, ...] = ()
    limits: sandbox.Limits = sandbox.Limits()


def _run_in_sandbox(copy: Path, work: Path, setup: Setup) -> RunResult:
    hide = [Path(h) for h in setup.hide]
    km = WrappedKernelManager(
        lambda cmd: sandbox.command(cmd, isolation=setup.isolation, work=work, hide=hide,
                                    limits=setup.limits),
        work, prepare=sandbox.prepare_work, kernel_name="python3")
    return run_notebook(copy, profile=setup.profile, timeout_cell=setup.timeout_cell,
                        timeout_total=setup.timeout_total, cwd=work,
                        allow_errors=True,  # one broken cell must not cost the later exercises
                        kernel_log=work.parent / "kernel.log",
                        kernel_manager=km, env=sandbox.minimal_env(work))


def grade_submission(path: Path, setup: Setup) -> GradeRow:
    """Grade one submission: its status from a sandboxed run of a copy, its scores from the
    grader's own comparisons, and whether the file changed meanwhile (``path`` is only read)."""
    student = _student_name(path)
    start = time.monotonic()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    exercises = list(setup.exercises)
    nb, why = read_submission(data)
    if nb is None:
        row = GradeRow(student, setup.notebook, "invalid", {e: 0 for e in exercises},
                       time.monotonic() - start,
                       feedback_text(student, setup.notebook, "invalid", exercises, {}, why, []),
                       isolation=setup.isolation)
        return _with_integrity(row, path, digest)
    # ignore_cleanup_errors: files a submission left read-only must not stop the grading.
    with tempfile.TemporaryDirectory(prefix="grade-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        copy = work / "submission.ipynb"
        copy.write_bytes(data)
        sandbox.prepare_work(work)
        run = _run_in_sandbox(copy, work, setup)
        crash = _log_tail(Path(tmp) / "kernel.log") if run.error and "died" in run.error.lower() else ""
    verdicts = score_notebook(nb, setup.plan, checks_module=setup.checks_module, exercises=exercises,
                              isolation=setup.isolation, hide=[Path(h) for h in setup.hide],
                              timeout=setup.timeout_cell, limits=setup.limits)
    status = _status(run)
    scores = {e: int(bool(verdicts.get(e) and verdicts[e].passed)) for e in exercises}
    cell_errors = [str(e) for e in run.cell_errors]
    cause = run.error if status != "ok" else None
    text = feedback_text(student, setup.notebook, status, exercises, verdicts, cause, cell_errors)
    if crash:
        text += "\nThe kernel's last words:\n" + crash
    row = GradeRow(student, setup.notebook, status, scores, time.monotonic() - start, text,
                   cell_errors=cell_errors, isolation=setup.isolation)
    return _with_integrity(row, path, digest)


def _with_integrity(row: GradeRow, path: Path, digest: str) -> GradeRow:
    try:
        after = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        after = "missing"
    if after != digest:
        row.integrity = "changed"
        row.feedback = row.feedback.replace("\n\n", "\nIntegrity: the submitted file changed while "
                                            "it was graded; the instructor has been told.\n\n", 1)
    return row


def _log_tail(path: Path, n: int = 8) -> str:
    """The last ``n`` lines of a kernel's stderr (why it died), or ``""``."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    # ipykernel's start-up banner (printed because the kernel runs behind a wrapper) is noise
    banner = ("running over TCP without encryption", "NOTE: When using the", "To exit, you will",
              '"quit" from a client', "To read more about this", "To connect another client",
              "--existing ", "ipython/ipython/issues/2049")
    lines = [line for line in lines if line.strip() and not any(b in line for b in banner)]
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
        return {_csv_unsafe(row[0]) for row in reader if row}


def _student_name(path: Path) -> str:
    return path.name[: -len(".ipynb")]


@dataclass
class Listing:
    """The submissions of a folder, and every other entry with the reason it is not graded."""

    submissions: list[Path]
    skipped: list[tuple[str, str]]
    collisions: list[tuple[str, ...]]


def list_folder(folder: Path) -> Listing:
    """Every ``*.ipynb`` file (suffix in any case, not recursive), sorted by name; every other
    entry gets a reason; names that differ only in case are reported (they collide on macOS and
    Windows file systems, and so would their feedback files)."""
    if not folder.is_dir():
        raise GradeError(f"{folder}: not a folder of submissions")
    subs, skipped = [], []
    for p in sorted(folder.iterdir()):
        name = p.name
        if p.is_symlink():
            skipped.append((name, "a symbolic link: submissions must be plain files"))
        elif p.is_dir():
            skipped.append((name, "a folder: submissions are read from the top level only"))
        elif not name.lower().endswith(".ipynb"):
            why = ("an .ipynb file saved with another extension: rename it to end in .ipynb"
                   if ".ipynb" in name.lower() else "not an .ipynb file")
            skipped.append((name, why))
        elif name.lower() == ".ipynb":
            skipped.append((name, "no student name before .ipynb"))
        else:
            subs.append(p)
    groups: dict[str, list[str]] = {}
    for p in subs:
        groups.setdefault(_student_name(p).lower(), []).append(p.name)
    return Listing(subs, skipped, [tuple(g) for g in groups.values() if len(g) > 1])


def list_submissions(folder: Path) -> list[Path]:
    """The submissions of ``folder`` (see :func:`list_folder`)."""
    return list_folder(folder).submissions


def _worker(conn: multiprocessing.connection.Connection, path: Path, setup: Setup) -> None:
    """Top-level so that a spawned process can run it: grade one submission, send the row."""
    conn.send(grade_submission(path, setup))
    conn.close()


def _crashed(path: Path, setup: Setup, seconds: float, why: str) -> GradeRow:
    student = _student_name(path)
    exercises = list(setup.exercises)
    return GradeRow(student, setup.notebook, "crashed", {e: 0 for e in exercises}, seconds,
                    feedback_text(student, setup.notebook, "crashed", exercises, {}, why, []),
                    isolation=setup.isolation)


def _graded(paths: Sequence[Path], jobs: int, setup: Setup) -> Iterable[GradeRow]:
    """Grade ``paths`` in order (``jobs == 1``), or each in its own process, ``jobs`` at a time,
    as they finish: a process that dies costs only its own row (status ``crashed``)."""
    if jobs <= 1:
        for path in paths:
            yield grade_submission(path, setup)
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, nothing forked from here
    todo = list(paths)
    running: dict = {}
    while todo or running:
        while todo and len(running) < jobs:
            path = todo.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(send, path, setup), daemon=True)
            proc.start()
            send.close()
            running[proc.sentinel] = (proc, recv, path, time.monotonic())
        ready = multiprocessing.connection.wait(
            [r[1] for r in running.values()] + list(running), timeout=5)
        for sentinel, (proc, recv, path, t0) in list(running.items()):
            if recv in ready or sentinel in ready:
                row = None
                try:
                    if recv.poll():
                        row = recv.recv()
                except (EOFError, OSError):
                    row = None
                if row is None and proc.is_alive():
                    continue  # the pipe woke first; the row follows
                proc.join(timeout=10)
                recv.close()
                del running[sentinel]
                yield row if row is not None else _crashed(
                    path, setup, time.monotonic() - t0,
                    f"its grading process died (exit code {proc.exitcode})")


def prepare(notebook: str, *, exercises: Sequence[str] | None = None, solution: Path | None = None,
            checks_module: str | None = None, profile: str = "smoke", timeout_cell: float = 60,
            timeout_total: float = 300, isolation: str = "bwrap", hide: Sequence[str] = (),
            limits: sandbox.Limits | None = None) -> Setup:
    """Everything a grading shares: exercises, the checks' plan, limits, isolation (checked)."""
    try:
        sandbox.require(isolation)
    except sandbox.SandboxError as exc:
        raise GradeError(str(exc)) from None
    solution = Path(solution) if solution is not None else solution_path(notebook)
    checks_module = checks_module or f"course_utils.checks.nb{notebook}"
    try:
        module = importlib.import_module(checks_module)
    except ModuleNotFoundError as exc:
        raise GradeError(f"no checks module {checks_module} for notebook {notebook} "
                         "(--checks names another)") from exc
    if not exercises:
        exercises = list(getattr(module, "EXERCISES", None) or exercise_ids(notebook, solution))
    plan = make_plan(nbformat.read(solution, as_version=4), checks_module)
    if not plan:
        raise GradeError(f"{solution}: no check cells calling {checks_module}'s check_* functions")
    return Setup(notebook, tuple(exercises), checks_module, tuple(plan), profile, timeout_cell,
                 timeout_total, isolation, tuple(hide), limits or sandbox.Limits())


def grade_folder(submissions: Path, *, notebook: str, out: Path, exercises: Sequence[str] | None = None,
                 feedback_dir: Path | None = None, profile: str = "smoke",
                 timeout_cell: float = 60, timeout_total: float = 300, resume: bool = False,
                 jobs: int = 1, solution: Path | None = None, quiet: bool = False,
                 isolation: str = "bwrap", checks_module: str | None = None,
                 limits: sandbox.Limits | None = None) -> list[GradeRow]:
    """Grade every submission in ``submissions`` into ``out`` (CSV) and per-student feedback.

    Rows are appended and flushed one by one.  With ``resume``, students already in ``out`` are
    skipped; without it ``out`` is started afresh.  ``isolation`` is ``"bwrap"`` (refused when
    the sandbox cannot run here) or ``"none"``.  Returns the rows graded by this call.
    """
    submissions, out = Path(submissions), Path(out)
    feedback_dir = Path(feedback_dir) if feedback_dir else out.parent / f"{out.stem}-feedback"
    if sandbox.hidden([submissions]) != (str(submissions.resolve()),):
        raise GradeError(f"{submissions}: the submissions folder holds the course's checkout or "
                         "its Python; put the submissions in a folder of their own")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (resume and out.exists()):
        out.write_text("", encoding="utf-8")  # exists from the start, so that it can be hidden
    hide = sandbox.hidden([submissions, out.parent, feedback_dir],
                          files=[out, out.parent / f"{out.stem}-not-graded.txt"])
    setup = prepare(notebook, exercises=exercises, solution=solution, checks_module=checks_module,
                    profile=profile, timeout_cell=timeout_cell, timeout_total=timeout_total,
                    isolation=isolation, hide=hide, limits=limits)
    exercises = list(setup.exercises)
    header = csv_header(exercises)
    listing = list_folder(submissions)
    done = graded_students(out, header) if resume and out.exists() else set()
    todo = [p for p in listing.submissions if _student_name(p) not in done]
    _say_listing(listing, feedback_dir, out, quiet)
    if not quiet and done:
        print(f"resuming: {len(done)} already graded, {len(todo)} to go")
    feedback_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    append = resume and out.exists() and out.stat().st_size > 0
    names = _feedback_names(listing.submissions)
    rows: list[GradeRow] = []
    with out.open("a" if append else "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if not append:
            writer.writerow(header)
            f.flush()
        for row in _graded(todo, jobs, setup):
            fb = feedback_dir / names[row.student]
            fb.write_text(row.feedback, encoding="utf-8")
            row.feedback_file = _relative(fb, out.parent)
            writer.writerow(row.csv_row(exercises))
            f.flush()  # an interrupted run keeps every row written so far
            rows.append(row)
            if not quiet:
                flag = "" if row.integrity == "ok" else "  (the file CHANGED while it was graded)"
                print(f"{row.status:8s} {row.total}/{row.max}  {row.seconds:6.1f} s  {row.student}{flag}",
                      flush=True)
    return rows


def _feedback_names(paths: Sequence[Path]) -> dict[str, str]:
    """One feedback file name per student, distinct even on case-insensitive file systems."""
    names, used = {}, set()
    for p in paths:
        student = _student_name(p)
        name, n = f"{student}.txt", 2
        while name.lower() in used:
            name, n = f"{student}-{n}.txt", n + 1
        used.add(name.lower())
        names[student] = name
    return names


def _say_listing(listing: Listing, feedback_dir: Path, out: Path, quiet: bool) -> None:
    """Report what is not graded, and why, on stderr and in ``<out stem>-not-graded.txt``."""
    lines = [f"not graded: {name}: {why}" for name, why in listing.skipped]
    lines += [f"warning: {' and '.join(g)} differ only in case: they are graded separately, but "
              "collide on case-insensitive file systems" for g in listing.collisions]
    report = out.parent / f"{out.stem}-not-graded.txt"
    if lines:
        out.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if not quiet:
            print("\n".join(lines), file=sys.stderr)
    elif report.exists():
        report.unlink()


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.grade",
        description="Grade a folder of submitted notebooks: each runs sandboxed, on a copy, in a "
                    "fresh kernel with time limits; scores come from the grader's own comparison "
                    "of the student's functions with the reference; writes a CSV row per "
                    "submission (as it goes) and a feedback text per student.",
        epilog="status: ok (ran to the end), error (a cell raised), timeout (a cell or the "
               "notebook ran out of time), invalid (not a readable notebook), crashed (its "
               "grading process died). An exercise scores 1 only when the student's own code "
               "passed its check.")
    parser.add_argument("submissions", type=Path, help="folder of submitted *.ipynb files")
    parser.add_argument("--notebook", required=True, help="the notebook number, e.g. 01")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="CSV to write (grades.csv)")
    parser.add_argument("--feedback-dir", type=Path, default=None,
                        help="folder for <student>.txt feedback (default: <out stem>-feedback/)")
    parser.add_argument("--profile", default="smoke", help="COURSE_PROFILE for the runs (smoke)")
    parser.add_argument("--timeout-cell", type=float, default=60, help="seconds per cell (60)")
    parser.add_argument("--timeout-total", type=float, default=300, help="seconds per notebook (300)")
    parser.add_argument("--memory-gb", type=float, default=8, help="memory per process (8 GB)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and grade only the other students")
    parser.add_argument("--jobs", type=int, default=1, help="submissions graded at once (1)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run submissions without isolation (only for code you trust)")
    parser.add_argument("--solution", type=Path, default=None,
                        help="solution notebook that says which checks run, in which order "
                             "(default: solutions/<notebook>_*.ipynb)")
    parser.add_argument("--checks", default=None,
                        help="module of the check functions (default: course_utils.checks.nb<notebook>)")
    parser.add_argument("--exercises", default=None,
                        help="comma-separated exercise ids, overriding the checks module's EXERCISES")
    args = parser.parse_args(argv)
    exercises = [e.strip() for e in args.exercises.split(",") if e.strip()] if args.exercises else None
    notebook = args.notebook.zfill(2)
    limits = sandbox.Limits(memory_bytes=int(args.memory_gb * (1 << 30)),
                            cpu_seconds=int(args.timeout_total) + 60)
    try:
        rows = grade_folder(args.submissions, notebook=notebook, out=args.out, exercises=exercises,
                            feedback_dir=args.feedback_dir, profile=args.profile,
                            timeout_cell=args.timeout_cell, timeout_total=args.timeout_total,
                            resume=args.resume, jobs=args.jobs, solution=args.solution,
                            isolation="none" if args.no_sandbox else "bwrap",
                            checks_module=args.checks, limits=limits)
    except GradeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    changed = sum(r.integrity != "ok" for r in rows)
    print(f"graded {len(rows)} submissions into {args.out}: "
          + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + (f"; {changed} CHANGED while graded" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
