"""The notebook build: markers, outputs, badge, bootstrap, determinism and the sync test."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from course_tools import nbbuild
from course_tools.nbbuild import (
    BOOTSTRAP_SOURCE,
    CODE_PROMPT,
    CODE_RAISE,
    MARKDOWN_ANSWER,
    BuildError,
    badge_markdown,
    build,
    dumps,
    make_student,
    plan_build,
)

REPO = Path(__file__).resolve().parents[1]
NAME = "01_demo.ipynb"

SOLVED_CELL = """\
def box_area(boxes):
    \"\"\"Area of (N, 4) boxes.\"\"\"
    ### BEGIN SOLUTION
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return w * h
    ### END SOLUTION


def double(x):
        ### BEGIN SOLUTION
        return 2 * x
        ### END SOLUTION

print("defined")"""


def _solution_notebook() -> nbformat.NotebookNode:
    """A small solution notebook in the course's shape (ids fixed so that output is stable)."""
    cells = [
        new_markdown_cell("# 01 Demo\n<!-- colab-badge -->\n\nLearning goals."),
        new_code_cell("print('bootstrap placeholder')", metadata={"tags": ["bootstrap"]}),
        new_code_cell(SOLVED_CELL, execution_count=3,
                      outputs=[new_output("stream", name="stdout", text="defined\n")],
                      metadata={"execution": {"iopub.execute_input": "2026-01-01T00:00:00Z"},
                                "tags": ["exercise"]}),
        new_code_cell("box_area = checks.nb01.check_box_area(box_area)", execution_count=4),
        new_markdown_cell("Why?\n\n<!-- BEGIN SOLUTION -->\nBecause **IoU**.\n"
                          "<!-- END SOLUTION -->\n\nNext."),
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A throw-away repository root with one solution notebook."""
    (tmp_path / "solutions").mkdir()
    nbformat.write(_solution_notebook(), tmp_path / "solutions" / NAME)
    return tmp_path


def test_code_markers_replaced_at_their_indentation() -> None:
    out = nbbuild.strip_code_solutions(SOLVED_CELL)
    lines = out.split("\n")
    assert f"    {CODE_PROMPT}" in lines and f"    {CODE_RAISE}" in lines
    assert f"        {CODE_PROMPT}" in lines and f"        {CODE_RAISE}" in lines
    assert "w = boxes" not in out and "2 * x" not in out and "SOLUTION" not in out
    # Everything outside the blocks is untouched (docstring, blank lines, the final print).
    assert '    """Area of (N, 4) boxes."""' in lines and lines[-1] == 'print("defined")'
    assert out.count("raise NotImplementedError") == 2
    compile(out, "<student>", "exec")  # still valid Python


def test_markdown_answer_replaced() -> None:
    src = "Q1\n<!-- BEGIN SOLUTION -->A1<!-- END SOLUTION -->\nQ2 <!--BEGIN SOLUTION-->\nA2\n<!-- END SOLUTION -->"
    assert nbbuild.strip_markdown_solutions(src) == f"Q1\n{MARKDOWN_ANSWER}\nQ2 {MARKDOWN_ANSWER}"


@pytest.mark.parametrize("source, fragment", [
    ("x = 1\n### BEGIN SOLUTION\ny = 2\n", "line 2 has no '### END SOLUTION'"),
    ("### END SOLUTION\n", "without a '### BEGIN SOLUTION'"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside the block opened on line 1"),
])
def test_unbalanced_code_markers_are_clear_errors(source: str, fragment: str) -> None:
    with pytest.raises(BuildError, match=fragment):
        nbbuild.strip_code_solutions(source, where="x")


def test_unclosed_marker_error_names_notebook_and_cell(repo: Path) -> None:
    nb = _solution_notebook()
    nb.cells[3].source = "def f():\n    ### BEGIN SOLUTION\n    return 1\n"
    nbformat.write(nb, repo / "solutions" / NAME)
    with pytest.raises(BuildError, match=r"01_demo\.ipynb: cell 3 \(code\).*line 2 has no"):
        build(repo)
    assert nbbuild.main(["--root", str(repo)]) == 2  # the CLI reports it, no traceback


def test_unclosed_markdown_marker_is_an_error() -> None:
    with pytest.raises(BuildError, match="has no '<!-- END SOLUTION -->'"):
        nbbuild.strip_markdown_solutions("<!-- BEGIN SOLUTION --> answer", where="x")


def test_student_notebook(repo: Path) -> None:
    build(repo)
    student = nbformat.read(repo / "notebooks" / NAME, as_version=4)
    solution = nbformat.read(repo / "solutions" / NAME, as_version=4)
    assert len(student.cells) == len(solution.cells)
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        assert "execution" not in cell.metadata
    assert student.cells[2].metadata["tags"] == ["exercise"]  # other metadata is kept
    assert student.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in student.metadata and "widgets" in solution.metadata  # output state
    # The check cell stays as it is for the student.
    assert student.cells[3].source == "box_area = checks.nb01.check_box_area(box_area)"
    assert MARKDOWN_ANSWER in student.cells[4].source and "IoU" not in student.cells[4].source
    # Cell ids are kept, so diffs between builds stay small.
    assert [c.id for c in student.cells] == [c.id for c in solution.cells]


def test_solution_keeps_its_code_and_outputs(repo: Path) -> None:
    build(repo)
    solution = nbformat.read(repo / "solutions" / NAME, as_version=4)
    assert solution.cells[2].source == SOLVED_CELL
    assert solution.cells[2].outputs[0]["text"] == "defined\n"


def test_badges_point_at_each_copy(repo: Path) -> None:
    build(repo)
    student = nbformat.read(repo / "notebooks" / NAME, as_version=4)
    solution = nbformat.read(repo / "solutions" / NAME, as_version=4)
    assert badge_markdown("notebooks", NAME) in student.cells[0].source.split("\n")
    assert badge_markdown("solutions", NAME) in solution.cells[0].source.split("\n")
    url = ("https://colab.research.google.com/github/anchors-to-clip/anchors-to-clip/blob/main/"
           f"notebooks/{NAME}")
    assert f"(https://colab.research.google.com/assets/colab-badge.svg)]({url})" in student.cells[0].source
    assert "<!-- colab-badge -->" not in student.cells[0].source


def test_badge_added_to_student_without_placeholder(repo: Path) -> None:
    nb = _solution_notebook()
    nb.cells[0].source = "# 01 Demo"
    nbformat.write(nb, repo / "solutions" / NAME)
    build(repo)
    student = nbformat.read(repo / "notebooks" / NAME, as_version=4)
    assert student.cells[0].source.startswith(badge_markdown("notebooks", NAME))
    solution = nbformat.read(repo / "solutions" / NAME, as_version=4)
    assert solution.cells[0].source == "# 01 Demo"


def test_bootstrap_cell_is_canonical_in_both_versions(repo: Path) -> None:
    build(repo)
    for folder in ("solutions", "notebooks"):
        nb = nbformat.read(repo / folder / NAME, as_version=4)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert first_code.source == BOOTSTRAP_SOURCE
        assert "bootstrap" in first_code.metadata["tags"]
    # Colab only; never touches torch or numpy.
    assert '"google.colab" in sys.modules' in BOOTSTRAP_SOURCE
    assert "--depth" in BOOTSTRAP_SOURCE and "--no-deps" in BOOTSTRAP_SOURCE
    installs = [line for line in BOOTSTRAP_SOURCE.split("\n") if '"install"' in line]
    assert len(installs) == 2
    for line in installs:
        words = line.replace("open_clip_torch", "").replace('"', " ").replace(",", " ").split()
        assert "torch" not in words and "numpy" not in words and "torchvision" not in words


def test_bootstrap_cell_does_nothing_off_colab(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BOOTSTRAP_SOURCE, "<bootstrap>", "exec"), {})
    assert capsys.readouterr().out == "Not on Colab: nothing to install.\n"


def test_bootstrap_cell_inserted_when_missing(repo: Path) -> None:
    nb = _solution_notebook()
    del nb.cells[1]
    nbformat.write(nb, repo / "solutions" / NAME)
    build(repo)
    student = nbformat.read(repo / "notebooks" / NAME, as_version=4)
    assert student.cells[1].source == BOOTSTRAP_SOURCE and student.cells[1].id == "colab-bootstrap"
    assert build(repo) == []  # and it stays put


def test_bootstrap_cell_must_come_first(repo: Path) -> None:
    nb = _solution_notebook()
    nb.cells[1], nb.cells[2] = nb.cells[2], nb.cells[1]
    nbformat.write(nb, repo / "solutions" / NAME)
    with pytest.raises(BuildError, match="must be the first code cell"):
        build(repo)


def test_build_is_deterministic_and_idempotent(repo: Path) -> None:
    first = build(repo)
    assert sorted(p.name for p in first) == [NAME, NAME]
    raw = {p: p.read_bytes() for p in (repo / "solutions" / NAME, repo / "notebooks" / NAME)}
    assert build(repo) == []
    assert {p: p.read_bytes() for p in raw} == raw
    assert all(b.endswith(b"}\n") for b in raw.values())
    # Building the student from the (already canonical) solution again gives the same text.
    solution = nbformat.read(repo / "solutions" / NAME, as_version=4)
    assert dumps(make_student(solution, NAME)).encode() == raw[repo / "notebooks" / NAME]


def test_check_mode_lists_files_and_writes_nothing(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert nbbuild.main(["--root", str(repo), "--check"]) == 1
    assert not (repo / "notebooks").exists()
    assert f"notebooks/{NAME}" in capsys.readouterr().out
    assert nbbuild.main(["--root", str(repo)]) == 0
    assert nbbuild.main(["--root", str(repo), "--check"]) == 0
    # A hand edit in the student copy is caught.
    path = repo / "notebooks" / NAME
    path.write_text(path.read_text().replace("YOUR CODE HERE", "hand edit"))
    assert nbbuild.main(["--root", str(repo), "--check"]) == 1


def test_stale_student_notebook_is_removed(repo: Path) -> None:
    build(repo)
    stale = repo / "notebooks" / "02_gone.ipynb"
    stale.write_text((repo / "notebooks" / NAME).read_text())
    assert build(repo, check=True) == [stale]
    build(repo)
    assert not stale.exists()


def test_notebooks_in_sync() -> None:
    """notebooks/ must be exactly what the build writes from solutions/ now."""
    if not list((REPO / "solutions").glob(nbbuild.NOTEBOOK_GLOB)):
        pytest.skip("no solution notebook yet")
    outputs, stale = plan_build(REPO)
    out_of_date = [str(p.relative_to(REPO)) for p in nbbuild.differing(outputs) + stale]
    assert not out_of_date, (
        "these files differ from what the notebook build writes: "
        + ", ".join(out_of_date)
        + ". Edit solutions/ only, then run `make notebooks` "
        "(python -m course_tools.nbbuild) and commit the result.")
