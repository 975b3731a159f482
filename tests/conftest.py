"""Test-wide settings: the smoke profile, no network, a private cache."""

from __future__ import annotations

import os
import tempfile

# Set before any course_utils import so every module sees the same environment.
os.environ.setdefault("COURSE_PROFILE", "smoke")
os.environ.setdefault("COURSE_OFFLINE", "1")
os.environ.setdefault("COURSE_CACHE", tempfile.mkdtemp(prefix="course-cache-"))
os.environ.setdefault("COURSE_FIGURES", os.path.join(os.environ["COURSE_CACHE"], "figures"))
os.environ.setdefault("MPLBACKEND", "Agg")

# The grader's fixture notebooks are inputs of tests/test_grade.py (one is not even valid JSON);
# nbval must not collect them as notebooks to execute.
collect_ignore_glob = ["fixtures/*"]
