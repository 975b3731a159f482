"""Checks for notebook 07 (fine-tuning CLIP on SVT, seed 004 §2.4.2, Algorithm 1).

7.1 compares the student's loss with :func:`course_utils.clip.finetune.clip_contrastive_loss`;
7.2 runs the student's training step and the reference :func:`course_utils.clip.finetune.training_step`
on two identical copies of a tiny CLIP-shaped model and compares the returned losses and the
parameters after the update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..clip import finetune as ref
from . import RESULTS, Case, Hint, compare, hide_values, is_package_code, run_exercise

EXERCISES = ["7.1 clip_contrastive_loss", "7.2 training_step"]

_LOSS_KEYS = ("loss", "loss_image", "loss_text")


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _compare_losses(got, expected) -> str | None:
    if not isinstance(got, dict):
        return f"expected a dict with keys {list(_LOSS_KEYS)}, got {type(got).__name__}"
    missing = [k for k in _LOSS_KEYS if k not in got]
    if missing:
        return f"the dict lacks keys {missing}"
    for k in _LOSS_KEYS:
        if isinstance(got[k], torch.Tensor) and got[k].ndim != 0:
            return f"[{k!r}]: expected a scalar tensor, got shape {tuple(got[k].shape)}"
        msg = compare(float(got[k]), float(expected[k]), atol=1e-5, rtol=1e-4, path=f"[{k!r}]")
        if msg:
            return msg
    return None


def _clip_loss(image_emb, text_emb, logit_scale, *, normalise=True, summed=False, swap=False):
    if normalise:
        image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    S = logit_scale * image_emb @ text_emb.T
    target = torch.arange(S.shape[0])
    li, lt = F.cross_entropy(S, target), F.cross_entropy(S.T, target)
    if swap:
        li, lt = lt, li
    return {"loss": (li + lt) * (1.0 if summed else 0.5), "loss_image": li, "loss_text": lt}


CLIP_LOSS_HINTS = (
    Hint("embeddings not normalised: step (d) l2-normalises both before the dot products",
         lambda *a: _clip_loss(*a, normalise=False)),
    Hint("the two directions are added: Algorithm 1's loss is their mean, (loss_image + loss_text) / 2",
         lambda *a: _clip_loss(*a, summed=True)),
    Hint("loss_image and loss_text are swapped: loss_image is the cross-entropy of the rows (each "
         "image against all texts)", lambda *a: _clip_loss(*a, swap=True)),
)


def check_clip_contrastive_loss(fn: Callable) -> Callable:
    """Exercise 7.1: ``clip_contrastive_loss(image_emb (B, d), text_emb (B, d), logit_scale)
    -> {"loss", "loss_image", "loss_text"}`` (scalar tensors, Eq. 2.4.1-2.4.2)."""
    g = torch.Generator().manual_seed(701)
    eye = torch.eye(3)
    cases = [
        Case("perfectly aligned pairs, scale 1 (loss = log(1 + 2/e))", (eye, eye.clone(), 1.0),
             expected={k: torch.tensor(math.log(1 + 2 / math.e)) for k in _LOSS_KEYS}, compare=_compare_losses),
        Case("B=4, d=8, random, scale 100", (_unit(g, 4, 8), _unit(g, 4, 8), 100.0), compare=_compare_losses),
        Case("embeddings not normalised (step (d) normalises)", (3 * torch.randn(5, 6, generator=g),
                                                                 torch.randn(5, 6, generator=g), 14.0),
             compare=_compare_losses),
        Case("asymmetric: image and text losses differ", (_unit(g, 6, 4), _unit(g, 6, 4), 30.0),
             compare=_compare_losses),
    ]
    hidden = [Case("h", (_unit(g, 32, 16), _unit(g, 32, 16), 100.0), compare=_compare_losses),
              Case("h", (torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.tensor(7.0)),
                   compare=_compare_losses)]
    return run_exercise(EXERCISES[0], fn, ref.clip_contrastive_loss, cases, hidden, hints=CLIP_LOSS_HINTS)


class ToyClip(nn.Module):
    """A CLIP-shaped toy: ``encode_image (B, 3, 4, 4) -> (B, d)``, ``encode_text (B, L) -> (B, d)``,
    a learnable ``logit_scale`` (log of 1/τ).  Small enough to check a training step in milliseconds."""

    def __init__(self, d: int = 8, vocab: int = 20, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.visual = nn.Linear(48, d)
        self.token_embedding = nn.Embedding(vocab, d)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x.flatten(1))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens).mean(1)


def _toy_batch(seed: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 4, 4, generator=g), torch.randint(0, 20, (B, 5), generator=g)


def _run_step(step: Callable) -> Callable:
    """``(seed, B, lr, weight_decay) -> (losses (3,), parameters after the step (P,))`` for ``step``."""
    def run(seed: int, B: int, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        model = ToyClip(seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
        out = step(model, _toy_batch(seed, B), opt)
        if not isinstance(out, dict) or any(k not in out for k in _LOSS_KEYS):
            raise TypeError(f"training_step should return a dict with keys {list(_LOSS_KEYS)}, "
                            f"got {type(out).__name__}" + (f" with keys {list(out)}" if isinstance(out, dict) else ""))
        losses = torch.tensor([float(out[k]) for k in _LOSS_KEYS], dtype=torch.float64)
        params = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
        return losses, params
    # failure messages name the function that runs next, not this wrapper
    run.__module__, run.__qualname__ = step.__module__, getattr(step, "__qualname__", "training_step")
    return run


def _initial_params() -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in ToyClip(seed=0).parameters()]).double()


def _compare_step(got, expected) -> str | None:
    msg = compare(got[0], expected[0], atol=1e-5, rtol=1e-4, path="returned losses (loss, loss_image, loss_text)")
    if msg:
        return msg
    if torch.equal(got[1], _initial_params()):
        return "the parameters did not change: call loss.backward() and optimizer.step()"
    return compare(got[1], expected[1], atol=1e-5, rtol=1e-4,
                   path="parameters after the step (zero the gradients, back-propagate 'loss', then step)")


def _step_on_image_loss(model, batch, optimizer):
    out = ref.contrastive_step(model, batch)
    optimizer.zero_grad(set_to_none=True)
    out["loss_image"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in out.items()}


def _step_reports_after(model, batch, optimizer):
    ref.training_step(model, batch, optimizer)
    with torch.no_grad():
        return {k: float(v) for k, v in ref.contrastive_step(model, batch).items()}


TRAINING_STEP_HINTS = (
    Hint("only the image loss was back-propagated: the step minimises loss, the mean of both "
         "directions", _run_step(_step_on_image_loss)),
    Hint("the losses were measured after the update: return the ones the update was computed from",
         _run_step(_step_reports_after)),
)


def check_training_step(fn: Callable) -> Callable:
    """Exercise 7.2: ``training_step(model, batch, optimizer) -> {"loss", "loss_image", "loss_text"}``
    (floats, before the update), after one Adam update of ``model``."""
    cases = [
        Case("toy CLIP, batch of 4, lr 1e-2", (0, 4, 1e-2, 0.0), compare=_compare_step),
        Case("Table 2.5 settings: lr 5e-5, weight decay 0.2", (0, 8, 5e-5, 0.2), compare=_compare_step),
        Case("batch of 2", (0, 2, 1e-3, 0.0), compare=_compare_step),
    ]
    hidden = [Case("h", (0, 16, 3e-3, 0.2), compare=hide_values(_compare_step)),
              Case("h", (0, 5, 1e-1, 0.0), compare=hide_values(_compare_step))]
    # the cases build fresh models, so the check runs wrappers; what it hands back is the function
    run_exercise(EXERCISES[1], _run_step(fn), _run_step(ref.training_step), cases, hidden,
                 uses_reference=fn is ref.training_step or is_package_code(fn), hints=TRAINING_STEP_HINTS)
    return fn if _passed(EXERCISES[1]) else ref.training_step


def _passed(exercise: str) -> bool:
    return bool(RESULTS.get(exercise) and RESULTS[exercise].passed)


__all__ = ["EXERCISES", "ToyClip", "check_clip_contrastive_loss", "check_training_step"]


# What an exercise re-implements in a library: calling it from the exercise scores 0.
LIBRARY_EQUIVALENTS = {
    "check_clip_contrastive_loss": ("open_clip.loss:ClipLoss",),
}
