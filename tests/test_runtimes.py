"""The banner's expected run time, read from recorded result files (a temporary results dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from course_utils.runtimes import expected_runtime, measured_seconds


@pytest.fixture
def results(tmp_path: Path) -> Path:
    cpu = {"metrics": {"threads": 1, "notebooks": {
        "01": {"seconds": 31.0, "after": None, "from_scratch_seconds": None},
        "05": {"seconds": 180.0, "after": "04", "from_scratch_seconds": 260.0},
        "08": {"seconds": None, "after": "07", "from_scratch_seconds": 400.0}}},
        "machine": {"cpu_count": 2}}
    full = {"machine": {"cpu_count": 2}, "metrics": {"notebooks": {
        "01_anchors_and_labelling": {"seconds": 18.2, "full_estimate": {"t4_minutes": 0.13}},
        "04_scan_cross_attention": {"seconds": 90.0, "full_estimate": {"t4_minutes": 17.38}},
        "06_clip_word_spotting_svt": {"seconds": None, "status": "error", "full_estimate": None}}}}
    (tmp_path / "runtimes_cpu.json").write_text(json.dumps(cpu))
    (tmp_path / "fullpath.json").write_text(json.dumps(full))
    return tmp_path


def test_measured_cpu_times(results: Path) -> None:
    assert expected_runtime("01 anchors", "cpu", "cpu", results_dir=results) == \
        "31 s measured on 2 CPU cores, 1 torch thread(s)"
    text = expected_runtime("05", "cpu", "cpu", results_dir=results)
    assert text.startswith("3 min measured") and "after notebook 04" in text and "4 min from an empty" in text
    assert "on cuda expect less" in expected_runtime("01", "cpu", "cuda", results_dir=results)
    # Only a from-scratch run recorded: no crash on seconds=None.
    assert expected_runtime("08", "cpu", "cpu", results_dir=results).startswith("7 min from an empty cache")
    assert measured_seconds("08", "cpu", results_dir=results) is None
    assert measured_seconds("08", "cpu", from_scratch=True, results_dir=results) == 400.0
    assert measured_seconds("05", "cpu", results_dir=results) == 180.0


def test_full_and_fullpath(results: Path) -> None:
    assert expected_runtime("04", "full", "cuda", results_dir=results).startswith("≈ 17 min on a Colab T4")
    assert expected_runtime("01", "full", "cuda", results_dir=results).startswith("≈ 1 min")
    assert expected_runtime("04", "full", "cpu", results_dir=results).startswith("not budgeted")
    assert expected_runtime("06", "full", "cuda", results_dir=results) == "not recorded for this profile"
    assert expected_runtime("01", "fullpath", "cpu", results_dir=results) == \
        "18 s measured on 2 CPU cores (make fullpath)"


def test_nothing_recorded(tmp_path: Path) -> None:
    assert expected_runtime("01", "cpu", "cpu", results_dir=tmp_path) == "not recorded for this profile"
    assert expected_runtime("01", "smoke", "cpu", results_dir=tmp_path) == "not recorded for this profile"
    assert measured_seconds("01", "cpu", results_dir=tmp_path) is None
    with pytest.raises(ValueError, match="two-digit number"):
        expected_runtime("test", "cpu", "cpu", results_dir=tmp_path)


def test_banner_has_expected_line_and_no_shell_syntax(capsys, monkeypatch) -> None:
    from course_utils.env import setup_notebook

    monkeypatch.setenv("COURSE_PROFILE", "smoke")
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    setup_notebook("01 test")
    out = capsys.readouterr().out
    assert "expected : " in out and "COURSE_PROFILE=" not in out
    assert "set-up cell" in out
