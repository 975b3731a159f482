"""The course cache: one root folder and one way to name what is kept in it.

Everything the course writes while it runs (generated datasets, pooled features, checkpoints,
downloads) lives under :func:`cache_root`; everything that depends on settings lives in a folder
named by :func:`run_dir`, ``<stage>_<hash of the knobs>``, so a changed profile never resumes
from, or reads, files made with other settings, while rerunning a notebook (or the benchmark after
the notebook) finds the finished work and does not redo it.

Environment:

* ``COURSE_CACHE``: the root (default ``~/.cache/anchors-to-clip``; ``~`` is expanded, an empty
  value means the default, never the current folder).

Whether the network may be used is decided once, in :func:`course_utils.registry.offline_mode`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CACHE", "cache_root", "knobs_hash", "run_dir"]

DEFAULT_CACHE = "~/.cache/anchors-to-clip"


def cache_root() -> Path:
    """``$COURSE_CACHE`` (or ``~/.cache/anchors-to-clip``), user-expanded and created if missing."""
    root = os.environ.get("COURSE_CACHE", "").strip() or DEFAULT_CACHE
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def knobs_hash(knobs: Any, length: int = 10) -> str:
    """The first ``length`` hex digits of the sha256 of ``knobs`` as canonical JSON.

    ``knobs`` is any JSON-able value (dicts are key-sorted; tuples count as lists; other objects
    by ``str``), so equal settings always give equal names.
    """
    if not 4 <= length <= 64:
        raise ValueError(f"knobs_hash: length={length}, expected 4..64")
    blob = json.dumps(knobs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_dir(stage: str, knobs: Any, *, create: bool = False) -> Path:
    """``<cache>/runs/<stage>_<knobs_hash(knobs)>``: the folder of one stage run with these knobs.

    Args:
        stage: a readable name, e.g. ``"03_detector_cpu"`` or ``"shapes"``; letters, digits,
            ``_``, ``-`` and ``.`` only (it becomes part of a file name).
        knobs: every setting that changes what the stage writes (profile sections, seed,
            starting weights).
        create: make the folder.
    """
    if not stage or not all(c.isalnum() or c in "_-." for c in stage):
        raise ValueError(f"run_dir: stage={stage!r}, expected letters, digits, '_', '-' or '.'")
    path = cache_root() / "runs" / f"{stage}_{knobs_hash(knobs)}"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
