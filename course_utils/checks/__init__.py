"""Exercise checks: run a student's function on cases, say precisely what is wrong, fall back.

Every exercise cell in a notebook is followed by a check cell of the form::

    box_iou = checks.nb01.check_box_iou(box_iou)

The check runs the student's function on a list of :class:`Case` objects, compares each result
with the reference implementation in ``course_utils`` and prints one line per problem (which case,
shape, dtype, expected vs got).  It returns the student's function when every case passed and the
reference implementation otherwise, so that an unfinished exercise never blocks the rest of the
notebook.

Hidden cases run too but never print their values, so copying printed expectations does not
pass.  Each outcome is recorded in :data:`RESULTS`; when ``$COURSE_GRADE_REPORT`` names a file
each outcome is also appended to it as one JSON line, which is how the grader reads a notebook.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Case", "CheckResult", "RESULTS", "compare", "run_exercise", "summary"]


@dataclass
class Case:
    """One input to an exercise.  ``expected`` defaults to the reference's output."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    expected: Any = None
    # Optional custom comparison for this case: returns None when fine, else a message.
    compare: Callable[[Any, Any], str | None] | None = None


@dataclass
class CheckResult:
    """The outcome of one exercise check (what the grader reads)."""

    exercise: str
    implemented: bool
    passed: bool
    n_cases: int
    n_failed: int
    messages: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self))


RESULTS: dict[str, CheckResult] = {}


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, np.ndarray):
        return f"ndarray(shape={x.shape}, dtype={x.dtype})"
    return f"{type(x).__name__}"


def _preview(x: torch.Tensor, n: int = 6) -> str:
    flat = x.detach().flatten()[:n].tolist()
    return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat) + (
        ", ...]" if x.numel() > n else "]"
    )


def compare(got: Any, expected: Any, *, atol: float = 1e-5, rtol: float = 1e-4,
            path: str = "output", show_values: bool = True) -> str | None:
    """Compare ``got`` with ``expected``; return ``None`` when they match, else one message.

    Tensors must agree in shape and dtype family (floating vs integer vs bool) and in value
    within ``atol``/``rtol``; tuples and lists are compared element by element.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: expected a torch.Tensor, got {_describe(got)}"
        if tuple(got.shape) != tuple(expected.shape):
            return (f"{path}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dtype.is_floating_point != expected.dtype.is_floating_point or (
            (got.dtype == torch.bool) != (expected.dtype == torch.bool)
        ):
            return f"{path}: expected dtype like {expected.dtype}, got {got.dtype}"
        if expected.numel() == 0:
            return None
        if expected.dtype.is_floating_point:
            g, e = got.detach().double().cpu(), expected.detach().double().cpu()
            if torch.isnan(g).any() and not torch.isnan(e).any():
                return f"{path}: contains NaN (first values {_preview(g)})"
            ok = torch.isclose(g, e, atol=atol, rtol=rtol, equal_nan=True)
        else:
            ok = got.cpu() == expected.cpu()
        if not bool(ok.all()):
            bad = (~ok).nonzero()[0].tolist()
            n_bad = int((~ok).sum())
            where = f"index {tuple(bad)}"
            if show_values:
                return (f"{path}: {n_bad} of {ok.numel()} values differ; first at {where}: "
                        f"expected {expected[tuple(bad)].item():.6g}, got {got[tuple(bad)].item():.6g}")
            return f"{path}: {n_bad} of {ok.numel()} values differ"
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{path}: expected a sequence of {len(expected)} items, got {_describe(got)}" + (
                f" of length {len(got)}" if isinstance(got, (tuple, list)) else "")
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = compare(g, e, atol=atol, rtol=rtol, path=f"{path}[{i}]", show_values=show_values)
            if msg:
                return msg
        return None
    if isinstance(expected, float):
        if not isinstance(got, (int, float)) and not (isinstance(got, torch.Tensor) and got.numel() == 1):
            return f"{path}: expected a number, got {_describe(got)}"
        g = float(got)
        if not math.isclose(g, expected, abs_tol=atol, rel_tol=rtol):
            return f"{path}: expected {expected:.6g}, got {g:.6g}" if show_values else f"{path}: wrong value"
        return None
    if got != expected:
        return f"{path}: expected {expected!r}, got {got!r}" if show_values else f"{path}: wrong value"
    return None


def hide_values(cmp: Callable[[Any, Any], str | None]) -> Callable[[Any, Any], str | None]:
    """Wrap a custom comparison for hidden cases: keep where it failed, drop the numbers."""
    def hidden(got: Any, expected: Any) -> str | None:
        msg = cmp(got, expected)
        return None if msg is None else msg.split(":")[0] + ": wrong value, shape or dtype"
    return hidden


def _report(result: CheckResult) -> None:
    RESULTS[result.exercise] = result
    target = os.environ.get("COURSE_GRADE_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(result.to_json() + "\n")


def is_package_code(fn: Any) -> bool:
    """Whether ``fn`` comes from ``course_utils`` itself (outside the checks), i.e. it is a
    reference implementation rather than the student's own code."""
    module = getattr(fn, "__module__", None) or ""
    return module == "course_utils" or (
        module.startswith("course_utils.") and not module.startswith("course_utils.checks"))


