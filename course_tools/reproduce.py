"""Execute the solution notebooks in order with a pinned thread count, and say how far along it is.

``make reproduce`` runs every solution notebook (auto profile) through this driver, then the
benchmarks; ``make reproduce-check`` runs the ``smoke`` notebooks twice, from callers with
different thread settings, and compares their outputs.

Why a pinned thread count: several trainings (notebook 03's detector most of all) sum in a
different order with one torch thread than with two, and end a few thousandths apart.  The
committed outputs and ``benchmarks/results/*_cpu.json`` were made with one thread, so every
kernel and benchmark started from here gets ``OMP_NUM_THREADS=1`` (``--threads``) whatever the
caller's environment says.  One thread also keeps a notebook's speed on a busy 2-core machine:
two threads wait for each other whenever the other core is taken.

What it prints: before each notebook its place, the time so far and the expected remaining time
(from ``benchmarks/results/runtimes_<profile>.json``, the previous measured run); a line every
``--heartbeat`` seconds while a notebook runs; its time when it ends; the total at the end.  With
``--record`` it writes the measured times back to ``runtimes_<profile>.json``.

Usage::

    python -m course_tools.reproduce solutions/*.ipynb --profile auto --inplace --record
    python -m course_tools.reproduce solutions/05_*.ipynb solutions/08_*.ipynb --from-scratch --record
    python -m course_tools.reproduce solutions/*.ipynb --profile smoke --out .cache/repro-a
    python -m course_tools.reproduce --compare .cache/repro-a .cache/repro-b
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat

from .nbbuild import set_run_time
from .nbrun import REPO_ROOT, run_notebook

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Notebooks that start from an earlier notebook's cache when it is there (features, SCAN's
# checkpoints; the fine-tuned CLIP).  Their plain time is "after"; a fresh Colab runtime, which
# has no cache, pays the from-scratch time.
AFTER = {"05": "04", "08": "07"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """The environment variables that pin torch's intra-op threads (read when torch starts)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return dict.fromkeys(THREAD_VARS, str(threads))


def fmt_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def expected_times(notebooks: list[Path], profile: str, results_dir: Path = RESULTS_DIR,
                   from_scratch: bool = False) -> dict[str, float | None]:
    """Each notebook's (``NN``) recorded seconds in ``profile``, ``None`` where none is recorded."""
    from course_utils.runtimes import measured_seconds

    return {nb.name[:2]: measured_seconds(nb.name[:2], profile, from_scratch=from_scratch,
                                          results_dir=results_dir) for nb in notebooks}


def remaining_text(expected: dict[str, float | None], todo: list[str]) -> str:
    """"about N min left" from the recorded times of the notebooks still to run."""
    known = [expected[n] for n in todo if expected.get(n) is not None]
    if not todo:
        return "nothing left"
    if not known:
        return "remaining time unknown (no recorded run)"
    text = f"about {fmt_duration(sum(known))} left"
    if len(known) < len(todo):
        text += f" (+ {len(todo) - len(known)} notebook(s) never timed)"
    return text


class _Heartbeat:
    """Prints ``… still running (elapsed / expected)`` every ``every`` seconds."""

    def __init__(self, label: str, expected: float | None, every: float) -> None:
        self.label, self.expected, self.every = label, expected, every
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Heartbeat:
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            elapsed = time.monotonic() - self._start
            of = f" of about {fmt_duration(self.expected)}" if self.expected else ""
            print(f"      … {self.label} still running: {fmt_duration(elapsed)}{of}", flush=True)


def record(profile: str, seconds: dict[str, float], threads: int, *, from_scratch: bool,
           results_dir: Path = RESULTS_DIR) -> Path:
    """Merge measured times into ``runtimes_<profile>.json`` (other notebooks' rows are kept)."""
    from .report import write_result

    path = Path(results_dir) / f"runtimes_{profile}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rows = dict(old.get("metrics", {}).get("notebooks", {}))
    for number, s in seconds.items():
        row = dict(rows.get(number, {"seconds": None}))
        row["after"] = AFTER.get(number)
        if from_scratch:
            if row["after"] is None:
                row["seconds"] = round(s, 1)  # nothing to reuse: the same run
            row["from_scratch_seconds"] = round(s, 1)
        else:
            row["seconds"] = round(s, 1)
            row.setdefault("from_scratch_seconds", None)
        rows[number] = row
    rows = dict(sorted(rows.items()))
    total = round(sum(r["seconds"] for r in rows.values() if r.get("seconds") is not None), 1)
    table = [{"notebook": "all", "experiment": f"make reproduce, {profile} profile, "
              f"{threads} torch thread(s)", "metric": "seconds, every notebook in order",
              "ours": total, "paper": None}] if profile == "cpu" and len(rows) >= 8 else []
    return write_result(f"runtimes_{profile}", profile=profile, paper=None, rows=table,
                        metrics={"threads": threads, "notebooks": rows, "total_seconds": total},
                        extra={"note": "measured by course_tools.reproduce; 'after' names the notebook "
                                       "whose cache a run reused, from_scratch_seconds is from an "
                                       "empty cache"},
                        results_dir=results_dir)


