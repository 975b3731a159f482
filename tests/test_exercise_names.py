"""Every exercise is named after the reference it is checked against, and the student writes that name.

For each ``course_utils/checks/nbNN.py``, every entry of ``EXERCISES`` reads ``"N.k name"`` (or
``"N.k a / b"`` for an exercise with two functions).  Each name must be

* a public object of a ``course_utils`` module that the checks module imports at its top (the
  reference), whose own ``__name__`` is that name; and
* defined (``def`` or ``class``) in a code cell of ``solutions/NN_*.ipynb``, under a markdown
  title ``### Exercise N.k — `name```.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
import types
from pathlib import Path

import pytest

from course_utils import checks

ROOT = Path(__file__).resolve().parents[1]
CHECK_MODULES = sorted(m.name for m in pkgutil.iter_modules(checks.__path__) if re.fullmatch(r"nb\d\d", m.name))


def _references(module: types.ModuleType) -> list[types.ModuleType]:
    """The course_utils modules a checks module imports at its top."""
    tree = ast.parse(Path(module.__file__).read_text())
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from .. import x / from ..clip import x
            base = "course_utils" + ("." + node.module if node.module else "")
            for alias in node.names:
                obj = getattr(importlib.import_module(base), alias.name, None)
                if isinstance(obj, types.ModuleType):  # a module; a function's module is added below
                    found.append(obj)
            if node.module:
                found.append(importlib.import_module(base))
    return found


def _solution_definitions(nn: str) -> tuple[set[str], set[str]]:
    """Names defined at the top of the solution's code cells, and the names in exercise titles."""
    (path,) = (ROOT / "solutions").glob(f"{nn}_*.ipynb")
    nb = json.loads(path.read_text())
    defined, titled = set(), set()
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code":
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            defined |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for m in re.finditer(r"^### Exercise [\d.]+[a-z]? — (.+)$", src, flags=re.M):
            titled |= set(re.findall(r"`([\w.]+)`", m.group(1)))
    return defined, titled


def test_every_notebook_has_its_checks() -> None:
    assert CHECK_MODULES == [f"nb{i:02d}" for i in range(1, 9)]


@pytest.mark.parametrize("name", CHECK_MODULES)
def test_exercise_names_match_their_references(name: str) -> None:
    module = importlib.import_module(f"course_utils.checks.{name}")
    refs = _references(module)
    assert refs, f"checks/{name}.py imports no course_utils module to check against"
    defined, titled = _solution_definitions(name[2:])
    for exercise in module.EXERCISES:
        number, names = exercise.split(" ", 1)
        assert number.startswith(f"{int(name[2:])}."), f"{name}: exercise {exercise!r} is numbered for another notebook"
        for fn in (n.strip() for n in names.split("/")):
            owners = [r.__name__ for r in refs if getattr(getattr(r, fn, None), "__name__", None) == fn]
            assert owners, (f"checks/{name}.py: exercise {exercise!r} names {fn!r}, but no reference module it "
                            f"imports ({', '.join(r.__name__ for r in refs)}) defines it under that name")
            assert fn in defined, f"solutions/{name[2:]}_*.ipynb: exercise {exercise!r} but no code cell defines {fn!r}"
            assert fn in titled, f"solutions/{name[2:]}_*.ipynb: no '### Exercise {number} — `{fn}`' title"
