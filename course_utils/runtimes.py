"""How long a notebook is expected to take, from the measurements the repository records.

Two result files are read, both written by the course's own tools:

* ``benchmarks/results/runtimes_<profile>.json`` (``make reproduce`` for ``cpu``,
  ``make reproduce-check`` for ``smoke``): each notebook's measured seconds, in the order
  ``make reproduce`` runs them, with the torch thread count they ran with, and for a notebook that
  reuses an earlier one's cache also its time from an empty cache (``from_scratch_seconds``), which
  is what a fresh Colab runtime pays;
* ``benchmarks/results/fullpath.json`` (``make fullpath``): the ``full`` profile's estimate for a
  Colab T4 (no GPU is measured).

The banner of every notebook prints :func:`expected_runtime`; ``make reproduce`` uses
:func:`measured_seconds` for its "expected remaining" line.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def read_result(name: str, results_dir: Path | None = None) -> dict | None:
    """``benchmarks/results/<name>.json`` as a dict (``profile``, ``metrics``, ...), or None when
    it is missing or unreadable (a non-editable install has no ``benchmarks/`` folder)."""
    return _read(name, results_dir)


def _read(name: str, results_dir: Path | None) -> dict | None:
    path = Path(results_dir or RESULTS_DIR) / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # A non-editable install has no benchmarks/ folder: the banner then says "not recorded".
        return None


def _number(notebook: str) -> str:
    number = str(notebook).strip()[:2]
    if not number.isdigit():
        raise ValueError(f"notebook {notebook!r}: expected it to start with its two-digit number, e.g. '05 …'")
    return number


def measured_seconds(notebook: str, profile: str, *, from_scratch: bool = False,
                     results_dir: Path | None = None) -> float | None:
    """The recorded run time of ``notebook`` (``"05"`` or ``"05 query-agnostic …"``) in ``profile``.

    ``from_scratch``: the time from an empty cache where one was measured (otherwise the plain
    time, which for a notebook that needs no earlier cache is the same thing).
    ``None`` when nothing is recorded.
    """
    data = _read(f"runtimes_{profile}", results_dir)
    if not data:
        return None
    row = data.get("metrics", {}).get("notebooks", {}).get(_number(notebook))
    if not row:
        return None
    if from_scratch and row.get("from_scratch_seconds") is not None:
        return float(row["from_scratch_seconds"])
    # A row can hold only a from-scratch time (``reproduce --record`` from an empty cache).
    return None if row.get("seconds") is None else float(row["seconds"])


def _fullpath_row(number: str, results_dir: Path | None) -> tuple[dict, dict]:
    """``fullpath.json`` and notebook ``number``'s row in it (empty dicts where missing)."""
    data = _read("fullpath", results_dir) or {}
    for stem, row in data.get("metrics", {}).get("notebooks", {}).items():
        if stem.startswith(number):
            return data, row or {}
    return data, {}


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def expected_runtime(notebook: str, profile: str, device: str, *,
                     results_dir: Path | None = None) -> str:
    """One line for the banner: the expected run time of ``notebook`` in ``profile`` on ``device``
    (``"cpu"``, ``"cuda"``, ``"mps"``), saying whether it was measured or estimated and where."""
    number = _number(notebook)
    if profile == "full" or profile == "fullpath":
        data, row = _fullpath_row(number, results_dir)
        # A notebook that failed in fullpath has no estimate ("full_estimate": null).
        est = row.get("full_estimate") or {}
        if profile == "full" and device == "cuda" and "t4_minutes" in est:
            return (f"≈ {max(1, round(est['t4_minutes']))} min on a Colab T4 GPU "
                    "(estimated from the fullpath run; no GPU measured)")
        if profile == "full" and device != "cuda":
            return "not budgeted: full is meant for a GPU (choose 'cpu' on a CPU runtime)"
        if profile == "fullpath" and row.get("seconds"):
            cores = (data.get("machine") or {}).get("cpu_count", "?")
            return f"{_fmt(row['seconds'])} measured on {cores} CPU cores (make fullpath)"
        return "not recorded for this profile"
    data = _read(f"runtimes_{profile}", results_dir)
    row = (data or {}).get("metrics", {}).get("notebooks", {}).get(number)
    scratch = (row or {}).get("from_scratch_seconds")
    if not row or (row.get("seconds") is None and scratch is None):
        return "not recorded for this profile"
    cores = (data.get("machine") or {}).get("cpu_count", "?")
    threads = data.get("metrics", {}).get("threads", "?")
    where = f"measured on {cores} CPU cores, {threads} torch thread(s)"
    if row.get("seconds") is None:  # only a run from an empty cache was recorded
        text = f"{_fmt(scratch)} from an empty cache, {where}"
    else:
        text = f"{_fmt(row['seconds'])} {where}"
        if row.get("after"):
            text += f", after notebook {row['after']}"
            if scratch is not None:
                text += f"; {_fmt(scratch)} from an empty cache (a fresh Colab runtime)"
    if device != "cpu":
        text += f"; on {device} expect less"
    return text
