"""The set-up files agree with each other and the README stays true."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


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
