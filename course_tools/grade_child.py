"""The grader's child: load a student's definitions, run one check's cases, write back data only.

Runs inside the sandbox (:mod:`course_tools.sandbox`) as ``python -m course_tools.grade_child
serve``, one per submission: it imports torch and the checks once, then forks a fresh process for
each job the grader sends (one JSON line per check).  A job names the checks module and function,
the student's names it takes, and the notebook cells' statements to load: imports,
``def``/``class`` and constants, nothing else of the notebook.

Everything after the student's code is loaded is untrusted, including this process's own memory:
its only product is ``outcomes.pt``, a ``torch.save`` of plain data (tensors, numbers, strings,
containers) that the grader reads with ``weights_only=True`` and compares with the reference
itself.  Before the student's code loads, the functions the exercise asks for (the course's
reference and the library equivalents, see :data:`JOB_KEYS`) are replaced by tripwires: a call to
one from the student's code raises :class:`ReferenceCalled`, which the grader reports.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

# job.json: {"checks": module, "check": function name, "args": [student names],
#            "cells": [[cell index, source, [top-level statement indices]]],
#            "bindings": {name: "module:attr"}, "denied": ["module:attr"]}
JOB_KEYS = ("checks", "check", "args", "cells", "bindings", "denied")
SUBMISSION_FILE = "<submission cell {}>"
MAX_MESSAGE = 400


class ReferenceCalled(Exception):  # noqa: N818 - reads as what happened in the feedback
    """The student's code called the function the exercise asks them to write."""


def resolve(spec: str) -> tuple[Any, str, Any]:
    """``"package.module:attr.sub"`` -> (owner object, last attribute name, value)."""
    module_name, _, attr = spec.partition(":")
    owner: Any = importlib.import_module(module_name)
    parts = attr.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1], getattr(owner, parts[-1])


def _tripwire(spec: str, real: Callable) -> Callable:
    display = spec.replace(":", ".")

    def wire(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith("<submission"):
            raise ReferenceCalled(f"calls {display}, the function this exercise asks you to write")
        return real(*args, **kwargs)  # the course's own code may use it

    wire.__name__, wire.__qualname__ = getattr(real, "__name__", "f"), getattr(real, "__qualname__", "f")
    wire.__module__, wire.__doc__ = getattr(real, "__module__", None), getattr(real, "__doc__", None)
    return wire


def _patch(spec: str, protected: set[str]) -> None:
    try:
        owner, name, real = resolve(spec)
    except (ImportError, AttributeError):
        return
    if callable(real) and not isinstance(real, type) and not getattr(real, "_course_tripwire", False):
        wire = _tripwire(spec, real)
        wire._course_tripwire = True
        setattr(owner, name, wire)
    module = sys.modules.get(spec.partition(":")[0])
    if getattr(module, "__file__", None):
        protected.add(module.__file__)


class _PatchOnImport:
    """Patches a denied function the moment its module is first imported, so that a library the
    student's code may never use (torchvision for a pure-torch exercise) costs no import here."""

    def __init__(self, pending: dict[str, list[str]], protected: set[str]) -> None:
        self.pending, self.protected = pending, protected

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        specs, loader = self.pending.pop(name), spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            for s in specs:
                _patch(s, self.protected)

        loader.exec_module = exec_module  # this module's own loader object
        return spec


def install_tripwires(denied: list[str]) -> set[str]:
    """Replace each denied function in its module, now or when the module is first imported;
    return the (growing) set of source files no one may re-run or read."""
    protected: set[str] = set()
    pending: dict[str, list[str]] = {}
    for spec in denied:
        module = spec.partition(":")[0]
        if module in sys.modules:
            _patch(spec, protected)
        else:
            pending.setdefault(module, []).append(spec)
    if pending:
        sys.meta_path.insert(0, _PatchOnImport(pending, protected))
    return protected


def install_audit_hook(protected: set[str]) -> None:
    """No subprocesses, and no re-executing or reading the modules that hold tripwires."""
    blocked = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "pty.spawn"}

    def hook(event: str, args: tuple) -> None:
        if event in blocked:
            raise PermissionError(f"{event} is not allowed while grading")
        if event == "exec" and args and getattr(args[0], "co_filename", None) in protected:
            raise PermissionError("re-running a reference module is not allowed while grading")
        if event == "open" and args and isinstance(args[0], str) and args[0] in protected:
            raise PermissionError("reading a reference module is not allowed while grading")

    sys.addaudithook(hook)


