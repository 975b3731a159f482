"""Scores that come from the grader alone: one sandboxed child per check, compared here.

For each check of a notebook (in the solution's order) the grader

1. picks the student's definitions that the check needs out of the submitted notebook (the names
   the check takes, and the imports, functions, classes and constants those use, nothing else);
2. looks for uses of the exercise's own reference in them (:func:`reference_uses`): the course's
   function, or the library function the exercise re-implements; a use scores 0;
3. runs them in a fresh sandboxed child (:mod:`course_tools.grade_child`), which runs the check's
   cases and writes back only what the student's code returned (plain data);
4. replays the same check here on those outputs (:func:`course_utils.checks.replaying`), so the
   comparison with the reference, the hidden cases and the verdict never leave this process.

Nothing the submission's notebook run printed or wrote is read.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from . import sandbox
from .grade_child import JOB_KEYS

MAX_OUTCOMES_BYTES = 64 << 20
_KINDS = ("returned", "raised", "not_implemented")


@dataclass
class CheckPlan:
    """One check call of the solution: ``names = module.check(*args)``."""

    check: str
    args: list[str]
    denied: list[str] = field(default_factory=list)  # "module:attr" the exercise re-implements


@dataclass
class CheckVerdict:
    """What one exercise scored and why (the grader's own comparison)."""

    exercise: str
    passed: bool
    implemented: bool
    n_cases: int
    n_failed: int
    messages: list[str]


class _NotHere:
    """Stands for the student's function in the grader, which never calls it."""

    def __init__(self, name: str) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = "__submission__"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the grader never runs a submission's code in its own process")


# --------------------------------------------------------------------------- the plan


def parsed_cells(nb: nbformat.NotebookNode, until: int | None = None):
    """``(index, source, tree)`` of each code cell before ``until`` that parses."""
    for index, cell in enumerate(nb.cells[:until]):
        if cell.cell_type != "code":
            continue
        try:
            yield index, cell.source, ast.parse(cell.source)
        except SyntaxError:
            continue


def check_calls(nb: nbformat.NotebookNode) -> list[tuple[int, str, list[str]]]:
    """``(cell index, check function, argument names)`` of every check call, in order."""
    calls = []
    for index, _, tree in parsed_cells(nb):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name.startswith("check_") and node.args and all(isinstance(a, ast.Name) for a in node.args):
                calls.append((index, name, [a.id for a in node.args]))
    return calls


def _spec_of(obj: Any) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__submission__":
        return None
    return f"{module}:{qualname}"


def make_plan(solution: nbformat.NotebookNode, checks_module: str) -> list[CheckPlan]:
    """The checks of ``solution`` with what each may not call (found by a replay with no outputs:
    every case fails, so each check hands back its reference)."""
    from course_utils import checks

    module = importlib.import_module(checks_module)
    extra = getattr(module, "LIBRARY_EQUIVALENTS", {})
    plan = []
    for _, check, args in check_calls(solution):
        if not hasattr(module, check):
            continue
        with checks.replaying({}):
            returned = getattr(module, check)(*[_NotHere(a) for a in args])
        returned = returned if isinstance(returned, tuple) else (returned,)
        denied = [s for s in map(_spec_of, returned) if s] + list(extra.get(check, ()))
        plan.append(CheckPlan(check, args, denied))
    return plan


# --------------------------------------------------------------------------- definitions


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _is_definition(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        try:  # a constant a function may read, e.g. EPS = 1e-6
            ast.literal_eval(node.value)
            return True
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False
    return False


def select_definitions(nb: nbformat.NotebookNode, names: Sequence[str], until: int | None = None
                       ) -> tuple[list[list], list[tuple[int, ast.stmt]]]:
    """The statements that define ``names`` and what they use, from the code cells before
    ``until``: ``([[cell index, source, [statement indices]]], [(cell index, statement)])``."""
    where: dict[str, tuple[int, int, ast.stmt]] = {}
    sources: dict[int, str] = {}
    for index, source, tree in parsed_cells(nb, until):
        sources[index] = source
        for i, node in enumerate(tree.body):
            if _is_definition(node):
                for name in _bound_names(node):
                    where[name] = (index, i, node)  # the last definition wins, as in the notebook
    chosen: set[tuple[int, int]] = set()
    todo = [n for n in names if n in where]
    while todo:
        index, i, node = where[todo.pop()]
        if (index, i) in chosen:
            continue
        chosen.add((index, i))
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        todo += [n for n in used if n in where and (where[n][0], where[n][1]) not in chosen]
    cells = []
    for index in sorted({c for c, _ in chosen}):
        cells.append([index, sources[index], sorted(i for c, i in chosen if c == index)])
    statements = [(c, where_node) for c, src, keep in cells
                  for where_node in (ast.parse(src).body[i] for i in keep)]
    return cells, statements


def reference_uses(statements: Sequence[tuple[int, ast.stmt]], denied: Sequence[str]) -> list[str]:
    """Where the chosen statements name a denied function, e.g. ``reference.box_iou``,
    ``torchvision.ops.box_iou`` or an alias imported from it."""
    targets = {spec.replace(":", ".") for spec in denied}
    aliases: dict[str, str] = {}
    for _, stmt in statements:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    found = set()
    for cell, stmt in statements:
        for node in ast.walk(stmt):
            hits = []
            if isinstance(node, (ast.Name, ast.Attribute)) and dotted(node) in targets:
                hits.append(dotted(node))
            if isinstance(node, ast.ImportFrom) and node.module:
                hits += [f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in targets]
            found |= {f"{hit} (cell {cell}, line {getattr(node, 'lineno', '?')})" for hit in hits}
    return sorted(found)


# --------------------------------------------------------------------------- the child


def from_wire(x: Any) -> Any:
    """The child's data back into what the checks compare (``Opaque`` for non-data)."""
    from course_utils.checks import Opaque

    if isinstance(x, dict):
        if set(x) == {"__opaque__"} and isinstance(x["__opaque__"], str):
            return Opaque(x["__opaque__"][:80])
        return {k: from_wire(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_wire(v) for v in x]
    if isinstance(x, tuple):
        return tuple(from_wire(v) for v in x)
    return x


def _outcome(raw: Any) -> Any:
    from course_utils.checks import Outcome

    if not isinstance(raw, dict) or raw.get("kind") not in _KINDS:
        return Outcome("raised", error="BadOutput", message="the grader could not read this output")
    line = raw.get("line")
    return Outcome(raw["kind"], from_wire(raw.get("value")), str(raw.get("error", ""))[:80],
                   str(raw.get("message", ""))[:400], line if isinstance(line, int) else None)


def read_outcomes(path: Path) -> dict[str, list]:
    """The outcomes a child wrote, read as data only (``weights_only``), or a reason why not."""
    import torch

    from course_utils.checks import Outcome

    def failed(why: str) -> dict[str, list]:
        return {"__all__": [Outcome("raised", error="NoOutput", message=why)]}

    if not path.is_file():
        return failed("the check's run ended without output (a crash, a time limit or an exit)")
    if path.stat().st_size > MAX_OUTCOMES_BYTES:
        return failed("the outputs were too large")
    try:
        raw = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - anything else than plain data is refused
        return failed("the outputs were not plain data")
    if not isinstance(raw, dict):
        return failed("the outputs were not plain data")
    if "__all__" in raw:
        return {"__all__": [_outcome(raw["__all__"])]}
    return {str(k): [_outcome(o) for o in v] for k, v in raw.items() if isinstance(v, list)}


class ChildServer:
    """One sandboxed :mod:`course_tools.grade_child` per submission; :meth:`run` sends it a job,
    waits for its answer line and reads the forked child's outcomes file, as data only."""

    def __init__(self, *, isolation: str, hide: Sequence[Path], limits: sandbox.Limits) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="grade-checks-", ignore_cleanup_errors=True)
        self.work = Path(self._tmp.name)
        sandbox.prepare_work(self.work)
        cmd = sandbox.command([sys.executable, "-m", "course_tools.grade_child", "serve"],
                              isolation=isolation, work=self.work, hide=hide, limits=limits)
        self._log = open(self.work.parent / f"{self.work.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=self.work, env=sandbox.minimal_env(self.work),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True, text=True, bufsize=1)
        self._n = 0

    def run(self, job: dict, timeout: float) -> dict[str, list]:
        from course_utils.checks import Outcome

        assert sorted(job) == sorted(JOB_KEYS)
        self._n += 1
        out = self.work / f"outcomes-{self._n}.pt"
        line = json.dumps({**job, "id": self._n, "out": str(out), "timeout": timeout,
                           "log": str(self.work / f"check-{self._n}.log")})
        answer = self._ask(line, timeout + 60)  # the server kills its child at ``timeout``
        if answer == f"done {self._n} timeout":
            return {"__all__": [Outcome("raised", error="Timeout",
                                        message=f"the check ran longer than {timeout:g} s")]}
        return read_outcomes(out)

    def _ask(self, line: str, timeout: float) -> str | None:
        import selectors

        if self.proc.poll() is not None:
            return None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                    answer = self.proc.stdout.readline()
                    if not answer:
                        return None
                    if answer.startswith(f"done {self._n} "):
                        return answer.strip()
        self.close()
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: all it started
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)
        self._tmp.cleanup()

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the verdicts


def _expand(outcomes: dict[str, list], exercises: Sequence[str]) -> dict[str, list]:
    if "__all__" not in outcomes:
        return outcomes
    one = outcomes["__all__"][0]
    return {e: [one] * 1000 for e in exercises}


def score_notebook(nb: nbformat.NotebookNode, plan: Sequence[CheckPlan], *, checks_module: str,
                   exercises: Sequence[str], isolation: str, hide: Sequence[Path] = (),
                   timeout: float = 60, limits: sandbox.Limits | None = None) -> dict[str, CheckVerdict]:
    """Every exercise's verdict for the submitted notebook ``nb``."""
    from course_utils import checks

    module = importlib.import_module(checks_module)
    limits = limits or sandbox.Limits()
    submitted = {check: cell for cell, check, _ in reversed(check_calls(nb))}
    bindings: dict[str, str] = {}
    verdicts: dict[str, CheckVerdict] = {}
    with ChildServer(isolation=isolation, hide=hide, limits=limits) as server:
        for item in plan:
            _score_check(nb, item, server, module, checks_module, exercises, submitted, bindings,
                         verdicts, timeout)
    checks.RESULTS.clear()
    return verdicts


def _score_check(nb: nbformat.NotebookNode, item: CheckPlan, server: ChildServer, module: Any,
                 checks_module: str, exercises: Sequence[str], submitted: dict[str, int],
                 bindings: dict[str, str], verdicts: dict[str, CheckVerdict], timeout: float) -> None:
    """Score one check: pick the definitions, look for the reference, run them, replay here."""
    from course_utils import checks
    from course_utils.checks import Outcome

    cells, statements = select_definitions(nb, item.args, until=submitted.get(item.check))
    uses = reference_uses(statements, item.denied)
    if uses:
        msg = (f"uses {uses[0]}, the function this exercise asks you to write: "
               "an exercise that hands over the reference scores 0")
        outcomes: dict[str, list] = {"__all__": [Outcome("raised", error="ReferenceUsed", message=msg)]}
    else:
        job = {"checks": checks_module, "check": item.check, "args": item.args, "cells": cells,
               "bindings": {n: s for n, s in bindings.items() if n not in item.args},
               "denied": item.denied}
        outcomes = server.run(job, timeout)
    checks.RESULTS.clear()
    with checks.replaying(_expand(outcomes, exercises)):
        returned = getattr(module, item.check)(*[_NotHere(a) for a in item.args])
    for exercise, result in checks.RESULTS.items():
        messages = list(result.messages)
        if any("ReferenceCalled" in m or "ReferenceUsed" in m for m in messages):
            messages.insert(0, "scores 0: the exercise's own reference (or the library function "
                               "it re-implements) was used instead of your code")
        verdicts[exercise] = CheckVerdict(exercise, result.passed, result.implemented,
                                          result.n_cases, result.n_failed, messages)
    returned = returned if isinstance(returned, tuple) else (returned,)
    for name, obj in zip(item.args, returned):
        spec = None if isinstance(obj, _NotHere) else _spec_of(obj)
        if spec:
            bindings[name] = spec  # later checks use the reference, as the notebook does
        else:
            bindings.pop(name, None)
