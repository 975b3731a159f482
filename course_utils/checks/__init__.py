"""Exercise checks: run a student's function on cases, say precisely what is wrong, fall back.

Every exercise cell in a notebook is followed by a check cell of the form::

    box_iou = checks.nb01.check_box_iou(box_iou)

The check runs the student's function on a list of :class:`Case` objects, compares each result
with the reference implementation in ``course_utils`` and prints one line per problem (which case,
shape, dtype, expected vs got).  It returns the student's function when every case passed and the
reference implementation otherwise, so that an unfinished exercise never blocks the rest of the
notebook.

Hidden cases run too but never print their values (nor the messages of the exceptions they
raise), so copying printed expectations does not pass.  Each outcome is recorded in
:data:`RESULTS`, for the notebook's summary only: the grader never reads anything a notebook
wrote.  It runs the same check functions twice instead (see :mod:`course_tools.grade`): once in a
sandboxed child that holds the student's definitions, where :func:`collecting` records what the
student's code returned for every case, and once in the grader, where :func:`replaying` hands
those outputs to the comparison with the reference.
"""

from __future__ import annotations

import contextlib
import json
import math
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Case", "CheckResult", "Hint", "Outcome", "RESULTS", "collecting", "compare", "passed",
           "replaying", "run_exercise", "made_by", "say_if_reference", "summary"]


@dataclass
class Case:
    """One input to an exercise.  ``expected`` defaults to the reference's output."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    expected: Any = None
    # Optional custom comparison for this case: returns None when fine, else a message.
    compare: Callable[[Any, Any], str | None] | None = None


@dataclass(frozen=True)
class Hint:
    """A common mistake of an exercise, recognised from the student's output on a failed case.

    ``wrong``: the reference with that mistake made (same arguments); the hint applies when the
    student's output matches it the way the case compares outputs.  Or ``matches(got, case)``:
    a test on the output itself, for cases checked by rules rather than against one answer.
    ``message`` names the mistake without giving the code away.
    """

    message: str
    wrong: Callable | None = None
    matches: Callable[[Any, Case], bool] | None = None


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


class Opaque:
    """Stands for a returned object that is not data (tensors, numbers, strings and containers of
    them), e.g. a module or a NumPy array, when it crosses from the grader's child to the grader."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


def _describe(x: Any) -> str:
    if isinstance(x, Opaque):
        return x.type_name
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
            n_bad = int((~ok).sum())
            if expected.ndim == 0:  # a scalar: there is no index to point at
                if show_values:
                    return f"{path}: expected {expected.item():.6g}, got {got.item():.6g}"
                return f"{path}: wrong value"
            bad = (~ok).nonzero()[0].tolist()
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


# --------------------------------------------------------------------------- where outputs come from


@dataclass
class Outcome:
    """What the student's code did on one case: returned ``value``, or raised.

    ``kind`` is ``"returned"``, ``"raised"`` (``error`` is the exception's type name, ``message``
    its text, ``line`` the line in the student's code) or ``"not_implemented"``.
    """

    kind: str
    value: Any = None
    error: str = ""
    message: str = ""
    line: int | None = None


# None: run the student's code here.  ("collect", {exercise: [Outcome]}): run it and record.
# ("replay", {exercise: [Outcome]}): do not run it; take the recorded outcomes.
_MODE: tuple[str, dict[str, list[Outcome]]] | None = None


@contextlib.contextmanager
def collecting() -> Iterator[dict[str, list[Outcome]]]:
    """Record the student's outcomes of every case of every check run inside (the grader's child)."""
    global _MODE
    saved, record = _MODE, {}
    _MODE = ("collect", record)
    try:
        yield record
    finally:
        _MODE = saved


@contextlib.contextmanager
def replaying(outcomes: dict[str, list[Outcome]]) -> Iterator[None]:
    """Checks inside compare recorded outcomes with the reference instead of calling the student's
    code (the grader's own process, which runs no student code)."""
    global _MODE
    saved = _MODE
    _MODE = ("replay", outcomes)
    try:
        yield
    finally:
        _MODE = saved


def _outcome(student: Callable, case: Case) -> Outcome:
    try:
        return Outcome("returned", student(*_clone(case.args), **_clone(case.kwargs)))
    except NotImplementedError:
        return Outcome("not_implemented")
    except Exception as exc:  # a student's bug: report it, never crash the notebook
        tb = traceback.extract_tb(exc.__traceback__)
        return Outcome("raised", error=type(exc).__name__, message=str(exc),
                       line=tb[-1].lineno if tb else None)


def _student_outcomes(exercise: str, student: Callable, cases: Sequence[Case]) -> Iterator[Outcome]:
    """The student's outcome of each case, computed, recorded or replayed as the mode says."""
    if _MODE is not None and _MODE[0] == "replay":
        recorded = _MODE[1].get(exercise, [])
        for i in range(len(cases)):
            yield recorded[i] if i < len(recorded) else Outcome(
                "raised", error="NoOutput", message="the grader got no output for this case")
        return
    record = _MODE[1].setdefault(exercise, []) if _MODE is not None else None
    for case in cases:
        outcome = _outcome(student, case)
        if record is not None:
            record.append(outcome)
        yield outcome


