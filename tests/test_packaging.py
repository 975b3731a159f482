"""The set-up files agree, the README stays true, and the student package stands without the tooling."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
STUDENT_PACKAGE = "course_utils"
TOOLS_PACKAGE = "course_tools"

# Import names of the dev extra's distributions: a distribution is installed under one name and
# imported under another (pytest-xdist is ``xdist``, pytest also brings ``_pytest``).
DEV_IMPORT_NAMES: dict[str, tuple[str, ...]] = {
    "pytest": ("pytest", "_pytest"),
    "pytest-xdist": ("xdist",),
    "nbval": ("nbval",),
    "nbclient": ("nbclient",),
    "nbformat": ("nbformat",),
    "ipykernel": ("ipykernel",),
    "jupyterlab": ("jupyterlab",),
    "ruff": ("ruff",),
}
# Not in the dev extra by name, but installed only through it (nbclient, ipykernel, jupyterlab):
# a student's Colab or plain pip install has neither.
DEV_ONLY_TRANSITIVE = ("jupyter_client", "jupyter_server")


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    pip_lines = [line.strip()[2:] for line in (ROOT / "environment.yml").read_text().splitlines()
                 if line.strip().startswith("- ") and (">" in line or "=" in line)]
    listed = {_name(r) for r in pip_lines if not r.startswith(("python", "-e"))}
    assert wanted == listed, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


def test_runtime_dependencies_are_ranges_not_pins():
    # Colab brings its own torch and numpy; an == pin would reinstall them.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [r for r in project["dependencies"] if "==" in r]
    assert "torch==2.14.1" in (ROOT / "constraints.txt").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make reproduce" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_lists_every_solution_notebook_with_a_colab_badge():
    readme = (ROOT / "README.md").read_text()
    for nb in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        assert f"solutions/{nb.name}" in readme, f"README does not list {nb.name}"
        assert f"notebooks/{nb.name}" in readme, f"README has no Colab badge for {nb.name}"


def _dev_import_names() -> list[str]:
    """The top-level import names a student's install lacks, read from the dev extra."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    unknown = sorted({_name(r) for r in dev} - set(DEV_IMPORT_NAMES))
    # A new dev dependency must be blocked too, or the test below would stop proving anything.
    assert not unknown, f"add the import names of {unknown} to DEV_IMPORT_NAMES"
    names = [m for r in dev for m in DEV_IMPORT_NAMES[_name(r)]]
    return sorted(set(names) | set(DEV_ONLY_TRANSITIVE))


# Runs in a fresh interpreter: the test process itself has pytest and nbformat imported already.
# argv[1] is the JSON list of blocked names; prints one JSON line with what happened.
_WALK_WITHOUT_DEV = r"""
import importlib
import importlib.abc
import json
import pkgutil
import sys

BLOCKED = frozenset(json.loads(sys.argv[1]))


class DevExtraBlocker(importlib.abc.MetaPathFinder):
    # First on sys.meta_path: the blocked names are refused before any real finder sees them.
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: dev extra)",
                                      name=fullname)
        return None


# Anything imported at start-up (a .pth file) would be served from sys.modules, past the blocker.
preloaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
sys.meta_path.insert(0, DevExtraBlocker())

failed = {}


def record(name):
    # Called by walk_packages from inside its except clause, so the error is still at hand.
    exc = sys.exc_info()[1]
    failed[name] = f"{type(exc).__name__}: {exc}" if exc is not None else "could not import"


import course_utils

imported = [course_utils.__name__]
# walk_packages imports each subpackage to list it; onerror keeps a failing one from being
# skipped in silence.
for info in pkgutil.walk_packages(course_utils.__path__, "course_utils.", onerror=record):
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        failed[info.name] = f"{type(exc).__name__}: {exc}"
    else:
        imported.append(info.name)

# The same blocker must stop the tooling, or the walk above proved nothing.
try:
    importlib.import_module("course_tools.nbrun")
except ImportError as exc:
    tools_error = f"{type(exc).__name__}: {exc}"
else:
    tools_error = None

print(json.dumps({"preloaded": preloaded, "imported": imported, "failed": failed,
                  "tools_error": tools_error}))
"""


def test_student_package_imports_without_the_dev_extra():
    # Students install course_utils without the dev extra (Colab, `pip install -e .`): every one
    # of its modules must import with none of nbformat, nbclient, pytest, Jupyter servers.
    blocked = _dev_import_names()
    proc = subprocess.run([sys.executable, "-c", _WALK_WITHOUT_DEV, json.dumps(blocked)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the import walk crashed:\n{proc.stderr[-3000:]}"
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not outcome["preloaded"], f"imported before the blocker could act: {outcome['preloaded']}"
    assert not outcome["failed"], "course_utils modules that need the dev extra (or fail):\n" + (
        "\n".join(f"  {m}: {why}" for m, why in sorted(outcome["failed"].items())))
    assert len(outcome["imported"]) > 20, f"only {outcome['imported']} found: is the walk broken?"
    # The tooling needs nbformat/nbclient: failing here shows the blocker is in force.
    assert outcome["tools_error"] is not None, (
        f"{TOOLS_PACKAGE}.nbrun imported with {blocked} blocked: the blocker does not work")
    assert "blocked: dev extra" in outcome["tools_error"], outcome["tools_error"]


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in ``tree``, ``importlib`` calls included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def test_student_package_never_imports_the_tooling():
    # course_tools needs the dev extra; one import of it from course_utils breaks every student.
    offenders = []
    for path in sorted((ROOT / STUDENT_PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{path.relative_to(ROOT)}:{line}: {module}"
                      for line, module in _imported_modules(tree)
                      if module.partition(".")[0] == TOOLS_PACKAGE]
    assert not offenders, f"{STUDENT_PACKAGE} must not import {TOOLS_PACKAGE}:\n" + "\n".join(offenders)


def test_setuptools_ships_both_packages():
    # The editable install (and Colab's `pip install -e .`) only sees packages listed here.
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (STUDENT_PACKAGE, TOOLS_PACKAGE):
        assert (ROOT / package / "__init__.py").exists()
        assert f"{package}*" in include, f"{package}* missing from [tool.setuptools.packages.find]"
