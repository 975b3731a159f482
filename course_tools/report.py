"""Benchmark results: one JSON file per benchmark, and the README table built from them.

Every benchmark ends with :func:`write_result`, which writes ``benchmarks/results/<name>.json``
with the numbers, the rows the README shows, the profile and the machine they were measured on.
``python -m course_tools.report`` rewrites the README table between ``<!-- results:start -->``
and ``<!-- results:end -->`` from all those files; ``--check`` only says whether it is current.

Usage::

    from course_tools.report import write_result
    write_result("anchors", profile="cpu", metrics={"ratio": 0.8}, paper=None,
                 rows=[{"notebook": "01", "experiment": "labelling vs Matcher",
                        "metric": "time ratio", "ours": 0.8, "paper": None}])
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
README = REPO_ROOT / "README.md"
START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
ROW_KEYS = ("notebook", "experiment", "metric", "ours", "paper")
MISSING = "—"


class ReportError(ValueError):
    """A malformed result file or README (the message names the file and what is wrong)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the architecture where that is not readable.

    Recorded because training on one thread is bit-for-bit repeatable on one kind of CPU, not
    across kinds: other vector instructions round differently, and a long training run amplifies
    that into different last digits."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a number was measured: OS, CPU model and count, Python and torch versions, device."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
        else:
            info["device"] = "cpu"
    except ImportError:  # the report itself does not need torch
        info["torch"] = None
        info["device"] = "cpu"
    return info


def _validate_rows(name: str, rows: list[dict]) -> list[dict]:
    checked = []
    for i, row in enumerate(rows):
        missing = [k for k in ("notebook", "experiment", "metric", "ours") if k not in row]
        if missing:
            raise ReportError(f"result {name!r}: row {i} lacks {missing}; expected keys {ROW_KEYS}")
        unknown = set(row) - set(ROW_KEYS)
        if unknown:
            raise ReportError(f"result {name!r}: row {i} has unknown keys {sorted(unknown)}")
        checked.append({k: row.get(k) for k in ROW_KEYS})
    return checked


def write_result(name: str, *, profile: str, metrics: dict, paper: dict | None,
                 rows: list[dict], extra: dict | None = None,
                 results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` and return its path.

    Args:
        name: the benchmark's name (file stem), e.g. ``"anchors"``.
        profile: the profile the numbers were measured in.
        metrics: every number the benchmark measured (free form, JSON-serialisable).
        paper: the seed paper's numbers being compared with, or ``None``.
        rows: README table rows ``{"notebook", "experiment", "metric", "ours", "paper"}``.
        extra: anything else worth keeping (settings, sizes).
        results_dir: default ``benchmarks/results`` of this checkout.
    """
    if not name or "/" in name or name.startswith("."):
        raise ReportError(f"result name {name!r} must be a plain file stem like 'anchors'")
    data = {
        "name": name,
        "profile": profile,
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "metrics": metrics,
        "paper": paper,
        "rows": _validate_rows(name, rows),
        "extra": extra or {},
    }
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n",
                    encoding="utf-8")
    return path


def load_results(results_dir: Path | None = None) -> list[dict]:
    """Every ``*.json`` result, sorted by file name (clear error naming a malformed file)."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not valid JSON ({exc})") from exc
        for key in ("profile", "machine", "rows"):
            if key not in data:
                raise ReportError(f"{path}: has no {key!r} field; write it with report.write_result")
        data.setdefault("name", path.stem)
        results.append(data)
    return results


def _fmt(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, ``—`` for nothing, ``|`` escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _machine_label(machine: dict) -> str:
    device = machine.get("device", "cpu")
    cpus = machine.get("cpu_count")
    return f"{device}, {cpus} CPU" if cpus else str(device)


def results_table(results: list[dict]) -> str:
    """The README's markdown table: one line per row of every result, sorted by notebook."""
    lines = [
        "| notebook | experiment | metric | ours | paper | profile | machine |",
        "|---|---|---|---|---|---|---|",
    ]
    # Smoke numbers mean nothing; show a smoke result only for a benchmark that has no other
    # (grading, say, is measured in smoke by design).
    def base(data: dict) -> str:
        stem, _, suffix = data["name"].rpartition("_")
        return stem if stem and suffix == data["profile"] else data["name"]

    measured = {base(d) for d in results if d["profile"] != "smoke"}
    results = [d for d in results if d["profile"] != "smoke" or base(d) not in measured]
    entries = []
    for data in results:
        for order, row in enumerate(data["rows"]):
            entries.append((str(row.get("notebook", "")), data["name"], order, row, data))
    # Stable: by notebook, then benchmark name, then the benchmark's own row order.
    for notebook, _, _, row, data in sorted(entries, key=lambda e: e[:3]):
        cells = [notebook, row.get("experiment"), row.get("metric"), row.get("ours"),
                 row.get("paper"), data["profile"], _machine_label(data["machine"])]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if not entries:
        lines.append(f"| {MISSING} | no benchmark results yet | | | | | |")
    return "\n".join(lines)


def render_readme(text: str, table: str, *, where: str = "README.md") -> str:
    """``text`` with everything between the results markers replaced by ``table``."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ReportError(f"{where}: needs the lines {START_MARKER} and {END_MARKER} (in that "
                          "order) around the results table")
    return text[: start + len(START_MARKER)] + "\n" + table + "\n" + text[end:]


def has_markers(text: str) -> bool:
    """Whether a README has the results markers (the table is only managed when it does)."""
    return START_MARKER in text and END_MARKER in text


def update_readme(readme: Path | None = None, results_dir: Path | None = None, *,
                  check: bool = False) -> bool:
    """Regenerate the README table; return whether the README was (or, with ``check``, would
    be) changed."""
    readme = Path(readme) if readme is not None else README
    text = readme.read_text(encoding="utf-8")
    new = render_readme(text, results_table(load_results(results_dir)), where=str(readme))
    if new == text:
        return False
    if not check:
        readme.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.report",
        description="Regenerate the README results table from benchmarks/results/*.json.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the README table is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    try:
        changed = update_readme(args.readme, args.results, check=args.check)
    except (ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print("README results table is out of date: run `python -m course_tools.report`"
              if changed else "README results table is up to date")
        return 1 if changed else 0
    print(f"updated {args.readme}" if changed else f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
