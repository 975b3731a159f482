"""Benchmark: how many notebook-01 submissions the grader gets through per minute (smoke profile).

Grades a folder of synthetic submissions, half the solved notebook and half the untouched student
version (built in memory from ``solutions/01_*.ipynb``), with ``course_tools.grade`` exactly as an
instructor would, sandbox on, once per ``--jobs`` value.  Then grades the hostile submissions of
``tests/fixtures/grading/attacks.py`` and records each one's row against the one it must get.
Writes ``benchmarks/results/grading.json`` with the isolation that ran.

    python benchmarks/grading.py [--n 8] [--jobs 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import nbformat  # noqa: E402

from course_tools import sandbox  # noqa: E402
from course_tools.grade import exercise_ids, grade_folder, solution_path  # noqa: E402
from course_tools.nbbuild import canonical_solution, dumps, make_student  # noqa: E402
from course_tools.report import write_result  # noqa: E402

NOTEBOOK = "01"
PROFILE = "smoke"
ISOLATION = "bwrap"


def make_submissions(folder: Path, n: int) -> None:
    """``n`` submissions alternating solved / untouched (the two ends of the real spread)."""
    path = solution_path(NOTEBOOK, ROOT)
    solution = canonical_solution(nbformat.read(path, as_version=4), path.name)
    versions = [dumps(solution), dumps(make_student(solution, path.name))]
    for i in range(n):
        (folder / f"student_{i:03d}.ipynb").write_text(versions[i % 2], encoding="utf-8")


def measure(n: int, jobs: int) -> dict:
    """Grade ``n`` submissions with ``jobs`` workers; return timings and a sanity summary."""
    with tempfile.TemporaryDirectory(prefix="grading-bench-") as tmp:
        folder = Path(tmp) / "submissions"
        folder.mkdir()
        make_submissions(folder, n)
        start = time.perf_counter()
        rows = grade_folder(folder, notebook=NOTEBOOK, out=Path(tmp) / "grades.csv",
                            profile=PROFILE, jobs=jobs, quiet=True, isolation=ISOLATION)
        wall = time.perf_counter() - start
    statuses = sorted({r.status for r in rows})
    if statuses != ["ok"] or len(rows) != n:
        raise SystemExit(f"grading went wrong: {len(rows)} rows, statuses {statuses}")
    full = sum(r.total == r.max for r in rows)
    return {"jobs": jobs, "submissions": n, "wall_s": round(wall, 2),
            "per_minute": round(60.0 * n / wall, 2),
            "mean_s_per_submission": round(sum(r.seconds for r in rows) / n, 2),
            "full_marks": full, "zero_marks": sum(r.total == 0 for r in rows)}


def attack_outcomes(jobs: int) -> dict[str, dict]:
    """Grade every attack once; each one's row next to the row it must get."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "grading"))
    from attacks import ATTACKS

    path = solution_path(NOTEBOOK, ROOT)
    solution = canonical_solution(nbformat.read(path, as_version=4), path.name)
    student = make_student(solution, path.name)
    with tempfile.TemporaryDirectory(prefix="grading-attacks-") as tmp:
        folder = Path(tmp) / "submissions"
        folder.mkdir()
        for name, attack in ATTACKS.items():
            nb = nbformat.from_dict(solution if attack["base"] == "solution" else student)
            for key, source in attack.get("replace", {}).items():
                nb.cells[_find(nb, key)].source = source
            at = _find(nb, attack.get("after") or "import ")
            for k, source in enumerate(attack.get("cells", [])):
                nb.cells.insert(at + 1 + k, nbformat.v4.new_code_cell(source.replace("{marker}", "bench")))
            (folder / f"{name}.ipynb").write_text(dumps(nb), encoding="utf-8")
        rows = grade_folder(folder, notebook=NOTEBOOK, out=Path(tmp) / "grades.csv", profile=PROFILE,
                            jobs=jobs, quiet=True, isolation=ISOLATION)
    out = {}
    for row in sorted(rows, key=lambda r: r.student):
        want = ATTACKS[row.student]["expected"]
        got = {"status": row.status, "scores": list(row.scores.values())}
        out[row.student] = {"got": got, "expected": want, "as_expected": got == want,
                            "integrity": row.integrity}
    return out


def _find(nb: nbformat.NotebookNode, text: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and text in c.source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="submissions per measurement (8)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2],
                        help="worker counts to measure (1 2)")
    args = parser.parse_args(argv)
    exercises = exercise_ids(NOTEBOOK)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    runs = []
    for jobs in args.jobs:
        run = measure(args.n, jobs)
        print(f"jobs={jobs}: {run['submissions']} submissions in {run['wall_s']:.1f} s -> "
              f"{run['per_minute']:.2f} per minute ({run['mean_s_per_submission']:.1f} s each)",
              flush=True)
        runs.append(run)
    attacks = attack_outcomes(max(args.jobs))
    for name, a in attacks.items():
        print(f"{name:24s} {'as expected' if a['as_expected'] else 'NOT AS EXPECTED'}: {a['got']}")
    best = max(runs, key=lambda r: r["per_minute"])
    rows = [{"notebook": NOTEBOOK, "experiment": f"grading submissions ({r['jobs']} at a time)",
             "metric": "submissions / minute", "ours": r["per_minute"], "paper": None}
            for r in runs]
    path = write_result(
        "grading", profile=PROFILE,
        metrics={"per_minute": best["per_minute"], "best_jobs": best["jobs"], "runs": runs,
                 "isolation": ISOLATION,
                 "attacks_as_expected": sum(a["as_expected"] for a in attacks.values()),
                 "attacks": len(attacks)},
        paper=None, rows=rows,
        extra={"exercises": exercises, "cpu_count": os.cpu_count(),
               # Other work on the machine slows grading down: say how busy it was.
               "load_average_1min_at_start": load_at_start,
               "submissions": "alternating solved / untouched notebook 01",
               "isolation": ISOLATION, "bwrap_available": sandbox.detect() == "bwrap",
               "attack_outcomes": attacks})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
