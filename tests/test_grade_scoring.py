"""The grader's scoring for every notebook: its plan, and the sandboxed children on real solutions.

``test_grade.py`` grades whole notebook-01 submissions; here each notebook's checks go through
:mod:`course_tools.grade_scoring` alone: what each check may not call resolves, the replay with
no outputs fails every case, and the solution's own definitions, loaded in the sandbox, pass every
check (module checks, wrappers, in-place initialisers included).
"""

from __future__ import annotations

import ast

import nbformat
import pytest

from course_tools import grade_scoring as gs
from course_tools import sandbox
from course_tools.grade import solution_path
from course_tools.grade_child import resolve
from course_utils import checks

NOTEBOOKS = ["01", "02", "03", "04", "05", "06", "07", "08"]


def solution(nb: str) -> nbformat.NotebookNode:
    return nbformat.read(solution_path(nb), as_version=4)


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_every_check_has_a_plan_whose_references_resolve(nb: str) -> None:
    module = __import__(f"course_utils.checks.nb{nb}", fromlist=["EXERCISES"])
    plan = gs.make_plan(solution(nb), module.__name__)
    assert plan, f"notebook {nb}: no check calls found"
    for item in plan:
        assert item.denied, f"{item.check}: nothing to deny (its reference was not found)"
        for spec in item.denied:
            resolve(spec)  # a typo in LIBRARY_EQUIVALENTS fails here
    # with no outputs every exercise fails: nothing passes by default
    verdicts = {}
    for item in plan:
        checks.RESULTS.clear()
        with checks.replaying({}):
            getattr(module, item.check)(*[gs._NotHere(a) for a in item.args])
        verdicts.update(checks.RESULTS)
    checks.RESULTS.clear()
    assert sorted(verdicts) == sorted(module.EXERCISES)
    assert not any(r.passed for r in verdicts.values())


def test_definitions_are_only_what_the_names_use() -> None:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import torch\nimport matplotlib.pyplot as plt\nEPS = 1e-6\nx = torch.ones(3)"),
        nbformat.v4.new_code_cell("def helper(a):\n    return a + EPS\n\ndef f(a):\n    return helper(torch.as_tensor(a))"),
        nbformat.v4.new_code_cell("plt.plot([1])\nprint(f(1))"),
    ])
    cells, statements = gs.select_definitions(nb, ["f"])
    chosen = sorted(ast.unparse(s).splitlines()[0] for _, s in statements)
    assert chosen == ["EPS = 1e-06", "def f(a):", "def helper(a):", "import torch"]
    assert [c[0] for c in cells] == [0, 1]


def test_uses_of_the_reference_are_found_in_the_source() -> None:
    denied = ["course_utils.boxes:box_iou", "torchvision.ops:box_iou"]

    def uses(src: str, imports: str = "from course_utils import boxes as reference\n") -> list[str]:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(imports + src)])
        return gs.reference_uses(gs.select_definitions(nb, ["box_iou"])[1], denied)

    assert uses("def box_iou(a, b):\n    return reference.box_iou(a, b)")
    assert uses("def box_iou(a, b):\n    from torchvision.ops import box_iou as t\n    return t(a, b)")
    assert uses("def box_iou(a, b):\n    return tv(a, b)", "from torchvision.ops import box_iou as tv\n")
    assert uses("def box_iou(a, b):\n    import torchvision\n    return torchvision.ops.box_iou(a, b)")
    assert not uses("def box_iou(a, b):\n    return (a[:, None, 0] - b[None, :, 0]).abs()")


@pytest.mark.skipif(sandbox.detect() != "bwrap", reason="bubblewrap is not installed (make installs it)")
@pytest.mark.parametrize("nb", ["02", "03", "07", "08"])
def test_solutions_pass_every_check_from_the_sandbox(nb: str) -> None:
    """Module checks (02, 03), a training-step wrapper (07) and an in-place initialiser (08)."""
    module = f"course_utils.checks.nb{nb}"
    sol = solution(nb)
    exercises = __import__(module, fromlist=["EXERCISES"]).EXERCISES
    verdicts = gs.score_notebook(sol, gs.make_plan(sol, module), checks_module=module,
                                 exercises=exercises, isolation="bwrap", timeout=120)
    failed = {e: v.messages[:2] for e, v in verdicts.items() if not v.passed}
    assert sorted(verdicts) == sorted(exercises) and not failed, failed