def header_cell(row: dict, cores: int | str, threads: int) -> str:
    """The last cell of a header table's ``cpu`` row, from a ``runtimes_cpu.json`` row."""
    text = (f"{fmt_duration(row['seconds'])} measured by `make reproduce` ({cores} CPU cores, "
            f"{threads} torch thread{'s' if threads != 1 else ''})")
    if row.get("after"):
        text += f" after notebook {row['after']}, whose cache it reuses"
        if row.get("from_scratch_seconds") is not None:
            text += f"; {fmt_duration(row['from_scratch_seconds'])} from an empty cache (a fresh Colab runtime)"
    return text + " (`benchmarks/results/runtimes_cpu.json`)"


def write_headers(results_dir: Path = RESULTS_DIR, solutions: Path = REPO_ROOT / "solutions") -> list[str]:
    """Rewrite the ``cpu`` row's last cell in each solution's header from ``runtimes_cpu.json``;
    returns the notebooks changed."""
    path = Path(results_dir) / "runtimes_cpu.json"
    data = json.loads(path.read_text())
    cores = data.get("machine", {}).get("cpu_count", "?")
    threads = data["metrics"]["threads"]
    changed = []
    for nb_path in sorted(Path(solutions).glob("[0-9][0-9]_*.ipynb")):
        row = data["metrics"]["notebooks"].get(nb_path.name[:2])
        if not row or row.get("seconds") is None:
            continue
        if set_run_time(nb_path, "cpu", header_cell(row, cores, threads)):
            changed.append(nb_path.name)
    return changed


def run_all(notebooks: list[Path], *, profile: str, threads: int = 1, inplace: bool = False,
            out: Path | None = None, figures: Path | None = None, cache: Path | None = None,
            from_scratch: bool = False, heartbeat: float = 60.0, timeout_cell: float = 1200,
            timeout_total: float = 3600, results_dir: Path = RESULTS_DIR) -> tuple[dict[str, float], list[str]]:
    """Run ``notebooks`` in order; returns (seconds per ``NN`` that ran cleanly, failures).

    ``out``: write each executed notebook there (with ``cache`` and ``figures`` defaulting to
    ``out/cache`` and ``out/figures``) instead of ``inplace``.  ``from_scratch``: each notebook
    gets an empty cache of its own.
    """
    expected = expected_times(notebooks, profile, results_dir, from_scratch)
    extra = thread_env(threads)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cache = cache or out / "cache"
        figures = figures or out / "figures"
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        extra["COURSE_FIGURES"] = str(figures.resolve())
    if cache is not None:
        extra["COURSE_CACHE"] = str(Path(cache).resolve())
    print(f"reproduce: {len(notebooks)} notebook(s), profile {profile}, {threads} torch thread(s) "
          f"({', '.join(f'{k}={v}' for k, v in thread_env(threads).items())}); "
          f"{remaining_text(expected, list(expected))}", flush=True)
    start = time.monotonic()
    seconds: dict[str, float] = {}
    failures: list[str] = []
    for i, nb in enumerate(notebooks):
        number = nb.name[:2]
        todo = [n.name[:2] for n in notebooks[i:]]
        print(f"[{i + 1}/{len(notebooks)}] {nb.name}: {fmt_duration(time.monotonic() - start)} so far, "
              f"{remaining_text(expected, todo)}", flush=True)
        env = dict(extra)
        scratch = None
        if from_scratch:
            scratch = tempfile.TemporaryDirectory(prefix=f"reproduce-{number}-")
            env["COURSE_CACHE"] = scratch.name
        save_to = (out / nb.name) if out is not None else (nb if inplace else None)
        # the kernel's own stderr (start-up warnings) goes to a log, shown when the notebook fails
        log = Path(tempfile.mkstemp(prefix=f"reproduce-{number}-", suffix=".log")[1])
        with _Heartbeat(nb.name, expected.get(number), heartbeat):
            result = run_notebook(nb, profile=profile, timeout_cell=timeout_cell,
                                  timeout_total=timeout_total, env_extra=env, save_to=save_to,
                                  kernel_log=log)
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        log.unlink(missing_ok=True)
        if scratch is not None:
            scratch.cleanup()
        if result.ok:
            seconds[number] = result.seconds
            was = expected.get(number)
            print(f"      ok in {fmt_duration(result.seconds)}"
                  + (f" (recorded: {fmt_duration(was)})" if was else ""), flush=True)
        else:
            failures.append(nb.name)
            print(f"      FAILED after {fmt_duration(result.seconds)}: {result.error}", flush=True)
            for line in tail:
                print(f"      kernel: {line}", flush=True)
    print(f"reproduce: {len(seconds)}/{len(notebooks)} ok in {fmt_duration(time.monotonic() - start)}"
          + (f"; FAILED: {', '.join(failures)}" if failures else ""), flush=True)
    return seconds, failures