def load_definitions(cells: list, namespace: dict) -> None:
    """Execute the chosen top-level statements of each cell, with the cell as the file name."""
    for index, source, keep in cells:
        tree = ast.parse(source)
        body = [tree.body[i] for i in keep]
        code = compile(ast.Module(body=body, type_ignores=[]), SUBMISSION_FILE.format(index), "exec")
        exec(code, namespace)  # noqa: S102 - the student's definitions, inside the sandbox


def to_wire(x: Any, depth: int = 0) -> Any:
    """Plain data that ``torch.load(weights_only=True)`` accepts; anything else is described."""
    import torch

    if depth > 20:
        return {"__opaque__": "deeply nested object"}
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().clone()
        return t.requires_grad_(True) if x.requires_grad and t.is_floating_point() else t
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        items = [to_wire(v, depth + 1) for v in x]
        return tuple(items) if isinstance(x, tuple) else items
    if isinstance(x, dict) and all(isinstance(k, (str, int)) for k in x):
        return {k: to_wire(v, depth + 1) for k, v in x.items()}
    return {"__opaque__": type(x).__name__}


def outcome_to_wire(outcome: Any) -> dict:
    return {"kind": outcome.kind, "value": to_wire(outcome.value), "error": outcome.error[:80],
            "message": outcome.message[:MAX_MESSAGE], "line": outcome.line}


def _all_failed(message: str, error: str = "LoadError") -> dict:
    return {"__all__": {"kind": "raised", "value": None, "error": error,
                        "message": message[:MAX_MESSAGE], "line": None}}


def run(job: dict) -> dict:
    """The outcomes of ``job`` as wire data: ``{exercise: [outcome, ...]}`` or ``{"__all__": …}``."""
    import torch  # noqa: F401 - imported before the student's code, as in the notebook

    checks = importlib.import_module(job["checks"])
    check = getattr(checks, job["check"])
    bindings = {name: resolve(spec)[2] for name, spec in job["bindings"].items()}
    protected = install_tripwires(job["denied"])
    from course_utils.checks import collecting

    install_audit_hook(protected)
    namespace: dict[str, Any] = {"__name__": "__submission__", "__builtins__": builtins}
    try:
        load_definitions(job["cells"], namespace)
    except Exception as exc:  # noqa: BLE001 - whatever the cells raise is the student's
        return _all_failed(f"your definitions did not load: {type(exc).__name__}: {exc}")
    namespace.update(bindings)  # earlier exercises that failed: the reference, as in the notebook
    missing = [n for n in job["args"] if n not in namespace]
    if missing:
        return _all_failed(f"name {missing[0]!r} is not defined (the grader loads only your "
                           "imports, functions, classes and constants)", "NameError")
    with collecting() as record:
        try:
            check(*[namespace[n] for n in job["args"]])
        except Exception as exc:  # noqa: BLE001 - e.g. a class whose layers cannot be built
            record.setdefault("__error__", []).append(str(exc))
    return {exercise: [outcome_to_wire(o) for o in outcomes]
            for exercise, outcomes in record.items() if exercise != "__error__"}


def _child(job: dict, out_path: str, log_path: str) -> None:
    """In the forked process: no way back to the grader but ``out_path``; run; save; exit."""
    import os

    import torch

    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, 1 << 16)  # nothing inherited: not the pipes to the grader, not the job file
    status = 0
    try:
        torch.save(run(job), out_path)
    except BaseException:  # noqa: BLE001 - an exit() or a crash in the student's code: no output
        status = 1
    os._exit(status)


def serve() -> int:
    """Read one job per line on stdin; run each in a fresh forked process; answer ``done <id>``.

    The imports (torch, the checks, the modules with the references) happen once, here, before
    any student code exists; each fork then starts from that state and ends with its job.
    """
    import os
    import time

    import torch  # noqa: F401 - warm, before the first fork

    for line in sys.stdin:
        job = json.loads(line)
        meta = {k: job.pop(k) for k in ("id", "out", "log", "timeout")}
        if sorted(job) != sorted(JOB_KEYS):
            raise SystemExit(f"a job needs the keys {JOB_KEYS}")
        importlib.import_module(job["checks"])  # warm for every fork; the rest is imported lazily
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(job, meta["out"], meta["log"])
        deadline = time.monotonic() + float(meta["timeout"])
        state = "ok"
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                state = "timeout"
                break
            time.sleep(0.01)
        print(f"done {meta['id']} {state}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if sys.path and sys.path[0] in ("", ".", __import__("os").getcwd()):
        sys.path.pop(0)  # the working folder is the student's
    if argv != ["serve"]:
        raise SystemExit("usage: python -m course_tools.grade_child serve  (jobs on stdin)")
    return serve()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