def is_package_code(fn: Any) -> bool:
    """Whether ``fn`` comes from ``course_utils`` itself (outside the checks), i.e. it is a
    reference implementation rather than the student's own code."""
    module = getattr(fn, "__module__", None) or ""
    return module == "course_utils" or (
        module.startswith("course_utils.") and not module.startswith("course_utils.checks"))


def _hints(hints: Sequence[Hint], failed: Sequence[tuple[Case, Any, Callable]]) -> list[str]:
    """The messages of the ``hints`` whose mistake explains every failed case's output.

    Computed from the outputs the student's code returned (recorded, in the grader) and the
    reference side only; the global RNG is left as it was, so that later cells see the same state
    whether or not a hint was looked for."""
    if not failed:
        return []
    found: list[str] = []
    with torch.random.fork_rng(devices=[]):
        for hint in hints:
            if all(_explains(hint, case, got, cmp) for case, got, cmp in failed):
                found.append(hint.message)
    return found


def _explains(hint: Hint, case: Case, got: Any, cmp: Callable) -> bool:
    try:
        if hint.matches is not None:
            return bool(hint.matches(got, case))
        wrong = hint.wrong(*_clone(case.args), **_clone(case.kwargs))
        return cmp(got, wrong) is None
    except Exception:  # a variant that does not apply to this case
        return False


def run_exercise(exercise: str, student: Callable, reference: Callable, cases: Sequence[Case],
                 hidden: Sequence[Case] = (), *, atol: float = 1e-5, rtol: float = 1e-4,
                 verbose: bool = True, uses_reference: bool | None = None,
                 hints: Sequence[Hint] = ()) -> Callable:
    """Check ``student`` against ``reference`` on ``cases`` (+ ``hidden``); return what to use next.

    Returns ``student`` when every case passes, otherwise ``reference`` (with a note), so that the
    notebook always goes on.  A ``NotImplementedError`` on the first case means "not started".
    Handing the package's own implementation to a check never counts as passing:
    ``uses_reference`` (default: detected from where ``student`` was defined) marks it.
    ``hints``: the exercise's common mistakes; each one a failed case's output shows is named.
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
    failed: list[tuple[Case, Any, Callable]] = []
    n_failed = 0
    implemented = True
    all_cases = [(c, False) for c in cases] + [(c, True) for c in hidden]
    outcomes = _student_outcomes(exercise, student, [c for c, _ in all_cases])
    for case, is_hidden in all_cases:
        label = "a hidden case" if is_hidden else f"case '{case.name}'"
        expected = case.expected
        if expected is None:
            # before the student's call, as always: a reference that draws from the global RNG
            # leaves the student's code the same RNG state in the notebook, the child and here
            expected = reference(*case.args, **case.kwargs)
        outcome = next(outcomes)
        if outcome.kind == "not_implemented":
            implemented = False
            n_failed = len(all_cases)
            messages = ["not implemented yet"]
            break
        if outcome.kind == "raised":
            n_failed += 1
            line = f" (line {outcome.line})" if outcome.line else ""
            # a hidden case's exception text could carry its inputs: only the type and the line
            text = "" if is_hidden or not outcome.message else f": {outcome.message}"
            messages.append(f"{label}: raised {outcome.error}{text}{line}")
            continue
        got = outcome.value
        cmp = case.compare or (lambda g, e, hide=is_hidden: compare(g, e, atol=atol, rtol=rtol,
                                                                    show_values=not hide))
        msg = cmp(got, expected)
        if msg:
            n_failed += 1
            messages.append(f"{label}: {msg}")
            failed.append((case, got, cmp))
    if _MODE is None or _MODE[0] == "replay":  # the grader's child only records outputs
        messages += [f"hint: {h}" for h in _hints(hints, failed)]
    passed = implemented and n_failed == 0
    _report(CheckResult(exercise, implemented, passed, len(all_cases), n_failed, messages))
    if verbose and _MODE is None:  # the grader's two runs print nothing
        _print_outcome(exercise, implemented, passed, len(all_cases), messages, reference)
    return student if passed else reference


def _print_outcome(exercise: str, implemented: bool, passed: bool, n: int, messages: list[str],
                   reference: Callable) -> None:
    number = exercise.split()[0]
    after = (f"The cells below use the course's reference implementation of {number}, so the "
             "notebook still runs; what they print comes from it, not from your code.")
    if not implemented:
        print(f"[ ] {exercise}: not implemented yet. {after}")
    elif passed:
        print(f"[x] {exercise}: all {n} cases passed.")
    else:
        problems = [m for m in messages if not m.startswith("hint: ")]
        print(f"[!] {exercise}: {len(problems)} of {n} cases failed:")
        for m in messages:
            print(f"      - {m}")
        print(f"    {after}")


def passed(exercise: str) -> bool:
    """Whether the exercise (``"1.1"`` or its full name) passed its check in this notebook."""
    for name, result in RESULTS.items():
        if name == exercise or name.split()[0] == exercise:
            return result.passed
    return False


def made_by(exercise: str, ours: str = "ours") -> str:
    """``ours`` when exercise ``"1.1"`` passed its check, else a label saying that the printed
    result came from the reference: for notebook lines printed after a check fell back."""
    return ours if passed(exercise) else f"reference implementation (your {exercise} did not pass)"


def say_if_reference(exercise: str) -> None:
    """Print one line when exercise ``"1.2"`` fell back, before a cell prints what it computed."""
    if not passed(exercise):
        print(f"(what follows comes from the reference implementation: your {exercise} did not pass)")


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