def run_benchmarks(threads: int = 1, folder: Path = REPO_ROOT / "benchmarks") -> list[str]:
    """Run every ``benchmarks/*.py`` with the pinned threads, printing progress; returns failures."""
    scripts = sorted(folder.glob("*.py"))
    env = {**os.environ, **thread_env(threads), "MPLBACKEND": "Agg"}
    start, failures = time.monotonic(), []
    for i, script in enumerate(scripts):
        print(f"[benchmark {i + 1}/{len(scripts)}] {script.name}: "
              f"{fmt_duration(time.monotonic() - start)} so far", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO_ROOT)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"      {status} in {fmt_duration(time.monotonic() - t0)}", flush=True)
        if proc.returncode:
            failures.append(script.name)
    return failures


# --------------------------------------------------------------------------- comparing two runs

# What legitimately differs between two runs: wall times and speeds, and where the cache lies.
_TIMING = re.compile(
    r"\d+(?:[.,]\d+)?(?:e[-+]?\d+)?\s*(?:ms|µs|us|s|sec|seconds|min|minutes|h|it/s|s/it|"
    r"images/s|img/s|queries/s|/s)\b", re.IGNORECASE)
# speed ratios: "4.4x", "49× faster"
_SPEEDUP = re.compile(r"\b\d+(?:\.\d+)?\s*(?:×|x)(?![\w])", re.IGNORECASE)
# shares of a time: "(71% of its end-to-end time)"
_TIME_SHARE = re.compile(r"\d+(?:\.\d+)?%(?= of [^)\n]*time)")
# A cell that reports wall times or memory carries this tag: its pictures are not compared, and
# neither are its decimal numbers, which are times in tables whose header holds the unit
# ("SCAN s", "seconds") or ratios of times.
TIMINGS_TAG = "timings"
_DECIMAL = re.compile(r"\d*\.\d+")


def normalise_text(text: str, cache: str | None = None, timings: bool = False) -> str:
    """``text`` with wall times, speeds and the cache folder masked (every decimal if ``timings``)."""
    if cache:
        text = text.replace(cache, "<cache>")
    text = _TIME_SHARE.sub("<share>", _TIMING.sub("<time>", text))
    text = _SPEEDUP.sub("<speed-up>", text)
    if timings:
        text = _DECIMAL.sub("<time>", text)
    # column padding follows the width of the (masked) times
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def output_digest(nb: nbformat.NotebookNode, cache: str | None = None) -> list[tuple[int, str, str]]:
    """``(cell index, kind, normalised content)`` of every cell's stdout, results and figures."""
    rows: dict[tuple[int, str], list[str]] = {}
    timing_cells = set()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        timings = TIMINGS_TAG in cell.get("metadata", {}).get("tags", [])
        if timings:
            timing_cells.add(index)
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            data = output.get("data", {})
            if kind == "stream" and output.get("name") == "stdout":
                # a stream arrives in pieces, split differently from run to run: join per cell
                rows.setdefault((index, "stdout"), []).append(output.get("text", ""))
            elif kind in ("execute_result", "display_data") and "image/png" in data:
                digest = ("<figure of timings>" if timings else
                          hashlib.sha256(base64.b64decode(data["image/png"])).hexdigest()[:16])
                rows.setdefault((index, "image/png"), []).append(digest + "\n")
            elif kind in ("execute_result", "display_data") and "text/plain" in data:
                rows.setdefault((index, "text/plain"), []).append(data["text/plain"] + "\n")
    return [(i, k, normalise_text("".join(v), cache, timings=i in timing_cells))
            for (i, k), v in rows.items()]


