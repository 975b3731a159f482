"""Write the student notebooks in ``notebooks/`` from the instructor notebooks in ``solutions/``.

``solutions/NN_*.ipynb`` is the single source of truth.  The build turns each one into
``notebooks/NN_*.ipynb`` by

* replacing every exercise block in a code cell (the lines ``### BEGIN SOLUTION`` …
  ``### END SOLUTION``, markers included) by a prompt and ``raise NotImplementedError`` at the
  indentation of the ``BEGIN`` line (the nbgrader marker convention);
* replacing every ``<!-- BEGIN SOLUTION -->`` … ``<!-- END SOLUTION -->`` span in a markdown
  cell by ``*Your answer here.*``;
* clearing outputs and execution counts, and dropping execution-timing metadata;
* pointing the Colab badge at the student copy.

Both versions get the same canonical Colab bootstrap cell (the first code cell, tagged
``bootstrap``) and a badge in the first markdown cell where the line ``<!-- colab-badge -->`` (or
an earlier badge) stands.  Output is deterministic: building twice gives identical bytes.

Usage::

    python -m course_tools.nbbuild            # (re)write notebooks/ and canonicalise solutions/
    python -m course_tools.nbbuild --check    # exit 1 and list the files that would change
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: read the one line we need by pattern instead
    tomllib = None

# --- The repository, defined once in pyproject.toml ([project.urls] Repository): badges, the
# README's notebook table and the bootstrap cell are built from it, so a fork changes one line.
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
REPO_BRANCH = "main"


def repository_url(pyproject: Path = PYPROJECT) -> str:
    """``[project.urls] Repository`` of ``pyproject``: ``https://github.com/<owner>/<name>``."""
    try:
        text = pyproject.read_text(encoding="utf-8")
        if tomllib is not None:
            url = tomllib.loads(text)["project"]["urls"]["Repository"]
        else:
            found = re.search(r'^\[project\.urls\][^\[]*?^Repository\s*=\s*"([^"]+)"', text, re.M | re.S)
            if found is None:
                raise KeyError("Repository")
            url = found.group(1)
        url = url.strip().removesuffix(".git").rstrip("/")
    except (OSError, KeyError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise RuntimeError(f"{pyproject}: cannot read [project.urls] Repository ({exc!r}); the "
                           "notebook build needs the repository's GitHub address there") from exc
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise RuntimeError(f"{pyproject}: [project.urls] Repository = {url!r}; expected "
                           "https://github.com/<owner>/<name> (Colab opens notebooks from GitHub)")
    return url


REPO_URL = repository_url()
REPO_OWNER, REPO_NAME = REPO_URL.split("/")[-2:]
COLAB_CLONE_DIR = f"/content/{REPO_NAME}"
# What GitHub's "Download ZIP" gives, and the folder that zip unpacks to.
REPO_ZIP_URL = f"{REPO_URL}/archive/refs/heads/{REPO_BRANCH}.zip"
REPO_ZIP_DIR = f"{REPO_NAME}-{REPO_BRANCH}"
# Colab only, opt-in: the course cache in the student's Google Drive survives a recycled runtime.
DRIVE_CACHE_DIR = f"/content/drive/MyDrive/{REPO_NAME}-cache"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

SOLUTIONS_DIR = "solutions"
NOTEBOOKS_DIR = "notebooks"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"

BADGE_PLACEHOLDER = "<!-- colab-badge -->"
BOOTSTRAP_TAG = "bootstrap"
# Fixed id for a bootstrap cell the build has to insert: random ids would break determinism.
BOOTSTRAP_CELL_ID = "colab-bootstrap"

BEGIN_CODE = "### BEGIN SOLUTION"
END_CODE = "### END SOLUTION"
CODE_PROMPT = "# YOUR CODE HERE"
CODE_RAISE = 'raise NotImplementedError("Exercise not done yet: replace this line with your code.")'
MARKDOWN_BEGIN = re.compile(r"<!--\s*BEGIN SOLUTION\s*-->")
MARKDOWN_END = re.compile(r"<!--\s*END SOLUTION\s*-->")
MARKDOWN_ANSWER = "*Your answer here.*"

# Cell metadata written by JupyterLab / nbclient timing: it changes on every run and would make
# the student notebooks differ from build to build.
TIMING_METADATA_KEYS = ("execution", "ExecuteTime")

# The first code cell of every notebook.  On Colab, where the course is not installed yet, it
# fetches and installs it; torch and numpy come with Colab and must never be replaced (a mismatched
# torch breaks CUDA), hence --no-deps for the package and an explicit list of what Colab lacks.
# A failed step prints the command, its last error lines and what to do, then stops the notebook
# with SetupStopped, which Jupyter/Colab show as one line (``_render_traceback_``), no traceback.  Elsewhere it only checks the install.
# Written with <<NAME>> placeholders (the cell has braces of its own), filled in below.
_BOOTSTRAP_TEMPLATE = """\
# Set-up, written by `make notebooks`: edit only the two settings. On Google Colab it fetches the
# course and installs only what Colab lacks; anywhere else it checks that the course is installed.
COURSE_PROFILE = "auto"  # or "smoke", "cpu", "full"
# ("auto": full on a GPU, cpu otherwise, unless the COURSE_PROFILE environment variable is set.)
USE_DRIVE_CACHE = False  # Colab: True keeps the course cache in your Google Drive
import os
import sys


class SetupStopped(Exception):  # Jupyter shows only these lines, no traceback; "Run all" stops
    def _render_traceback_(self):
        return [f"Set-up stopped: {self}. Read the message above, then run this cell again."]


if COURSE_PROFILE != "auto":
    os.environ["COURSE_PROFILE"] = COURSE_PROFILE
if "google.colab" in sys.modules:
    import subprocess

    def _run(cmd, advice):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            code, err = proc.returncode, proc.stderr or proc.stdout or ""
        except OSError as exc:  # e.g. the program is missing
            code, err = "not started", str(exc)
        if code != 0:
            tail = "\\n".join("    " + line for line in err.strip().splitlines()[-5:])
            print(f"Set-up failed ({code}): {' '.join(cmd)}\\n{tail}\\n\\nWhat to do: {advice}")
            raise SetupStopped("the command above failed")

    if USE_DRIVE_CACHE:  # resume survives a recycled runtime; 05 and 08 reuse what 04 and 07 made
        try:
            from google.colab import drive

            drive.mount("/content/drive")
            os.environ["COURSE_CACHE"] = "<<DRIVE_CACHE_DIR>>"
        except Exception as exc:
            print(f"Google Drive not mounted ({exc}); the cache stays on this runtime's disk.")
    clone_advice = (
        "check that this runtime is connected to the internet and run this cell again. Or download\\n"
        "    <<ZIP_URL>>\\n"
        "upload it to /content with the file browser (folder icon on the left), run\\n"
        "    !unzip -q /content/<<ZIP_DIR>>.zip -d /content && mv /content/<<ZIP_DIR>> <<CLONE_DIR>>\\n"
        "and run this cell again.")
    if not os.path.isdir("<<CLONE_DIR>>"):
        _run(["git", "clone", "--depth", "1", "<<REPO_URL>>.git", "<<CLONE_DIR>>"], clone_advice)
    os.chdir("<<CLONE_DIR>>")
    pip_advice = ("check that this runtime is connected to the internet (packages come from PyPI) "
                  "and run this cell again. If <<CLONE_DIR>> is incomplete, delete it "
                  "(!rm -rf <<CLONE_DIR>>) and run this cell again.")
    # --no-deps: Colab's own torch and numpy stay as they are.
    _run([sys.executable, "-m", "pip", "install", "-q", "-e", ".", "--no-deps"], pip_advice)
    _run([sys.executable, "-m", "pip", "install", "-q", "open_clip_torch", "segment-anything", "pooch"], pip_advice)
    # An editable install is only seen by a new interpreter; this kernel needs the path now.
    if "<<CLONE_DIR>>" not in sys.path:
        sys.path.insert(0, "<<CLONE_DIR>>")
    print("Colab set-up done: course_utils installed from <<CLONE_DIR>>; cache: "
          + os.environ.get("COURSE_CACHE", "this runtime's disk (lost when it is recycled)"))
else:
    try:
        import course_utils
    except ImportError as exc:
        print(f"This notebook's kernel cannot import course_utils ({exc}). From the repository "
              "root run `make lab` (it sets up .venv and opens JupyterLab on it), or run "
              "`pip install -e .` in the environment of this kernel; then restart the kernel.")
        raise SetupStopped("course_utils is not installed") from None
    print("Not on Colab: nothing to install.")"""


def _fill(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace(f"<<{key}>>", value)
    if "<<" in template:
        raise RuntimeError(f"unfilled placeholder in the bootstrap cell: {template[template.index('<<'):][:40]}")
    return template


BOOTSTRAP_SOURCE = _fill(_BOOTSTRAP_TEMPLATE, REPO_URL=REPO_URL, CLONE_DIR=COLAB_CLONE_DIR,
                         ZIP_URL=REPO_ZIP_URL, ZIP_DIR=REPO_ZIP_DIR, DRIVE_CACHE_DIR=DRIVE_CACHE_DIR)

_BADGE_LINE = re.compile(
    r"^\s*(?:" + re.escape(BADGE_PLACEHOLDER) + r"|\[!\[Open In Colab\]\(" + re.escape(BADGE_IMAGE)
    + r"\)\]\([^)]*\))\s*$"
)


class BuildError(ValueError):
    """A solution notebook breaks the build conventions (the message names notebook and cell)."""


def colab_url(folder: str, filename: str) -> str:
    """The Colab address that opens ``folder/filename`` of this repository's main branch."""
    return (f"https://colab.research.google.com/github/{REPO_OWNER}/{REPO_NAME}/blob/"
            f"{REPO_BRANCH}/{folder}/{filename}")


def badge_markdown(folder: str, filename: str) -> str:
    """The "Open In Colab" badge line (markdown image link) for ``folder/filename``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(folder, filename)})"


def set_run_time(path: Path, profile: str, text: str) -> bool:
    """Write ``text`` into the last column of the ``profile`` row of the run-time table in the
    notebook's first (header) cell; returns whether the file changed."""
    nb = nbformat.read(path, as_version=4)
    lines = nb.cells[0].source.splitlines()
    row = f"| `{profile}` |"
    for i, line in enumerate(lines):
        if line.startswith(row):
            cells = line.rstrip().rstrip("|").split(" | ")
            lines[i] = " | ".join(cells[:-1] + [text]) + " |"
    new = "\n".join(lines)
    if new == nb.cells[0].source:
        return False
    nb.cells[0].source = new
    nbformat.write(nb, path)
    return True


# --------------------------------------------------------------------------- exercise markers


def strip_code_solutions(source: str, *, where: str = "cell") -> str:
    """Replace each ``### BEGIN SOLUTION`` … ``### END SOLUTION`` block of ``source``.

    The two marker lines and everything between them become two lines, ``# YOUR CODE HERE`` and
    ``raise NotImplementedError(...)``, indented like the ``BEGIN`` line.  Raises
    :class:`BuildError` (mentioning ``where``) for an unclosed, unopened or nested block.
    """
    out: list[str] = []
    begin_line: int | None = None
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN_CODE:
            if begin_line is not None:
                raise BuildError(f"{where}: '{BEGIN_CODE}' on line {number} inside the block "
                                 f"opened on line {begin_line}; close it with '{END_CODE}' first")
            begin_line = number
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + CODE_PROMPT, indent + CODE_RAISE]
        elif marker == END_CODE:
            if begin_line is None:
                raise BuildError(f"{where}: '{END_CODE}' on line {number} without a '{BEGIN_CODE}'")
            begin_line = None
        elif begin_line is None:
            out.append(line)
    if begin_line is not None:
        raise BuildError(f"{where}: '{BEGIN_CODE}' on line {begin_line} has no '{END_CODE}'")
    return "\n".join(out)


def strip_markdown_solutions(source: str, *, where: str = "cell") -> str:
    """Replace each ``<!-- BEGIN SOLUTION -->`` … ``<!-- END SOLUTION -->`` span by a prompt."""
    out: list[str] = []
    pos = 0
    while True:
        begin = MARKDOWN_BEGIN.search(source, pos)
        end = MARKDOWN_END.search(source, pos)
        if begin is None:
            if end is not None:
                raise BuildError(f"{where}: '<!-- END SOLUTION -->' without a '<!-- BEGIN SOLUTION -->'")
            out.append(source[pos:])
            return "".join(out)
        if end is None or end.start() < begin.start():
            what = "has no '<!-- END SOLUTION -->'" if end is None else "comes after an unopened END"
            raise BuildError(f"{where}: '<!-- BEGIN SOLUTION -->' {what}")
        nested = MARKDOWN_BEGIN.search(source, begin.end(), end.start())
        if nested is not None:
            raise BuildError(f"{where}: nested '<!-- BEGIN SOLUTION -->' blocks")
        out += [source[pos:begin.start()], MARKDOWN_ANSWER]
        pos = end.end()


# --------------------------------------------------------------------------- notebook transforms


def _cell_where(name: str, index: int, cell: NotebookNode) -> str:
    return f"{name}: cell {index} ({cell.cell_type})"


def _set_badge(nb: NotebookNode, folder: str, filename: str, *, insert: bool) -> None:
    """Put the badge for ``folder/filename`` in the first markdown cell.

    The badge replaces a ``<!-- colab-badge -->`` line or an earlier badge line; with ``insert``
    and no such line it is added as the cell's first line.
    """
    first_md = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first_md is None:
        return
    badge = badge_markdown(folder, filename)
    lines = first_md.source.split("\n")
    hits = [i for i, line in enumerate(lines) if _BADGE_LINE.match(line)]
    if hits:
        for i in hits:
            lines[i] = badge
    elif insert:
        lines = [badge, ""] + lines
    first_md.source = "\n".join(lines)


def _set_bootstrap(nb: NotebookNode, name: str) -> None:
    """Write the canonical bootstrap source into the first code cell (inserting one if needed)."""
    code_indices = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = [i for i in code_indices if BOOTSTRAP_TAG in nb.cells[i].metadata.get("tags", [])]
    if len(tagged) > 1:
        raise BuildError(f"{name}: cells {tagged} are all tagged '{BOOTSTRAP_TAG}'; keep one")
    if tagged:
        if tagged[0] != code_indices[0]:
            raise BuildError(f"{name}: the '{BOOTSTRAP_TAG}' cell (cell {tagged[0]}) must be the "
                             f"first code cell, but cell {code_indices[0]} comes before it")
        nb.cells[tagged[0]].source = BOOTSTRAP_SOURCE
        return
    cell = nbformat.v4.new_code_cell(BOOTSTRAP_SOURCE, metadata={"tags": [BOOTSTRAP_TAG]})
    cell["id"] = BOOTSTRAP_CELL_ID
    if nb.get("nbformat_minor", 0) < 5:
        del cell["id"]  # cell ids only exist from nbformat 4.5 on
    # Right before the first code cell, i.e. after the title / learning goals.
    nb.cells.insert(code_indices[0] if code_indices else len(nb.cells), cell)


def _drop_timing(cell: NotebookNode) -> None:
    for key in TIMING_METADATA_KEYS:
        cell.metadata.pop(key, None)


def canonical_solution(nb: NotebookNode, filename: str) -> NotebookNode:
    """The solution notebook as the build keeps it: canonical bootstrap cell and solutions badge."""
    nb = copy.deepcopy(nb)
    _set_bootstrap(nb, filename)
    _set_badge(nb, SOLUTIONS_DIR, filename, insert=False)
    return nb


def make_student(solution: NotebookNode, filename: str) -> NotebookNode:
    """The student version of a solution notebook (see the module docstring for the rules)."""
    nb = canonical_solution(solution, filename)
    _set_badge(nb, NOTEBOOKS_DIR, filename, insert=True)
    # Saved ipywidgets state belongs to the outputs, which the student version does not have.
    nb.metadata.pop("widgets", None)
    # The kernel that executed the solution writes its own Python version here; the student copy
    # must not change with whoever last ran the solutions.
    nb.metadata["language_info"] = {"name": "python"}
    for index, cell in enumerate(nb.cells):
        where = _cell_where(filename, index, cell)
        _drop_timing(cell)
        if cell.cell_type == "code":
            cell.source = strip_code_solutions(cell.source, where=where)
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source = strip_markdown_solutions(cell.source, where=where)
    return nb


def dumps(nb: NotebookNode) -> str:
    """Stable text of a notebook: nbformat's JSON (sorted keys, indent 1) plus a final newline."""
    text = nbformat.writes(nb, version=nbformat.NO_CONVERT)
    return text if text.endswith("\n") else text + "\n"


# --------------------------------------------------------------------------- the build


@dataclass
class BuildOutput:
    """One file the build would write: where, and its full text."""

    path: Path
    text: str


def plan_build(root: Path) -> tuple[list[BuildOutput], list[Path]]:
    """Everything the build would write under ``root``, and stale student notebooks to remove.

    Returns ``(outputs, stale)``: one :class:`BuildOutput` per solution (its canonical form) and
    per student notebook, the README (its notebook table, when it has the markers), and the ``notebooks/NN_*.ipynb`` files that have no solution any more.
    """
    solutions = sorted((root / SOLUTIONS_DIR).glob(NOTEBOOK_GLOB))
    outputs: list[BuildOutput] = []
    read: list[tuple[str, NotebookNode]] = []
    for path in solutions:
        try:
            solution = nbformat.read(path, as_version=4)
        except Exception as exc:  # bad JSON etc.: name the file, not a frame inside nbformat
            raise BuildError(f"{path}: cannot be read as a notebook: {exc}") from exc
        read.append((path.name, solution))
        outputs.append(BuildOutput(path, dumps(canonical_solution(solution, path.name))))
        outputs.append(BuildOutput(root / NOTEBOOKS_DIR / path.name,
                                   dumps(make_student(solution, path.name))))
    # The README's notebook table is part of the build, so it always lists what exists.
    readme = _readme_output(root, read)
    if readme is not None:
        outputs.append(readme)
    wanted = {p.name for p in solutions}
    stale = [p for p in sorted((root / NOTEBOOKS_DIR).glob(NOTEBOOK_GLOB)) if p.name not in wanted]
    return outputs, stale


def differing(outputs: Iterable[BuildOutput]) -> list[Path]:
    """The outputs whose file is missing or has other bytes than the build would write."""
    return [o.path for o in outputs
            if not o.path.exists() or o.path.read_text(encoding="utf-8") != o.text]


README_START, README_END = "<!-- notebooks:start -->", "<!-- notebooks:end -->"


def _title_line(source: str, key: str) -> str:
    """The text after ``**key:**`` in a title cell ('' when the line is absent)."""
    for line in source.splitlines():
        if line.strip().startswith(f"**{key}:**"):
            return line.strip()[len(key) + 5:].strip()
    return ""


def notebook_table(solutions: list[tuple[str, NotebookNode]]) -> str:
    """The README's notebook table, read from each solution's title cell.

    The title cell gives the name (``# NN · Title``), the ``**Seed:**`` line and the
    ``**You build:**`` line; the badge opens the student copy in Colab.
    """
    rows = ["| # | notebook | seed | you build | Colab |", "|---|---|---|---|---|"]
    for filename, nb in solutions:
        first = nb.cells[0].source if nb.cells else ""
        heading = next((ln for ln in first.splitlines() if ln.startswith("# ")), f"# {filename}")
        title = heading[2:].split("·", 1)[-1].strip()
        seed = _title_line(first, "Seed").split(":", 1)[0].rstrip(".")  # the part before details
        rows.append(f"| {filename[:2]} | [{title}]({SOLUTIONS_DIR}/{filename}) | "
                    f"{seed} | {_title_line(first, 'You build')} | "
                    f"{badge_markdown(NOTEBOOKS_DIR, filename)} |")
    return "\n".join(rows)


def _readme_output(root: Path, solutions: list[tuple[str, NotebookNode]]) -> BuildOutput | None:
    readme = root / "README.md"
    if not readme.exists():
        return None
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return None
    table = notebook_table(solutions)
    return BuildOutput(readme, text[: start + len(README_START)] + "\n" + table + "\n" + text[end:])


def build(root: Path, *, check: bool = False) -> list[Path]:
    """Build ``root/notebooks`` from ``root/solutions``; return the files that changed.

    With ``check`` nothing is written: the returned list names what the build *would* change
    (including stale student notebooks it would delete).
    """
    outputs, stale = plan_build(root)
    changed = differing(outputs)
    if check:
        return changed + stale
    by_path = {o.path: o for o in outputs}
    for path in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        # newline="\n": identical bytes on every OS.
        path.write_text(by_path[path].text, encoding="utf-8", newline="\n")
    for path in stale:
        path.unlink()
    return changed + stale


def default_root() -> Path:
    """The repository root: the folder that holds this package (and ``course_utils``)."""
    return Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.nbbuild",
        description="Write the student notebooks notebooks/NN_*.ipynb from solutions/NN_*.ipynb "
                    "(exercise blocks replaced, outputs cleared, Colab badge and bootstrap cell).")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 listing the files that are not up to date")
    parser.add_argument("--root", type=Path, default=default_root(),
                        help="repository root (default: the checkout holding course_tools)")
    args = parser.parse_args(argv)
    try:
        changed = build(args.root, check=args.check)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rel = [str(p.relative_to(args.root)) if p.is_relative_to(args.root) else str(p) for p in changed]
    if args.check:
        if rel:
            print("not up to date (run `make notebooks`):\n  " + "\n  ".join(rel))
            return 1
        print("notebooks are up to date")
        return 0
    for path, shown in zip(changed, rel, strict=True):
        print(f"{'wrote' if path.exists() else 'removed stale'} {shown}")
    if not rel:
        print("nothing to do: notebooks are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
