"""Benchmark result files and the README results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from course_tools import report
from course_tools.report import ReportError, write_result

REPO = Path(__file__).resolve().parents[1]
README_TEMPLATE = "# Course\n\n## Results\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\nAfter.\n"


def _row(notebook: str, ours: object, paper: object = None) -> dict:
    return {"notebook": notebook, "experiment": f"exp {notebook}", "metric": "R@1",
            "ours": ours, "paper": paper}


def test_write_result_adds_machine_and_timestamp(tmp_path: Path) -> None:
    path = write_result("demo", profile="smoke", metrics={"speed": 1.5}, paper={"R@1": 0.4},
                        rows=[_row("03", 0.123456, 0.4)], extra={"n": 3}, results_dir=tmp_path)
    assert path == tmp_path / "demo.json"
    data = json.loads(path.read_text())
    assert data["profile"] == "smoke" and data["metrics"] == {"speed": 1.5}
    assert data["paper"] == {"R@1": 0.4} and data["extra"] == {"n": 3}
    for key in ("platform", "cpu_count", "torch", "device"):
        assert key in data["machine"]
    assert data["timestamp"].endswith("Z") and data["timestamp"][:2] == "20"
    assert data["rows"] == [_row("03", 0.123456, 0.4)]


def test_bad_rows_and_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"row 0 lacks \['ours'\]"):
        write_result("x", profile="cpu", metrics={}, paper=None,
                     rows=[{"notebook": "01", "experiment": "e", "metric": "m"}], results_dir=tmp_path)
    with pytest.raises(ReportError, match="plain file stem"):
        write_result("../x", profile="cpu", metrics={}, paper=None, rows=[], results_dir=tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ReportError, match="broken.json: not valid JSON"):
        report.load_results(tmp_path)


def test_table_sorted_by_notebook_with_profile_and_machine(tmp_path: Path) -> None:
    write_result("zeta", profile="cpu", metrics={}, paper=None,
                 rows=[_row("01", 2), _row("05", "fast | ok")], results_dir=tmp_path)
    write_result("alpha", profile="smoke", metrics={}, paper=None,
                 rows=[_row("03", 0.5, 0.61)], results_dir=tmp_path)
    table = report.results_table(report.load_results(tmp_path))
    lines = table.splitlines()
    assert lines[0].startswith("| notebook | experiment | metric | ours | paper | profile | machine")
    body = lines[2:]
    assert [line.split("|")[1].strip() for line in body] == ["01", "03", "05"]
    assert "| 2 | — | cpu |" in body[0]          # no paper number: a dash
    assert "| 0.5 | 0.61 | smoke |" in body[1]
    assert "fast \\| ok" in body[2]              # a pipe cannot break the table
    assert all("CPU" in line for line in body)


def test_readme_regenerated_between_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README_TEMPLATE)
    write_result("one", profile="cpu", metrics={}, paper=None, rows=[_row("01", 1.0)],
                 results_dir=tmp_path / "results")
    args = ["--readme", str(readme), "--results", str(tmp_path / "results")]
    assert report.main(args + ["--check"]) == 1
    assert readme.read_text() == README_TEMPLATE  # --check writes nothing
    assert report.main(args) == 0
    text = readme.read_text()
    assert "old table" not in text and "| 01 | exp 01 | R@1 | 1 | — | cpu |" in text
    assert text.startswith("# Course\n") and text.endswith("<!-- results:end -->\n\nAfter.\n")
    assert report.main(args + ["--check"]) == 0
    assert report.main(args) == 0 and readme.read_text() == text  # idempotent


def test_readme_without_markers_is_a_clear_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert report.main(["--readme", str(readme), "--results", str(tmp_path), "--check"]) == 2
    with pytest.raises(ReportError, match="results:start"):
        report.update_readme(readme, tmp_path)


def test_real_readme_table_is_up_to_date() -> None:
    """The README's results table must be what benchmarks/results/*.json say."""
    readme = REPO / "README.md"
    if not readme.exists() or not report.has_markers(readme.read_text(encoding="utf-8")):
        pytest.skip("README has no results markers yet")
    assert not report.update_readme(readme, REPO / "benchmarks" / "results", check=True), (
        "README results table differs from benchmarks/results/*.json: "
        "run `python -m course_tools.report`")


def test_smoke_rows_hidden_when_the_benchmark_has_a_real_profile():
    def result(name: str, profile: str) -> dict:
        return {"name": name, "profile": profile, "machine": {"device": "cpu", "cpu_count": 2},
                "rows": [{"notebook": "04", "experiment": name, "metric": "m", "ours": 1, "paper": None}]}

    table = report.results_table([result("retrieval_smoke", "smoke"), result("retrieval_cpu", "cpu"),
                                  result("grading", "smoke")])
    assert "retrieval_cpu" in table and "retrieval_smoke" not in table and "grading" in table