def compare_runs(a: Path, b: Path) -> list[str]:
    """The differences between two folders of executed notebooks (empty: the same outputs).

    Each folder is an ``--out`` of :func:`run_all`, with its cache in ``<folder>/cache``.
    """
    problems = []
    names_a = sorted(p.name for p in Path(a).glob("[0-9][0-9]_*.ipynb"))
    names_b = sorted(p.name for p in Path(b).glob("[0-9][0-9]_*.ipynb"))
    if names_a != names_b or not names_a:
        return [f"different or no notebooks: {names_a} vs {names_b}"]
    for name in names_a:
        da = output_digest(nbformat.read(Path(a) / name, 4), str((Path(a) / "cache").resolve()))
        db = output_digest(nbformat.read(Path(b) / name, 4), str((Path(b) / "cache").resolve()))
        if len(da) != len(db):
            problems.append(f"{name}: {len(da)} vs {len(db)} outputs")
            continue
        for (ia, ka, ca), (ib, kb, cb) in zip(da, db):
            if (ia, ka, ca) != (ib, kb, cb):
                la, lb = ca.splitlines(), cb.splitlines()
                first = next((j for j in range(max(len(la), len(lb)))
                              if j >= len(la) or j >= len(lb) or la[j] != lb[j]), 0)
                show_a = la[first] if first < len(la) else "<end>"
                show_b = lb[first] if first < len(lb) else "<end>"
                problems.append(f"{name} cell {ia} {ka}: {show_a[:160]!r} vs {show_b[:160]!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_tools.reproduce",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--profile", default="auto", help="smoke, cpu, full or auto (default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every kernel (1)")
    parser.add_argument("--inplace", action="store_true", help="save each notebook back with its outputs")
    parser.add_argument("--out", type=Path, help="save executed notebooks here (cache and figures inside)")
    parser.add_argument("--from-scratch", action="store_true", help="each notebook with an empty cache")
    parser.add_argument("--record", action="store_true", help="write the times to runtimes_<profile>.json")
    parser.add_argument("--benchmarks", action="store_true", help="then run benchmarks/*.py")
    parser.add_argument("--headers", action="store_true",
                        help="write runtimes_cpu.json's times into the solutions' header tables")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds between progress lines (60)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="compare two --out folders instead of running")
    args = parser.parse_args(argv)

    if args.compare:
        problems = compare_runs(*args.compare)
        for p in problems:
            print("DIFFERENT", p)
        n = len(list(args.compare[0].glob("[0-9][0-9]_*.ipynb")))
        print(f"compared {n} notebooks: " + ("identical outputs (timings and cache paths aside)"
                                             if not problems else f"{len(problems)} difference(s)"))
        return 1 if problems else 0
    if not args.notebooks and not args.benchmarks:
        parser.error("give the notebooks to run (e.g. solutions/*.ipynb), --benchmarks, or --compare A B")
    from course_utils.profiles import resolve_profile_name

    profile = resolve_profile_name(args.profile)
    start = time.monotonic()
    seconds, failures = {}, []
    if args.notebooks:
        seconds, failures = run_all(sorted(args.notebooks), profile=profile, threads=args.threads,
                                    inplace=args.inplace, out=args.out,
                                    figures=None if args.out else Path(os.environ.get(
                                        "COURSE_FIGURES", REPO_ROOT / "figures")),
                                    from_scratch=args.from_scratch, heartbeat=args.heartbeat)
    if args.record and seconds:
        print(f"recorded in {record(profile, seconds, args.threads, from_scratch=args.from_scratch)}")
    if args.headers and not failures and (RESULTS_DIR / "runtimes_cpu.json").exists():
        print(f"headers updated: {write_headers() or 'none'}")
    if args.benchmarks and not failures:
        failures += run_benchmarks(args.threads)
    print(f"total: {fmt_duration(time.monotonic() - start)}"
          + (f"; FAILED: {', '.join(failures)}" if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
