"""Tests of course_utils.cache: one cache root, one run-folder naming."""

from __future__ import annotations

from pathlib import Path

import pytest

from course_utils.cache import cache_root, knobs_hash, run_dir


def test_cache_root_default_override_and_expansion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COURSE_CACHE", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "anchors-to-clip" and cache_root().is_dir()
    # an empty value means the default, never the current folder
    monkeypatch.setenv("COURSE_CACHE", "  ")
    assert cache_root() == tmp_path / "home" / ".cache" / "anchors-to-clip"
    monkeypatch.setenv("COURSE_CACHE", "~/elsewhere")
    assert cache_root() == tmp_path / "home" / "elsewhere" and cache_root().is_dir()
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "abs"))
    assert cache_root() == tmp_path / "abs"


def test_run_dir_names_stage_and_knobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    a = run_dir("03_detector_cpu", {"lr": 1e-3, "epochs": 18, "sizes": (1, 2)})
    assert a.parent == tmp_path / "runs" and a.name.startswith("03_detector_cpu_") and not a.exists()
    # key order and tuple-vs-list do not matter; every value does
    assert a == run_dir("03_detector_cpu", {"sizes": [1, 2], "epochs": 18, "lr": 1e-3})
    assert a != run_dir("03_detector_cpu", {"lr": 1e-3, "epochs": 19, "sizes": (1, 2)})
    assert a != run_dir("02_rpn_cpu", {"lr": 1e-3, "epochs": 18, "sizes": (1, 2)})
    assert len(a.name) == len("03_detector_cpu_") + 10
    made = run_dir("shapes", [1, 2], create=True)
    assert made.is_dir()
    with pytest.raises(ValueError, match="stage='a/b'"):
        run_dir("a/b", {})
    with pytest.raises(ValueError, match="stage=''"):
        run_dir("", {})


def test_knobs_hash_is_stable_and_checked() -> None:
    assert knobs_hash({"a": 1}) == knobs_hash({"a": 1}) != knobs_hash({"a": 2})
    assert len(knobs_hash([1], length=16)) == 16
    assert knobs_hash({"p": Path("/x")}) == knobs_hash({"p": "/x"})  # other objects count by str
    with pytest.raises(ValueError, match="length=2"):
        knobs_hash({}, length=2)
