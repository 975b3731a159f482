"""Benchmark: how many notebook-01 submissions the grader gets through per minute (smoke profile).

Grades a folder of synthetic submissions, half the solved notebook and half the untouched student
version (built in memory from ``solutions/01_*.ipynb``), with ``course_tools.grade`` exactly as an
instructor would, once per ``--jobs`` value, and writes ``benchmarks/results/grading.json``.

    python benchmarks/grading.py [--n 4] [--jobs 1 2]
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

from course_tools.grade import exercise_ids, grade_folder, solution_path  # noqa: E402
from course_tools.nbbuild import canonical_solution, dumps, make_student  # noqa: E402
from course_tools.report import write_result  # noqa: E402

NOTEBOOK = "01"
PROFILE = "smoke"


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
                            profile=PROFILE, jobs=jobs, quiet=True)
        wall = time.perf_counter() - start
    statuses = sorted({r.status for r in rows})
    if statuses != ["ok"] or len(rows) != n:
        raise SystemExit(f"grading went wrong: {len(rows)} rows, statuses {statuses}")
    full = sum(r.total == r.max for r in rows)
    return {"jobs": jobs, "submissions": n, "wall_s": round(wall, 2),
            "per_minute": round(60.0 * n / wall, 2),
            "mean_s_per_submission": round(sum(r.seconds for r in rows) / n, 2),
            "full_marks": full, "zero_marks": sum(r.total == 0 for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="submissions per measurement (4)")
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
    best = max(runs, key=lambda r: r["per_minute"])
    rows = [{"notebook": NOTEBOOK, "experiment": f"grading submissions ({r['jobs']} at a time)",
             "metric": "submissions / minute", "ours": r["per_minute"], "paper": None}
            for r in runs]
    path = write_result(
        "grading", profile=PROFILE,
        metrics={"per_minute": best["per_minute"], "best_jobs": best["jobs"], "runs": runs},
        paper=None, rows=rows,
        extra={"exercises": exercises, "cpu_count": os.cpu_count(),
               # Other work on the machine slows grading down: say how busy it was.
               "load_average_1min_at_start": load_at_start,
               "submissions": "alternating solved / untouched notebook 01"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
