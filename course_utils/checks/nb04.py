"""Checks for notebook 04 (SCAN cross-attention retrieval and matchmaps).

Each ``check_*`` runs the student's function on printed and hidden cases against the reference
in :mod:`course_utils.scan` / :mod:`course_utils.matchmap` and returns the function to use next.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import matchmap as mm_ref
from .. import scan as ref
from . import Case, compare, run_exercise

EXERCISES = ["4.1 attend", "4.2 pool_lse / pool_avg", "4.3 hardest_negative_triplet_loss",
             "4.4 recall_at_k", "4.5 matchmap_score"]


def _unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    return ref.l2norm(torch.randn(*shape, generator=g))


def check_attend(fn: Callable) -> Callable:
    """Exercise 4.1: ``attend(query (q, d), context (c, d), lambda_softmax, context_mask=None) -> (q, d)``."""
    g = torch.Generator().manual_seed(401)
    mask = torch.tensor([True, True, True, False, False])
    cases = [
        Case("i-t: 4 regions attend to 6 words, lambda 4", (_unit(4, 8, g=g), _unit(6, 8, g=g), 4.0)),
        Case("t-i: 6 words attend to 4 regions, lambda 9", (_unit(6, 8, g=g), _unit(4, 8, g=g), 9.0)),
        Case("one region (coarse, k = 1)", (_unit(1, 8, g=g), _unit(5, 8, g=g), 4.0)),
        Case("padded context (last 2 masked)", (_unit(3, 8, g=g), _unit(5, 8, g=g), 4.0), {"context_mask": mask}),
    ]
    hidden = [Case("h", (_unit(7, 16, g=g), _unit(11, 16, g=g), 6.0)),
              Case("h", (_unit(2, 4, g=g), _unit(5, 4, g=g), 20.0), {"context_mask": mask})]
    return run_exercise(EXERCISES[0], fn, ref.attend, cases, hidden)


def check_pooling(lse: Callable, avg: Callable) -> tuple[Callable, Callable]:
    """Exercise 4.2: ``pool_lse(r, lambda_lse, mask=None)`` and ``pool_avg(r, mask=None)``, over the last axis."""
    g = torch.Generator().manual_seed(402)
    r = torch.rand(3, 5, generator=g) * 2 - 1
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[:, 0] = True

    def both(kind: str, *args, **kwargs):
        return (lse if kind == "lse" else avg)(*args, **kwargs)

    def reference(kind: str, *args, **kwargs):
        return (ref.pool_lse if kind == "lse" else ref.pool_avg)(*args, **kwargs)

    cases = [
        Case("LSE of a (3, 5) matrix, lambda 6", ("lse", r, 6.0)),
        Case("AVG of a (3, 5) matrix", ("avg", r)),
        Case("LSE with a mask", ("lse", r, 6.0), {"mask": mask}),
        Case("AVG with a mask", ("avg", r), {"mask": mask}),
    ]
    hidden = [Case("h", ("lse", torch.rand(2, 4, 7, generator=g), 20.0)),
              Case("h", ("avg", torch.rand(2, 4, 7, generator=g))),
              Case("h", ("avg", r), {"mask": mask})]
    chosen = run_exercise(EXERCISES[1], both, reference, cases, hidden)
    return (lse, avg) if chosen is both else (ref.pool_lse, ref.pool_avg)


def check_triplet_loss(fn: Callable) -> Callable:
    """Exercise 4.3: ``hardest_negative_triplet_loss(scores (B, B), margin, max_violation, img_ids) -> scalar``."""
    g = torch.Generator().manual_seed(403)
    s = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.0, 0.1, 0.7]])
    cases = [
        Case("3 x 3 by hand (expected (0.1+0.3+0+0+0.5+0.1)/3)", (s, 0.2), expected=torch.tensor(1.0 / 3)),
        Case("sum of violations instead of the hardest", (s, 0.2), {"max_violation": False}),
        Case("pairs 0 and 1 share an image", (s, 0.2), {"img_ids": torch.tensor([0, 0, 1])}),
        Case("8 x 8 random scores", (torch.rand(8, 8, generator=g), 0.2)),
    ]
    hidden = [Case("h", (torch.rand(16, 16, generator=g), 0.2)),
              Case("h", (torch.rand(6, 6, generator=g), 0.5), {"img_ids": torch.tensor([0, 1, 1, 2, 3, 3])})]
    return run_exercise(EXERCISES[2], fn, ref.hardest_negative_triplet_loss, cases, hidden)


def _cmp_recall(got, expected) -> str | None:
    if not isinstance(got, dict):
        return f"expected a dict like {sorted(expected)}, got {type(got).__name__}"
    missing = sorted(set(expected) - set(got))
    if missing:
        return f"missing keys {missing}"
    for k in expected:
        msg = compare(float(got[k]), float(expected[k]), atol=1e-3, path=k)
        if msg:
            return msg
    return None


def check_recall_at_k(fn: Callable) -> Callable:
    """Exercise 4.4: ``recall_at_k(sims (I, C), cap_to_img (C,), ks) -> {"i2t_r1", ..., "t2i_r10", "rsum"}``."""
    g = torch.Generator().manual_seed(404)
    c2i = torch.arange(3).repeat_interleave(2)
    hand = torch.tensor([[9, 0, 5, 0, 0, 0], [8, 1, 0, 7, 2, 0], [0, 0, 0, 0, 0, 0.]])
    cases = [
        Case("3 images x 2 captions by hand (ties count against)", (hand, c2i, (1, 2)), compare=_cmp_recall),
        Case("perfect scores", (torch.eye(4).repeat_interleave(5, dim=1), torch.arange(4).repeat_interleave(5)),
             compare=_cmp_recall),
        Case("20 images x 100 captions, random", (torch.rand(20, 100, generator=g),
                                                  torch.arange(20).repeat_interleave(5)), compare=_cmp_recall),
    ]
    hidden = [Case("h", (torch.rand(30, 150, generator=g), torch.arange(30).repeat_interleave(5), (1, 3, 10)),
                   compare=_cmp_recall)]
    return run_exercise(EXERCISES[3], fn, ref.recall_at_k, cases, hidden)


def check_matchmap_score(fn: Callable) -> Callable:
    """Exercise 4.5: ``matchmap_score(mm (..., n, H, W), agg, word_mask=None) -> (...)``."""
    g = torch.Generator().manual_seed(405)
    mm = torch.randn(2, 4, 3, 3, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    cases = [Case(f"{a.upper()} of two (4 words, 3x3) matchmaps", (mm, a)) for a in mm_ref.AGGREGATORS]
    cases += [Case("MISA with padded words", (mm, "misa"), {"word_mask": mask}),
              Case("SIMA with padded words", (mm, "sima"), {"word_mask": mask})]
    hidden = [Case("h", (torch.randn(3, 5, 4, 6, generator=g), a)) for a in mm_ref.AGGREGATORS]
    hidden.append(Case("h", (mm, "sisa"), {"word_mask": mask}))
    return run_exercise(EXERCISES[4], fn, mm_ref.matchmap_score, cases, hidden)


# What an exercise re-implements in a library: calling it from the exercise scores 0.
LIBRARY_EQUIVALENTS = {
    "check_attend": ("torch.nn.functional:scaled_dot_product_attention",),
}
