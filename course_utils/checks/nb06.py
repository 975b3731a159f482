"""Checks for notebook 06 (CLIP word spotting on SVT, seed 004 §2.2-2.3).

Each ``check_*`` runs the student's function on printed and hidden cases against the reference
in :mod:`course_utils.clip.wordspotting` and returns the function the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..clip import wordspotting as ref
from . import Case, Hint, compare, hide_values, run_exercise

EXERCISES = ["6.1 word_image_probabilities", "6.2 soft_confusion", "6.3 normalised_similarity_entropy"]

_COUNT_KEYS = ("tp", "tn", "fp", "fn")


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _random_PY(g: torch.Generator, n: int, m: int, k: int, scale: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax matrix ``P (n, m)`` and a bool ``Y (n, m)`` with ``k`` positives per row."""
    P = (scale * _unit(g, n, 8) @ _unit(g, m, 8).T).softmax(dim=-1)
    Y = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        Y[i, torch.randperm(m, generator=g)[:k]] = True
    return P, Y


def _softmax_over_images(image_emb, text_emb, logit_scale=100.0):
    return (logit_scale * image_emb @ text_emb.T).softmax(dim=0)


def _no_scale(image_emb, text_emb, logit_scale=100.0):
    return (image_emb @ text_emb.T).softmax(dim=-1)


def _sigmoid_not_softmax(image_emb, text_emb, logit_scale=100.0):
    return (logit_scale * image_emb @ text_emb.T).sigmoid()


WORD_PROB_HINTS = (
    Hint("each row must sum to 1: the softmax runs over the words (dim=-1), one distribution per "
         "image, not over the images", _softmax_over_images),
    Hint("the logit scale is missing: multiply the cosine similarities by logit_scale before the "
         "softmax", _no_scale),
    Hint("a sigmoid gives each word its own probability; here the words of a row compete (softmax)",
         _sigmoid_not_softmax),
)


def check_word_image_probabilities(fn: Callable) -> Callable:
    """Exercise 6.1: ``word_image_probabilities(image_emb (n, d), text_emb (m, d), logit_scale) -> P (n, m)``."""
    g = torch.Generator().manual_seed(601)
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = torch.tensor(1.0).exp().item()
    cases = [
        Case("two images, two words, scale 1", (two, two, 1.0),
             expected=torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]])),
        Case("3 images x 5 words, d=8, CLIP's scale 100", (_unit(g, 3, 8), _unit(g, 5, 8), 100.0)),
        Case("one image, 50 words (a lexicon)", (_unit(g, 1, 16), _unit(g, 50, 16), 14.0)),
        Case("large scale: must not overflow (use softmax, not exp/sum)", (_unit(g, 2, 4), _unit(g, 6, 4), 1000.0)),
    ]
    hidden = [Case("h", (_unit(g, 7, 32), _unit(g, 300, 32), 100.0)),
              Case("h", (_unit(g, 4, 8), _unit(g, 1, 8), 3.0))]
    return run_exercise(EXERCISES[0], fn, ref.word_image_probabilities, cases, hidden,
                        hints=WORD_PROB_HINTS)


def _compare_counts(got, expected) -> str | None:
    if not isinstance(got, dict):
        return f"expected a dict with keys {list(_COUNT_KEYS)}, got {type(got).__name__}"
    missing = [k for k in _COUNT_KEYS if k not in got]
    if missing:
        return f"the dict lacks keys {missing} (expected {list(_COUNT_KEYS)})"
    for k in _COUNT_KEYS:
        msg = compare(got[k], expected[k], atol=1e-6, rtol=1e-5, path=f"[{k!r}]")
        if msg:
            return msg
    return None


def _confusion(P, Y, ratio):
    P = P.double()
    pos, neg = ratio(P, Y), ratio(P, ~Y)
    n_pos, n_neg = Y.sum(1).double(), (~Y).sum(1).double()
    tp, fp = pos.sum(1), neg.sum(1)
    return {"tp": tp, "fn": n_pos - tp, "fp": fp, "tn": n_neg - fp}


def _confusion_raw(P, Y):
    return _confusion(P, Y, lambda P, m: P.masked_fill(~m, 0.0))


def _confusion_global_peak(P, Y):
    return _confusion(P, Y, lambda P, m: P.masked_fill(~m, 0.0) / P.max(dim=1, keepdim=True).values)


def _confusion_swapped(P, Y):
    c = ref.soft_confusion(P, Y)
    return {"tp": c["tp"], "fn": c["fn"], "fp": c["tn"], "tn": c["fp"]}


CONFUSION_HINTS = (
    Hint("the probabilities are summed as they are: Eq. 2.3.10-2.3.13 divide each by the largest "
         "probability of its group (positives, or negatives) first", _confusion_raw),
    Hint("each group is divided by the image's overall largest probability: the positives by "
         "their own peak, the negatives by theirs", _confusion_global_peak),
    Hint("fp and tn are swapped: the negatives' scaled probabilities are false positives, the "
         "rest of the negatives true negatives", _confusion_swapped),
)


