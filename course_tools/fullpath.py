"""Run every solution notebook in the ``fullpath`` profile and estimate its ``full`` footprint.

``fullpath`` is ``full``'s architectures, settings and code path with the smallest counts, so a
CPU machine proves that a Colab GPU student's notebook runs to the end.  For each notebook this
writes, to ``benchmarks/results/fullpath.json``:

* ``status`` and ``seconds`` of its ``fullpath`` run here, its peak host memory and the disk its
  cache grew by;
* the *estimated* T4 minutes, GPU GiB, host GB and disk GB of its ``full`` run
  (:mod:`course_tools.full_estimates`), checked against :data:`~course_tools.footprint.LIMITS`.

Exit status 1 when a notebook fails or an estimate is over a limit.  ``--headers`` then writes
those numbers into the ``full`` row of each solution notebook's header table (the notebooks'
prose is printed from results, never typed).  Usage::

    python -m course_tools.fullpath solutions/*.ipynb      # make fullpath
    python -m course_tools.fullpath --headers               # then make notebooks
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .footprint import LIMITS
from .nbrun import REPO_ROOT, run_notebook
from .report import write_result

#: how many of the last stack lines a notebook stopped for time prints
STACK_LINES = 400


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def run_one(path: Path, timeout_total: float) -> dict:
    """Execute one notebook in ``fullpath`` (in this process's kernel child) and measure it."""
    cache = Path(os.environ.get("COURSE_CACHE", REPO_ROOT / ".cache" / "fullpath"))
    before = _tree_bytes(cache)
    t = time.perf_counter()
    res = run_notebook(path, profile="fullpath", timeout_cell=timeout_total, timeout_total=timeout_total,
                       dump_stacks=True)
    seconds = time.perf_counter() - t
    # ru_maxrss of the children: the kernel, reaped when run_notebook shut it down (KiB on Linux)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"status": "ok" if res.ok else "failed", "error": res.error, "seconds": round(seconds, 1),
            "peak_rss_gb": round(rss / 1e9, 2), "cache_growth_gb": round((_tree_bytes(cache) - before) / 1e9, 3),
            **({"stacks": res.stacks} if res.stacks else {})}


def estimate_one(number: str) -> dict:
    from .full_estimates import estimate

    est = estimate(number)
    over = [k for k, limit in LIMITS.items() if est[k] > limit]
    return {**est, "limits": LIMITS, "over_limits": over}


def _child(args: list[str]) -> dict:
    """Run ``--one``/``--estimate`` in a fresh process (its own peak-memory counter) and parse it."""
    proc = subprocess.run([sys.executable, "-m", "course_tools.fullpath", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def with_host_memory(est: dict, row: dict) -> dict:
    """Add the fullpath kernel's peak RSS (the full run's models and code, as it held them) to the
    estimate's in-memory data, and check the limits again."""
    if "host_gb" in est:
        est["host_gb"] = round(est["host_gb"] + row.get("peak_rss_gb", 0.0), 2)
        est["host_basis"] = "peak RSS of the fullpath kernel + the full run's in-memory data"
        est["over_limits"] = [k for k, limit in LIMITS.items() if est[k] > limit]
    return est


def header_cell(row: dict) -> str:
    """The last cell of a header table's ``full`` row, from a notebook's ``fullpath.json`` entry."""
    e = row["full_estimate"]
    return (f"**estimated** for a Colab T4 (no GPU measured): ≈ {e['t4_minutes']:.0f} min, "
            f"{e['gpu_gib']:.1f} GiB GPU, {e['disk_gb']:.1f} GB disk; its code path runs on 2 CPU cores "
            f"in `fullpath` in {row['seconds']:.0f} s (`benchmarks/results/fullpath.json`)")


def write_headers(results: dict, solutions: Path = REPO_ROOT / "solutions") -> list[str]:
    """Rewrite the ``full`` row's last cell in each solution notebook's first cell; returns the
    notebooks changed."""
    from .nbbuild import set_run_time

    changed = []
    for stem, row in results["metrics"]["notebooks"].items():
        if "t4_minutes" not in row.get("full_estimate", {}):
            continue
        path = solutions / f"{stem}.ipynb"
        if set_run_time(path, "full", header_cell(row)):
            changed.append(path.name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="solution notebooks (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per notebook (900)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--estimate", help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--headers", action="store_true",
                        help="write fullpath.json's numbers into the solution notebooks' headers")
    args = parser.parse_args(argv)
    if args.headers:
        results_dir = args.results_dir or REPO_ROOT / "benchmarks" / "results"
        changed = write_headers(json.loads((results_dir / "fullpath.json").read_text()))
        print(f"headers updated: {changed or 'none'}")
        return 0
    if args.one:
        print(json.dumps(run_one(args.one, args.timeout)))
        return 0
    if args.estimate:
        print(json.dumps(estimate_one(args.estimate)))
        return 0
    notebooks = args.notebooks or sorted((REPO_ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
    rows, failed = {}, []
    results_dir = Path(args.results_dir) if args.results_dir else REPO_ROOT / "benchmarks" / "results"
    if args.notebooks and (results_dir / "fullpath.json").exists():
        # a run of some notebooks keeps the others' rows (in the notebooks' order below)
        rows = dict(json.loads((results_dir / "fullpath.json").read_text())["metrics"]["notebooks"])
    for nb in notebooks:
        number = nb.name[:2]
        print(f"== {nb.name} (fullpath)", flush=True)
        row = _child(["--one", str(nb), "--timeout", str(args.timeout)])
        print(f"   {row['status']} in {row.get('seconds', '?')} s" + (f": {row['error']}" if row.get("error") else ""),
              flush=True)
        stacks = row.pop("stacks", "")
        if stacks:  # where a notebook that ran out of time was stuck: kernel and workers
            print("   Python stacks when it was stopped:\n" + "\n".join(
                "   | " + line for line in stacks.splitlines()[-STACK_LINES:]), flush=True)
        est = row["full_estimate"] = with_host_memory(_child(["--estimate", number]), row)
        if row["status"] != "ok" or est.get("status") == "failed" or est.get("over_limits"):
            failed.append(number)
        if "t4_minutes" in est:
            print(f"   full, estimated: {est['t4_minutes']} min on a T4, {est['gpu_gib']} GiB GPU, "
                  f"{est['host_gb']} GB host, {est['disk_gb']} GB disk"
                  + (f"  OVER {est['over_limits']}" if est["over_limits"] else ""), flush=True)
        rows[nb.stem] = row
    rows = dict(sorted(rows.items()))
    total = round(sum(r.get("seconds", 0) for r in rows.values()), 1)
    table = [{"notebook": stem[:2], "experiment": "full profile on a Colab T4 (estimated, no GPU measured)",
              "metric": "minutes / GPU GiB / host GB / disk GB",
              "ours": "{t4_minutes} / {gpu_gib} / {host_gb} / {disk_gb}".format(**r["full_estimate"])}
             for stem, r in rows.items() if "t4_minutes" in r.get("full_estimate", {})]
    path = write_result("fullpath", profile="fullpath", paper=None, rows=table,
                        metrics={"notebooks": rows, "total_seconds": total, "limits": LIMITS},
                        extra={"gpu_measured": False, "timeout_per_notebook_s": args.timeout},
                        results_dir=args.results_dir)
    print(f"wrote {path}; fullpath total {total} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
