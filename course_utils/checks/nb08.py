"""Checks for notebook 08 (ODITS, seed 004 Ch. 3).

Each ``check_*`` runs the student's function on printed and hidden cases against the reference
in :mod:`course_utils.clip.odits` and returns the function the rest of the notebook should use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..clip import odits as ref
from . import Case, Hint, compare, run_exercise

EXERCISES = ["8.1 similarity_weighted_embeddings", "8.2 object_self_attention", "8.3 init_new_layers_"]


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _swe_unnormalised(object_emb, text_emb, logit_scale):
    P = (logit_scale * object_emb @ text_emb.T).softmax(dim=-1)
    return P, P @ text_emb


def _swe_softmax_over_objects(object_emb, text_emb, logit_scale):
    cos = F.normalize(object_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    P = (logit_scale * cos).softmax(dim=-2)
    return P, P @ text_emb


def _swe_no_scale(object_emb, text_emb, logit_scale):
    return ref.similarity_weighted_embeddings(object_emb, text_emb, 1.0)


SWE_HINTS = (
    Hint("the similarities are dot products of embeddings that are not unit length: normalise "
         "both sides first (a cosine)", _swe_unnormalised),
    Hint("each object's probabilities must sum to 1 over the words (softmax over the last axis), "
         "not over the objects", _swe_softmax_over_objects),
    Hint("the logit scale is missing: multiply the cosines by logit_scale before the softmax",
         _swe_no_scale),
)


def check_similarity_weighted_embeddings(fn: Callable) -> Callable:
    """Exercise 8.1: ``(object_emb (..., K, d), text_emb (n, d), logit_scale) -> (P (..., K, n), E_S (..., K, d))``."""
    g = torch.Generator().manual_seed(801)
    two_words = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cases = [
        Case("one object equal to word 0, scale 1", (torch.tensor([[1.0, 0.0]]), two_words, 1.0),
             expected=(torch.tensor([[math.e / (math.e + 1), 1 / (math.e + 1)]]),
                       torch.tensor([[math.e / (math.e + 1), 1 / (math.e + 1)]]))),
        Case("3 objects, 5 words, d=8, CLIP's scale 100", (_unit(g, 3, 8), _unit(g, 5, 8), 100.0)),
        Case("embeddings not normalised (cosine needs it)", (3.0 * _unit(g, 2, 4), 0.5 * _unit(g, 6, 4), 10.0)),
        Case("a batch of 2 images x 4 objects", (_unit(g, 2, 4, 16), _unit(g, 7, 16), 50.0)),
        Case("an image with no objects (K = 0)", (torch.zeros(0, 8), _unit(g, 5, 8), 100.0)),
    ]
    hidden = [Case("h", (_unit(g, 3, 6, 32), _unit(g, 40, 32), 100.0)),
              Case("h", (2.0 * _unit(g, 1, 1, 4), _unit(g, 1, 4), 7.0))]
    return run_exercise(EXERCISES[0], fn, ref.similarity_weighted_embeddings, cases, hidden,
                        hints=SWE_HINTS)


def _self_attention(es, em, conf, valid, w_q, w_k, w_v, *, scale=True, use_conf=True, mean=True):
    d = w_q.shape[0]
    q, k = es @ w_q.T, es @ w_k.T
    v = ((conf.unsqueeze(-1) * em) if use_conf else em) @ w_v.T
    scores = q @ k.transpose(1, 2) / (math.sqrt(d) if scale else 1.0)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    out = (torch.nan_to_num(scores.softmax(dim=-1), nan=0.0) @ v) * valid.unsqueeze(-1)
    n = valid.sum(dim=1, keepdim=True).clamp_min(1).to(out.dtype) if mean else 1.0
    return out.sum(dim=1) / n


SELF_ATTENTION_HINTS = (
    Hint("the scores are not scaled: divide Q K^T by sqrt(d) before the softmax",
         lambda *a: _self_attention(*a, scale=False)),
    Hint("the values miss the confidences: V = (c ∘ E_M) W_v^T", lambda *a: _self_attention(*a, use_conf=False)),
    Hint("the objects' outputs are summed: the image's vector is their mean over its valid "
         "objects, (1/K_i) Σ_j A_j", lambda *a: _self_attention(*a, mean=False)),
)


def _attention_case(g: torch.Generator, B: int, K: int, d: int, valid: torch.Tensor | None = None) -> tuple:
    es, em = torch.randn(B, K, d, generator=g), _unit(g, B, K, d)
    conf = torch.rand(B, K, generator=g)
    if valid is None:
        valid = torch.rand(B, K, generator=g) > 0.3
        valid[:, 0] = True
    w = [torch.randn(d, d, generator=g) / math.sqrt(d) for _ in range(3)]
    return (es, em, conf, valid, *w)


def check_object_self_attention(fn: Callable) -> Callable:
    """Exercise 8.2: ``(es, em, conf, valid, w_q, w_k, w_v) -> (B, d)``, self-attention 1 of ODITS."""
    g = torch.Generator().manual_seed(802)
    eye = torch.eye(2)
    one = (torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]]), torch.tensor([[0.5]]),
           torch.tensor([[True]]), eye, eye, eye)
    cases = [
        Case("one object: the output is c * E_M W_v^T", one, expected=torch.tensor([[0.0, 1.0]])),
        Case("2 images x 3 objects, all valid", _attention_case(g, 2, 3, 8, torch.ones(2, 3, dtype=torch.bool))),
        Case("padding: invalid objects must be ignored", _attention_case(g, 3, 4, 8)),
        Case("an image with no valid object gives zeros",
             _attention_case(g, 2, 3, 4, torch.tensor([[True, True, False], [False, False, False]]))),
    ]
    hidden = [Case("h", _attention_case(g, 4, 6, 16)), Case("h", _attention_case(g, 1, 1, 32))]
    return run_exercise(EXERCISES[1], fn, ref.object_self_attention, cases, hidden,
                        hints=SELF_ATTENTION_HINTS)


# --------------------------------------------------------------------------------------------
# 8.3: initialisation (random, so the rules are checked, not exact values)
# --------------------------------------------------------------------------------------------


def _toy_layers() -> list[nn.Module]:
    """New layers of a toy ODITS: Linear + LayerNorm + attention, with non-default values set
    so that an init that forgets one of them is caught."""
    layers = [nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8)),
              nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16, bias=False)]
    with torch.no_grad():
        for m in layers:
            for p in m.parameters():
                p.fill_(0.5)
    return layers


def _bound(w: torch.Tensor, scheme: str) -> float:
    fan_out, fan_in = w.shape
    return math.sqrt(6.0 / (fan_in + fan_out)) if scheme == "xavier" else math.sqrt(6.0 / fan_in)


def _run_init(fn: Callable, scheme: str, seed: int) -> dict:
    """Apply ``fn`` twice to fresh toy layers with the same seed; report the weights of both runs
    (state dicts: data, so that the grader compares what a sandboxed run returned) and whether
    the first run touched the global RNG."""
    layers = _toy_layers()
    state = torch.get_rng_state()
    fn(layers, scheme, torch.Generator().manual_seed(seed))
    touched = not torch.equal(state, torch.get_rng_state())
    again = _toy_layers()
    fn(again, scheme, torch.Generator().manual_seed(seed))
    return {"weights": [m.state_dict() for m in layers], "again": [m.state_dict() for m in again],
            "touched_global_rng": touched}


def _loaded_layers(weights: object) -> list[nn.Module]:
    """Fresh toy layers holding ``weights`` (one state dict per layer)."""
    layers = _toy_layers()
    if not isinstance(weights, (list, tuple)) or len(weights) != len(layers):
        raise ValueError(f"expected {len(layers)} state dicts")
    for m, sd in zip(layers, weights):
        m.load_state_dict(sd)
    return layers


def _init_rule(scheme: str, seed: int) -> Callable[[dict, dict], str | None]:
    def rule(got: dict, _expected: dict) -> str | None:
        if not isinstance(got, dict) or set(got) != {"weights", "again", "touched_global_rng"}:
            return "the initialised layers could not be read back"
        if got["touched_global_rng"]:
            return "drew from the global RNG: pass generator= to nn.init (reproducibility, §3.2)"
        try:
            layers, again = _loaded_layers(got["weights"]), _loaded_layers(got["again"])
        except (ValueError, RuntimeError, TypeError) as exc:
            return f"the initialised layers have other parameters than the toy layers: {exc}"
        for i, root in enumerate(layers):
            for name, m in root.named_modules():
                where = f"layer {i}{'.' + name if name else ''}"
                weights = []
                if isinstance(m, nn.Linear):
                    weights.append(("weight", m.weight))
                    if m.bias is not None and m.bias.abs().max() > 0:
                        return f"{where}: bias should be 0, got values up to {m.bias.abs().max():.3g}"
                elif isinstance(m, nn.MultiheadAttention):
                    weights.append(("in_proj_weight", m.in_proj_weight))
                    if m.in_proj_bias.abs().max() > 0:
                        return f"{where}: in_proj_bias should be 0"
                elif isinstance(m, nn.LayerNorm):
                    if not (torch.all(m.weight == 1) and torch.all(m.bias == 0)):
                        return f"{where}: LayerNorm should have weight 1 and bias 0"
                for pname, w in weights:
                    w = w.detach()
                    b = _bound(w, scheme)
                    top = float(w.abs().max())
                    if top > b + 1e-6:
                        return f"{where}.{pname}: |w| reaches {top:.4f}, above the {scheme} bound {b:.4f}"
                    if top < 0.8 * b or float(w.std()) < 0.45 * b:
                        return (f"{where}.{pname}: values look too small for U(-{b:.4f}, {b:.4f}) "
                                f"(max |w| {top:.4f}, std {float(w.std()):.4f}, expected std ≈ {b / math.sqrt(3):.4f})")
        for a, b_ in zip(layers, again):
            for (n, p), (_, q) in zip(a.named_parameters(), b_.named_parameters()):
                if not torch.equal(p, q):
                    return f"{n}: two runs with the same seed gave different weights (not deterministic)"
        return None
    return rule


def check_init_new_layers(fn: Callable) -> Callable:
    """Exercise 8.3: ``init_new_layers_(modules, scheme, generator)`` initialises in place (§3.2)."""
    cases = [Case(f"{scheme} uniform, seed {seed}", (scheme, seed), compare=_init_rule(scheme, seed))
             for scheme, seed in (("xavier", 0), ("kaiming", 1))]
    hidden = [Case("h", ("xavier", 7), compare=_init_rule("xavier", 7)),
              Case("h", ("kaiming", 11), compare=_init_rule("kaiming", 11))]
    student = lambda scheme, seed: _run_init(fn, scheme, seed)  # noqa: E731
    reference = lambda scheme, seed: _run_init(ref.init_new_layers_, scheme, seed)  # noqa: E731
    reference.__module__, reference.__qualname__ = ref.__name__, "init_new_layers_"
    chosen = run_exercise(EXERCISES[2], student, reference, cases, hidden)
    return fn if chosen is student else ref.init_new_layers_


__all__ = ["EXERCISES", "check_similarity_weighted_embeddings", "check_object_self_attention",
           "check_init_new_layers", "compare"]


# What an exercise re-implements in a library: calling it from the exercise scores 0.
LIBRARY_EQUIVALENTS = {
    "check_object_self_attention": ("torch.nn.functional:scaled_dot_product_attention",),
}