def run_exercise(exercise: str, student: Callable, reference: Callable, cases: Sequence[Case],
                 hidden: Sequence[Case] = (), *, atol: float = 1e-5, rtol: float = 1e-4,
                 verbose: bool = True, uses_reference: bool | None = None) -> Callable:
    """Check ``student`` against ``reference`` on ``cases`` (+ ``hidden``); return what to use next.

    Returns ``student`` when every case passes, otherwise ``reference`` (with a note), so that the
    notebook always goes on.  A ``NotImplementedError`` on the first case means "not started".
    Handing the package's own implementation to a check never counts as passing:
    ``uses_reference`` (default: detected from where ``student`` was defined) marks it.
    """
    if uses_reference is None:
        uses_reference = student is reference or is_package_code(student)
    if uses_reference:
        result = CheckResult(exercise, False, False, len(cases) + len(hidden), 0,
                             ["the package's reference implementation was checked, not your code"])
        _report(result)
        if verbose:
            print(f"[ ] {exercise}: this is the package's reference implementation, not your own "
                  "code; write the function above to earn the point.")
        return reference
    messages: list[str] = []
    n_failed = 0
    implemented = True
    all_cases = [(c, False) for c in cases] + [(c, True) for c in hidden]
    for case, is_hidden in all_cases:
        label = "a hidden case" if is_hidden else f"case '{case.name}'"
        expected = case.expected
        if expected is None:
            expected = reference(*case.args, **case.kwargs)
        try:
            got = student(*_clone(case.args), **_clone(case.kwargs))
        except NotImplementedError:
            implemented = False
            n_failed = len(all_cases)
            messages = ["not implemented yet"]
            break
        except Exception as exc:  # a student's bug: report it, never crash the notebook
            n_failed += 1
            tb = traceback.extract_tb(exc.__traceback__)
            line = f" (line {tb[-1].lineno})" if tb else ""
            messages.append(f"{label}: raised {type(exc).__name__}: {exc}{line}")
            continue
        cmp = case.compare or (lambda g, e, hide=is_hidden: compare(g, e, atol=atol, rtol=rtol,
                                                                    show_values=not hide))
        msg = cmp(got, expected)
        if msg:
            n_failed += 1
            messages.append(f"{label}: {msg}")
    passed = implemented and n_failed == 0
    _report(CheckResult(exercise, implemented, passed, len(all_cases), n_failed, messages))
    if verbose:
        _print_outcome(exercise, implemented, passed, len(all_cases), messages, reference)
    return student if passed else reference


def _print_outcome(exercise: str, implemented: bool, passed: bool, n: int, messages: list[str],
                   reference: Callable) -> None:
    ref_name = f"{reference.__module__}.{reference.__qualname__}"
    if not implemented:
        print(f"[ ] {exercise}: not implemented yet. The cells below use the reference "
              f"implementation {ref_name} so the notebook still runs.")
    elif passed:
        print(f"[x] {exercise}: all {n} cases passed.")
    else:
        print(f"[!] {exercise}: {len(messages)} of {n} cases failed:")
        for m in messages:
            print(f"      - {m}")
        print(f"    The cells below use the reference implementation {ref_name}.")


def _clone(x: Any) -> Any:
    """Copy tensors so that a student's in-place edit cannot corrupt the next case."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def summary() -> str:
    """One line per exercise checked so far in this process (for a notebook's last cell)."""
    if not RESULTS:
        return "no exercise checked yet"
    rows = [f"{'x' if r.passed else ' '} {r.exercise}" for r in RESULTS.values()]
    done = sum(r.passed for r in RESULTS.values())
    return "\n".join(rows + [f"{done}/{len(RESULTS)} exercises passed"])


def __getattr__(name: str) -> Any:
    """Import ``checks.nbNN`` on first use, so ``checks.nb01.check_box_iou`` works after
    ``from course_utils import checks`` without importing every notebook's checks up front."""
    if name.startswith("nb") and name[2:].isdigit():
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
