"""Checks for notebook 04 (SCAN cross-attention retrieval and matchmaps).

Each ``check_*`` runs the student's function on printed and hidden cases against the reference
in :mod:`course_utils.scan` / :mod:`course_utils.matchmap` and returns the function to use next.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import matchmap as mm_ref
from .. import scan as ref
from . import Case, Hint, compare, run_exercise

EXERCISES = ["4.1 attend", "4.2 pool_lse / pool_avg", "4.3 hardest_negative_triplet_loss",
             "4.4 recall_at_k", "4.5 matchmap_score"]


def _unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    return ref.l2norm(torch.randn(*shape, generator=g))


def _attend_softmax_over_queries(query, context, lambda_softmax, context_mask=None):
    sbar = ref.clipped_l2norm(query @ context.T, dim=0,
                              mask=None if context_mask is None else context_mask[None, :])
    logits = lambda_softmax * sbar
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[None, :], float("-inf"))
    return logits.softmax(dim=0) @ context


def _attend_no_lambda(query, context, lambda_softmax, context_mask=None):
    return ref.attend(query, context, 1.0, context_mask)


def _attend_raw_cosines(query, context, lambda_softmax, context_mask=None):
    logits = lambda_softmax * (query @ context.T)
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[None, :], float("-inf"))
    return logits.softmax(dim=1) @ context


ATTEND_HINTS = (
    Hint("the attention weights of each query must sum to 1 over the context (softmax over dim=1, "
         "the context items), not over the queries", _attend_softmax_over_queries),
    Hint("lambda_softmax is missing: it multiplies the normalised similarities before the softmax",
         _attend_no_lambda),
    Hint("the raw cosines went into the softmax: SCAN first clips them at 0 (leaky ReLU) and "
         "l2-normalises them over the queries", _attend_raw_cosines),
)


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
    return run_exercise(EXERCISES[0], fn, ref.attend, cases, hidden, hints=ATTEND_HINTS)


def _pool_lse_no_division(kind, r, *args, mask=None):
    if kind != "lse":
        return ref.pool_avg(r, mask=mask)
    lam = args[0]
    x = lam * r if mask is None else (lam * r).masked_fill(~mask, float("-inf"))
    return torch.logsumexp(x, dim=-1)


def _pool_mask_ignored(kind, r, *args, mask=None):
    return ref.pool_lse(r, *args) if kind == "lse" else ref.pool_avg(r)


def _pool_avg_over_all(kind, r, *args, mask=None):
    if kind == "lse":
        return ref.pool_lse(r, *args, mask=mask)
    return (r if mask is None else r * mask).mean(-1)


POOLING_HINTS = (
    Hint("LSE pooling divides by lambda at the end: log(sum exp(lambda r)) / lambda",
         _pool_lse_no_division),
    Hint("the mask is ignored: padded words must not count (-inf before logsumexp, left out of "
         "the mean)", _pool_mask_ignored),
    Hint("the masked mean divides by every position: divide by the number of unmasked ones",
         _pool_avg_over_all),
)


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
    chosen = run_exercise(EXERCISES[1], both, reference, cases, hidden, hints=POOLING_HINTS)
    return (lse, avg) if chosen is both else (ref.pool_lse, ref.pool_avg)


def _triplet_with_diagonal(scores, margin=0.2, max_violation=True, img_ids=None):
    pos = scores.diag()
    cost_cap = (margin + scores - pos[:, None]).clamp(min=0)
    cost_img = (margin + scores - pos[None, :]).clamp(min=0)
    if max_violation:
        return (cost_cap.max(dim=1).values + cost_img.max(dim=0).values).mean()
    return (cost_cap.sum(dim=1) + cost_img.sum(dim=0)).mean()


def _triplet_captions_only(scores, margin=0.2, max_violation=True, img_ids=None):
    pos = scores.diag()
    b = scores.shape[0]
    same = torch.eye(b, dtype=torch.bool)
    if img_ids is not None:
        same = same | (img_ids[:, None] == img_ids[None, :])
    cost_cap = (margin + scores - pos[:, None]).clamp(min=0).masked_fill(same, 0.0)
    return (cost_cap.max(dim=1).values if max_violation else cost_cap.sum(dim=1)).mean()


def _triplet_sum_not_max(scores, margin=0.2, max_violation=True, img_ids=None):
    return ref.hardest_negative_triplet_loss(scores, margin, False, img_ids) if max_violation else None


TRIPLET_HINTS = (
    Hint("the positive pairs (the diagonal) are counted among the negatives: mask them out "
         "(and pairs that share an image) before taking the hardest", _triplet_with_diagonal),
    Hint("only one direction is there: the loss adds the hardest caption for each image and the "
         "hardest image for each caption", _triplet_captions_only),
    Hint("the violations are summed: with max_violation=True only the hardest negative counts",
         _triplet_sum_not_max),
)


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
    return run_exercise(EXERCISES[2], fn, ref.hardest_negative_triplet_loss, cases, hidden,
                        hints=TRIPLET_HINTS)


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


def _recall_fractions(sims, cap_to_img, ks=(1, 5, 10)):
    return {k: v / 100 for k, v in ref.recall_at_k(sims, cap_to_img, ks).items()}


def _recall_swapped(sims, cap_to_img, ks=(1, 5, 10)):
    out = ref.recall_at_k(sims, cap_to_img, ks)
    return {k: out[k.replace("i2t", "t2i") if "i2t" in k else k.replace("t2i", "i2t")] for k in out}


RECALL_HINTS = (
    Hint("R@K is a percentage: multiply the share of queries by 100", _recall_fractions),
    Hint("the two directions are swapped: i2t ranks the captions for each image (a row of sims), "
         "t2i the images for each caption (a column)", _recall_swapped),
)


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
    return run_exercise(EXERCISES[3], fn, ref.recall_at_k, cases, hidden, hints=RECALL_HINTS)


def _matchmap_swapped(mm, agg, word_mask=None):
    other = {"misa": "sima", "sima": "misa"}.get(agg, agg)
    return mm_ref.matchmap_score(mm, other, word_mask)


def _matchmap_mask_ignored(mm, agg, word_mask=None):
    return mm_ref.matchmap_score(mm, agg)


MATCHMAP_HINTS = (
    Hint("MISA and SIMA are swapped: MISA takes each word's best cell and averages over the words; "
         "SIMA takes each cell's best word and averages over the cells", _matchmap_swapped),
    Hint("padded words are counted: leave out the words where word_mask is False (from the mean, "
         "and from SIMA's max)", _matchmap_mask_ignored),
)


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
    return run_exercise(EXERCISES[4], fn, mm_ref.matchmap_score, cases, hidden, hints=MATCHMAP_HINTS)


# What an exercise re-implements in a library: calling it from the exercise scores 0.
LIBRARY_EQUIVALENTS = {
    "check_attend": ("torch.nn.functional:scaled_dot_product_attention",),
}
