"""The set-up cell on a simulated Colab: fake ``google.colab``, subprocess, chdir and isdir.

Nothing is cloned or installed: every command the cell runs is recorded instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import tomllib

from course_tools import nbbuild

REPO = Path(__file__).resolve().parents[1]
URL = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


class Colab:
    """Records the commands; ``fail`` maps a command's first words to a failing result."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, cloned: bool = False) -> None:
        self.commands: list[list[str]] = []
        self.fail: dict[str, int] = {}
        self.mounted: list[str] = []
        colab = types.ModuleType("google.colab")
        colab.drive = types.SimpleNamespace(mount=self.mounted.append)
        google = types.ModuleType("google")
        google.colab = colab
        monkeypatch.setitem(sys.modules, "google", google)
        monkeypatch.setitem(sys.modules, "google.colab", colab)
        monkeypatch.setattr(subprocess, "run", self.run)
        monkeypatch.setattr(os, "chdir", lambda path: None)
        real_isdir = os.path.isdir
        monkeypatch.setattr(os.path, "isdir", lambda p: cloned if p == nbbuild.COLAB_CLONE_DIR else real_isdir(p))
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.delenv("COURSE_PROFILE", raising=False)
        monkeypatch.delenv("COURSE_CACHE", raising=False)

    def run(self, cmd, **kwargs):
        self.commands.append(list(cmd))
        key = "git" if cmd[0] == "git" else "pip"
        if key in self.fail:
            return subprocess.CompletedProcess(cmd, self.fail[key], "", f"fatal: {key} broke\nlast line\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def run_cell(source: str = nbbuild.BOOTSTRAP_SOURCE) -> None:
    exec(compile(source, "<bootstrap>", "exec"), {"__name__": "__main__"})


def test_clone_uses_the_url_from_pyproject(monkeypatch, capsys) -> None:
    colab = Colab(monkeypatch)
    run_cell()
    clone = colab.commands[0]
    assert clone[:2] == ["git", "clone"] and f"{URL}.git" in clone and nbbuild.COLAB_CLONE_DIR in clone
    assert nbbuild.REPO_URL == URL
    assert [c[3:] for c in colab.commands[1:]] == [
        ["install", "-q", "-e", ".", "--no-deps"],
        ["install", "-q", "open_clip_torch", "segment-anything", "pooch"]]
    assert "Colab set-up done" in capsys.readouterr().out
    assert nbbuild.COLAB_CLONE_DIR in sys.path and "COURSE_PROFILE" not in os.environ  # auto


def test_existing_clone_is_reused(monkeypatch) -> None:
    colab = Colab(monkeypatch, cloned=True)
    run_cell()
    assert all(c[0] != "git" for c in colab.commands)


@pytest.mark.parametrize("what, code", [("git", 128), ("pip", 1)])
def test_failure_is_explained_and_stops(monkeypatch, capsys, what: str, code: int) -> None:
    colab = Colab(monkeypatch)
    colab.fail[what] = code
    with pytest.raises(Exception) as info:
        run_cell()
    assert not isinstance(info.value, subprocess.CalledProcessError)
    assert type(info.value).__name__ == "SetupStopped"
    # IPython renders the stop as this one line instead of a traceback.
    rendered = info.value._render_traceback_()
    assert len(rendered) == 1 and "Traceback" not in rendered[0]
    out = capsys.readouterr().out
    assert f"Set-up failed ({code})" in out and f"fatal: {what} broke" in out and "last line" in out
    assert "internet" in out
    if what == "git":
        assert " ".join(colab.commands[0]) in out
        assert f"!unzip -q /content/{nbbuild.REPO_ZIP_DIR}.zip -d /content" in out
        assert nbbuild.REPO_ZIP_URL in out and "file browser" in out
        assert len(colab.commands) == 1  # nothing installed after a failed clone
    else:
        assert "pip install" in out and len(colab.commands) == 2


def test_missing_git_is_explained(monkeypatch, capsys) -> None:
    Colab(monkeypatch)

    def no_git(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", no_git)
    with pytest.raises(Exception, match="failed"):
        run_cell()
    assert "No such file or directory" in capsys.readouterr().out


def test_profile_line_sets_the_environment(monkeypatch) -> None:
    Colab(monkeypatch)
    source = nbbuild.BOOTSTRAP_SOURCE
    assert 'COURSE_PROFILE = "auto"  # or "smoke", "cpu", "full"' in source
    run_cell(source.replace('COURSE_PROFILE = "auto"', 'COURSE_PROFILE = "cpu"', 1))
    assert os.environ["COURSE_PROFILE"] == "cpu"
    from course_utils.profiles import get_config

    assert get_config().name == "cpu"


def test_profile_line_off_colab_and_auto_leaves_variable(monkeypatch) -> None:
    monkeypatch.setenv("COURSE_PROFILE", "smoke")  # as `make test` sets it
    run_cell()
    assert os.environ["COURSE_PROFILE"] == "smoke"
    run_cell(nbbuild.BOOTSTRAP_SOURCE.replace('COURSE_PROFILE = "auto"', 'COURSE_PROFILE = "cpu"', 1))
    assert os.environ["COURSE_PROFILE"] == "cpu"


def test_drive_cache(monkeypatch, capsys) -> None:
    colab = Colab(monkeypatch)
    run_cell(nbbuild.BOOTSTRAP_SOURCE.replace("USE_DRIVE_CACHE = False", "USE_DRIVE_CACHE = True", 1))
    assert colab.mounted == ["/content/drive"]
    assert os.environ["COURSE_CACHE"] == nbbuild.DRIVE_CACHE_DIR
    assert nbbuild.DRIVE_CACHE_DIR.startswith("/content/drive/MyDrive/")
    assert nbbuild.DRIVE_CACHE_DIR in capsys.readouterr().out


def test_drive_off_by_default(monkeypatch) -> None:
    colab = Colab(monkeypatch)
    run_cell()
    assert colab.mounted == [] and "COURSE_CACHE" not in os.environ


def test_off_colab_without_course_utils_names_make_lab(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "course_utils", None)  # import fails
    with pytest.raises(Exception) as info:
        run_cell()
    assert type(info.value).__name__ == "SetupStopped"
    out = capsys.readouterr().out
    assert "make lab" in out and "pip install -e ." in out


def test_the_cell_stops_a_real_ipython_run_without_traceback(monkeypatch, capsys) -> None:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    colab = Colab(monkeypatch)
    colab.fail["git"] = 128
    shell = InteractiveShell.instance()
    result = shell.run_cell(nbbuild.BOOTSTRAP_SOURCE)
    out = capsys.readouterr()
    assert not result.success  # "Run all" stops here
    assert "Traceback" not in out.out + out.err and "Set-up stopped" in out.out + out.err


def test_build_puts_the_cell_in_every_notebook(tmp_path: Path) -> None:
    """A build in a copy of solutions/: every notebook (both folders) starts with this cell."""
    solutions = sorted((REPO / "solutions").glob(nbbuild.NOTEBOOK_GLOB))
    if not solutions:
        pytest.skip("no solution notebook yet")
    (tmp_path / "solutions").mkdir()
    for path in solutions:
        (tmp_path / "solutions" / path.name).write_bytes(path.read_bytes())
    nbbuild.build(tmp_path)
    for folder in ("solutions", "notebooks"):
        for path in solutions:
            nb = nbformat.read(tmp_path / folder / path.name, as_version=4)
            first = next(c for c in nb.cells if c.cell_type == "code")
            assert first.source == nbbuild.BOOTSTRAP_SOURCE, f"{folder}/{path.name}"
            assert nbbuild.BOOTSTRAP_TAG in first.metadata.get("tags", [])
    assert nbbuild.build(tmp_path) == []  # deterministic


def test_readme_badges_match_colab_url() -> None:
    """The README's table links each student notebook with nbbuild.colab_url (same repository)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index(nbbuild.README_START):readme.index(nbbuild.README_END)]
    for path in sorted((REPO / "solutions").glob(nbbuild.NOTEBOOK_GLOB)):
        assert f"]({nbbuild.colab_url('notebooks', path.name)})" in table, path.name
    assert table.count("colab.research.google.com/github/") == len(
        list((REPO / "solutions").glob(nbbuild.NOTEBOOK_GLOB)))


def test_repository_url_is_read_from_pyproject(tmp_path: Path, monkeypatch) -> None:
    """A fork changes one line of pyproject.toml (also without tomllib, as on Python 3.10)."""
    fork = tmp_path / "pyproject.toml"
    fork.write_text('[project]\nname = "x"\n\n[project.urls]\n'
                    'Homepage = "https://example.org"\nRepository = "https://github.com/me/fork.git"\n')
    assert nbbuild.repository_url(fork) == "https://github.com/me/fork"
    monkeypatch.setattr(nbbuild, "tomllib", None)
    assert nbbuild.repository_url(fork) == "https://github.com/me/fork"
    fork.write_text('[project]\nname = "x"\n')
    with pytest.raises(RuntimeError, match=r"\[project.urls\] Repository"):
        nbbuild.repository_url(fork)