def check_soft_confusion(fn: Callable) -> Callable:
    """Exercise 6.2: approach 2, ``soft_confusion(P (n, m), Y (n, m) bool) -> {"tp", "tn", "fp", "fn"}``,
    each ``(n,)`` float."""
    g = torch.Generator().manual_seed(602)
    P2 = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.4, 0.3]], dtype=torch.float64)
    Y2 = torch.tensor([[True, True, False, False], [True, False, False, False]])
    cases = [
        Case("hand example: 2 images x 4 words", (P2, Y2),
             expected={"tp": torch.tensor([1.6, 1.0], dtype=torch.float64),
                       "tn": torch.tensor([0.0, 0.75], dtype=torch.float64),
                       "fp": torch.tensor([2.0, 2.25], dtype=torch.float64),
                       "fn": torch.tensor([0.4, 0.0], dtype=torch.float64)},
             compare=_compare_counts),
        Case("5 images x 60 words, 3 positives each", _random_PY(g, 5, 60, 3), compare=_compare_counts),
        Case("an image with no positive word (tp = fn = 0)",
             (torch.tensor([[0.2, 0.8], [0.6, 0.4]]), torch.tensor([[False, False], [True, False]])),
             compare=_compare_counts),
    ]
    hidden = [Case("h", _random_PY(g, 9, 200, 50), compare=hide_values(_compare_counts)),
              Case("h", _random_PY(g, 3, 10, 1, scale=100.0), compare=hide_values(_compare_counts))]
    return run_exercise(EXERCISES[1], fn, ref.soft_confusion, cases, hidden, hints=CONFUSION_HINTS)


def _entropy_parts(P, Y):
    P = P.double()
    n_pos = Y.sum(1)
    q = P.masked_fill(~Y, 0.0)
    return q, n_pos


def _entropy_not_renormalised(P, Y):
    q, n_pos = _entropy_parts(P, Y)
    ent = -torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q)).sum(1)
    ent = ent / n_pos.double().clamp_min(2).log()
    return torch.where(n_pos >= 2, ent, torch.full_like(ent, float("nan")))


def _entropy_natural_log(P, Y):
    q, n_pos = _entropy_parts(P, Y)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
    ent = -torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q)).sum(1)
    return torch.where(n_pos >= 2, ent, torch.full_like(ent, float("nan")))


def _entropy_base_lexicon(P, Y):
    q, n_pos = _entropy_parts(P, Y)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
    ent = -torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q)).sum(1)
    ent = ent / torch.log(torch.tensor(float(P.shape[1]), dtype=torch.float64))
    return torch.where(n_pos >= 2, ent, torch.full_like(ent, float("nan")))


ENTROPY_HINTS = (
    Hint("renormalise first: the positives' probabilities must sum to 1 before the entropy",
         _entropy_not_renormalised),
    Hint("the entropy is not normalised: Eq. 2.3.15 takes the log in base |W_i^+| (divide by "
         "log of the number of positives), so that uniform gives 1", _entropy_natural_log),
    Hint("the log base is the number of positive words |W_i^+|, not the lexicon's size",
         _entropy_base_lexicon),
)


def check_normalised_similarity_entropy(fn: Callable) -> Callable:
    """Exercise 6.3: Eq. 2.3.15, ``normalised_similarity_entropy(P (n, m), Y (n, m) bool) -> (n,)`` float,
    NaN where an image has fewer than two positive words."""
    g = torch.Generator().manual_seed(603)
    uniform = torch.full((1, 4), 0.25)
    cases = [
        Case("uniform over the positives gives 1",
             (uniform, torch.tensor([[True, True, True, False]])), expected=torch.tensor([1.0])),
        Case("all mass on one positive gives 0",
             (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[True, True, False]])), expected=torch.tensor([0.0])),
        Case("4 images x 30 words, 5 positives each", _random_PY(g, 4, 30, 5)),
        Case("one positive only: NaN (log base 1 is undefined)",
             (torch.tensor([[0.3, 0.7], [0.5, 0.5]]), torch.tensor([[True, False], [True, True]])),
             expected=torch.tensor([float("nan"), 1.0])),
    ]
    hidden = [Case("h", _random_PY(g, 8, 120, 50)), Case("h", _random_PY(g, 2, 5, 2, scale=80.0))]
    return run_exercise(EXERCISES[2], fn, ref.normalised_similarity_entropy, cases, hidden, atol=1e-5, rtol=1e-4,
                        hints=ENTROPY_HINTS)


__all__ = ["EXERCISES", "check_word_image_probabilities", "check_soft_confusion", "check_normalised_similarity_entropy"]
