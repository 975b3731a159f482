"""Checking a student's ``nn.Module`` class against the reference class.

Random initialisation makes two correct modules give different outputs, so the check builds both
with the same constructor arguments, copies the reference's weights into the student's module
(which therefore has to name its layers as the exercise says) and then compares outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import Case, Hint, is_package_code, run_exercise


class _WeightsMismatch(Exception):
    pass


def build_like(cls: type, ref_cls: type, kwargs: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """Instantiate ``cls`` and ``ref_cls`` with ``kwargs``; load the reference weights into the student's."""
    torch.manual_seed(0)
    ref = ref_cls(**kwargs)
    torch.manual_seed(0)
    stu = cls(**kwargs)
    if not isinstance(stu, nn.Module):
        raise TypeError(f"{cls.__name__}(...) should build an nn.Module, got {type(stu).__name__}")
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in stu.state_dict().items()}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        shapes = sorted(f"{k}: expected {want[k]}, got {got[k]}" for k in set(want) & set(got)
                        if want[k] != got[k])
        parts = ([f"missing parameters {missing[:6]}"] if missing else []) + (
            [f"unexpected parameters {extra[:6]}"] if extra else []) + (
            [f"wrong shapes {shapes[:4]}"] if shapes else [])
        raise _WeightsMismatch("the module's parameters differ from the exercise's layout: "
                               + "; ".join(parts) + ". Use the layer names given in the exercise.")
    stu.load_state_dict(ref.state_dict())
    return stu.eval(), ref.eval()


def check_module(exercise: str, cls: type, ref_cls: type, cases: list[tuple[str, dict, tuple]],
                 hidden: list[tuple[dict, tuple]] = (), call: Callable | None = None,
                 atol: float = 1e-5, hints: Sequence[Hint] = ()) -> type:
    """Compare ``cls`` with ``ref_cls`` on ``(name, ctor_kwargs, forward_args)`` cases.

    Returns ``cls`` when every case passes, else ``ref_cls`` (so the notebook goes on).
    ``call(module, *args)`` runs the forward (default ``module(*args)``).  ``hints``: common
    mistakes, each ``Hint(message, wrong)`` with ``wrong(reference_module, *args)`` the forward
    with that mistake made (on the reference's layers and weights).
    """
    call = call or (lambda m, *a: m(*a))

    def as_case_hint(hint: Hint) -> Hint:
        def wrong(kwargs, *args):
            torch.manual_seed(0)
            module = ref_cls(**kwargs).eval()
            with torch.no_grad():
                return hint.wrong(module, *args)
        return Hint(hint.message, wrong)

    def student(kwargs, *args):
        stu, _ = build_like(cls, ref_cls, kwargs)
        with torch.no_grad():
            return call(stu, *args)

    def reference(kwargs, *args):
        torch.manual_seed(0)
        ref = ref_cls(**kwargs).eval()
        with torch.no_grad():
            return call(ref, *args)

    # The check's message names the reference class the notebook falls back to.
    reference.__module__, reference.__qualname__ = ref_cls.__module__, ref_cls.__qualname__

    def wrap(name: str, kwargs: dict, args: tuple) -> Case:
        return Case(name, (kwargs, *args))

    def run_student(kwargs, *args):
        try:
            return student(kwargs, *args)
        except _WeightsMismatch as e:
            raise ValueError(str(e)) from None

    chosen = run_exercise(exercise, run_student, reference,
                          [wrap(n, k, a) for n, k, a in cases],
                          [wrap("h", k, a) for k, a in hidden], atol=atol,
                          uses_reference=cls is ref_cls or is_package_code(cls),
                          hints=[as_case_hint(h) for h in hints])
    return cls if chosen is run_student else ref_cls
