"""``course_tools.reproduce``: pinned threads, progress lines, recorded times, output comparison."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from course_tools import reproduce
from course_utils.runtimes import expected_runtime, measured_seconds


def _png(colour: int) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (colour, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _executed(folder: Path, lines: list[str], colour: int = 0, timing_colour: int = 0,
              timing_table: str = "images  SCAN s  ratio\n  1000   19.15   76.8x\n") -> Path:
    """A folder like ``--out``: one executed notebook whose first cell printed ``lines``."""
    folder.mkdir(parents=True)
    cells = [new_code_cell("print(...)", outputs=[new_output("stream", name="stdout", text=t) for t in lines]),
             new_code_cell("plot()", outputs=[new_output("display_data", data={"image/png": _png(colour)})]),
             new_code_cell("plot_times()", metadata={"tags": [reproduce.TIMINGS_TAG]},
                           outputs=[new_output("stream", name="stdout", text=timing_table),
                                    new_output("display_data", data={"image/png": _png(timing_colour)})])]
    nbformat.write(new_notebook(cells=cells), folder / "01_demo.ipynb")
    return folder


def test_compare_ignores_timings_cache_paths_and_stream_splits(tmp_path):
    a = _executed(tmp_path / "a", [f"loaded from {tmp_path / 'a' / 'cache'}/runs/x\n",
                                   "R@1 26.8  trained in 12.5 s,", " 340 images/s   4.4x faster\n"])
    b = _executed(tmp_path / "b", [f"loaded from {tmp_path / 'b' / 'cache'}/runs/x\nR@1 26.8  trained in 9.1 s,"
                                   " 512 images/s    5.0x faster\n"], timing_colour=200)
    assert reproduce.compare_runs(a, b) == []


def test_compare_masks_bare_seconds_only_in_timings_cells(tmp_path):
    # a speed table whose unit is in its header: decimals are times there, not elsewhere
    a = _executed(tmp_path / "a", ["R@1 26.8\n"], timing_table="SCAN s  query-agnostic s\n 19.22  0.003\n")
    b = _executed(tmp_path / "b", ["R@1 26.8\n"], timing_table="SCAN s  query-agnostic s\n 18.90  0.005\n")
    assert reproduce.compare_runs(a, b) == []
    c = _executed(tmp_path / "c", ["R@1 26.8\n"], timing_table="images\n 2000\n")
    assert "cell 2 stdout" in reproduce.compare_runs(a, c)[0]  # counts are still compared
    d = _executed(tmp_path / "d", ["R@1 0.003\n"], timing_table="SCAN s  query-agnostic s\n 19.22  0.003\n")
    assert "cell 0 stdout" in reproduce.compare_runs(a, d)[0]


@pytest.mark.parametrize("change", ["number", "figure"])
def test_compare_finds_a_changed_number_or_figure(tmp_path, change):
    a = _executed(tmp_path / "a", ["R@1 26.8 in 3 s\n"])
    b = _executed(tmp_path / "b", ["R@1 26.9 in 3 s\n" if change == "number" else "R@1 26.8 in 3 s\n"],
                  colour=0 if change == "number" else 90)
    problems = reproduce.compare_runs(a, b)
    assert len(problems) == 1 and "01_demo.ipynb cell" in problems[0]
    assert ("26.9" in problems[0]) if change == "number" else ("image/png" in problems[0])


def test_compare_refuses_empty_or_mismatched_folders(tmp_path):
    a = _executed(tmp_path / "a", ["x\n"])
    (tmp_path / "b").mkdir()
    assert "different or no notebooks" in reproduce.compare_runs(a, tmp_path / "b")[0]


def test_thread_env_and_durations():
    assert reproduce.thread_env(1) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with pytest.raises(ValueError, match="threads must be >= 1"):
        reproduce.thread_env(0)
    assert reproduce.fmt_duration(42.4) == "42 s"
    assert reproduce.fmt_duration(185) == "3 min 05 s"
    assert reproduce.remaining_text({"01": 30.0, "02": None}, ["01", "02"]) == \
        "about 30 s left (+ 1 notebook(s) never timed)"
    assert reproduce.remaining_text({"01": None}, ["01"]).startswith("remaining time unknown")


def test_record_merges_plain_and_from_scratch_times(tmp_path):
    reproduce.record("cpu", {"04": 400.0, "05": 180.0}, 1, from_scratch=False, results_dir=tmp_path)
    reproduce.record("cpu", {"05": 260.0, "06": 30.0}, 1, from_scratch=True, results_dir=tmp_path)
    rows = json.loads((tmp_path / "runtimes_cpu.json").read_text())["metrics"]["notebooks"]
    assert rows["05"] == {"seconds": 180.0, "after": "04", "from_scratch_seconds": 260.0}
    assert rows["06"]["seconds"] == 30.0  # no earlier cache to reuse: plain = from scratch
    assert measured_seconds("05", "cpu", results_dir=tmp_path) == 180.0
    assert measured_seconds("05 query-agnostic", "cpu", from_scratch=True, results_dir=tmp_path) == 260.0
    line = expected_runtime("05 query-agnostic retrieval", "cpu", "cpu", results_dir=tmp_path)
    assert "after notebook 04" in line and "4 min from an empty cache" in line


def test_run_all_pins_threads_whatever_the_caller_says(tmp_path, monkeypatch, capsys):
    """A kernel started by the driver runs one torch thread even from a caller with OMP=2, and
    the driver prints a line per notebook and the total."""
    nb = new_notebook(cells=[new_code_cell(
        "import os, torch\nprint('threads', os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")])
    path = tmp_path / "01_threads.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    seconds, failures = reproduce.run_all([path], profile="smoke", threads=1, out=tmp_path / "out",
                                          heartbeat=0, results_dir=tmp_path)
    assert failures == [] and set(seconds) == {"01"}
    ran = nbformat.read(tmp_path / "out" / path.name, 4)
    assert ran.cells[0].outputs[0]["text"].strip() == "threads 1 1"
    out = capsys.readouterr().out
    assert "[1/1] 01_threads.ipynb" in out and "1 torch thread(s)" in out and "1/1 ok in" in out


def test_headers_take_the_recorded_cpu_times(tmp_path):
    from nbformat.v4 import new_markdown_cell

    header = ("# 05 · demo\n\n| profile | data | run time on 2 CPU cores |\n|---|---|---|\n"
              "| `smoke` | tiny | ≈ 20 s |\n| `cpu` | 1000 images | typed by hand |\n| `full` | big | estimated |")
    sols = tmp_path / "solutions"
    sols.mkdir()
    nbformat.write(new_notebook(cells=[new_markdown_cell(header)]), sols / "05_demo.ipynb")
    reproduce.record("cpu", {"05": 180.0}, 1, from_scratch=False, results_dir=tmp_path)
    reproduce.record("cpu", {"05": 260.0}, 1, from_scratch=True, results_dir=tmp_path)
    assert reproduce.write_headers(tmp_path, sols) == ["05_demo.ipynb"]
    lines = nbformat.read(sols / "05_demo.ipynb", 4).cells[0].source.splitlines()
    cpu = next(line for line in lines if line.startswith("| `cpu` |"))
    assert cpu.startswith("| `cpu` | 1000 images | 3 min 00 s measured by `make reproduce`")
    assert "after notebook 04" in cpu and "4 min 20 s from an empty cache" in cpu
    assert "| `smoke` | tiny | ≈ 20 s |" in lines and "| `full` | big | estimated |" in lines
    assert reproduce.write_headers(tmp_path, sols) == []  # a second time changes nothing
