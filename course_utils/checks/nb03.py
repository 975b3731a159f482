"""Checks for notebook 03 (proposal-text alignment).

Each ``check_*`` runs the student's class or function on printed and hidden cases against the
reference in :mod:`course_utils.detector` and returns what the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import detector as ref
from . import Case, run_exercise
from ._modules import check_module

EXERCISES = ["3.1 ProposalEncoder", "3.2 QueryEncoder", "3.3a AlignmentHead", "3.3b alignment_loss",
             "3.4 score_proposals"]


def _boxes(n: int, size: float, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = torch.rand(n, 2, generator=g) * size * 0.3 + 2.0
    return torch.cat([xy, xy + wh], dim=1)


def check_proposal_encoder(cls: type) -> type:
    """Exercise 3.1: ``ProposalEncoder(in_channels, spatial_scale, roi_size, hidden_channels,
    hidden_dim, embed_dim)`` with layers ``conv``, ``fc1``, ``fc2``;
    ``forward(features (B, C, H, W), boxes: list of (K_i, 4)) -> (sum K_i, embed_dim)``, unit norm."""
    g = torch.Generator().manual_seed(301)
    kw = dict(in_channels=8, spatial_scale=1 / 8, roi_size=2, hidden_channels=6, hidden_dim=12, embed_dim=5)
    feats = torch.randn(2, 8, 8, 8, generator=g)
    cases = [
        ("one box in one image", kw, (feats[:1], [torch.tensor([[0.0, 0.0, 32.0, 32.0]])])),
        ("two images, 3 + 4 boxes", kw, (feats, [_boxes(3, 64, g), _boxes(4, 64, g)])),
        ("an image without proposals", kw, (feats, [torch.zeros(0, 4), _boxes(2, 64, g)])),
        ("ROI size 3, stride 4", dict(kw, roi_size=3, spatial_scale=1 / 4),
         (feats, [_boxes(2, 32, g), _boxes(2, 32, g)])),
    ]
    hidden = [(dict(kw, embed_dim=7), (torch.randn(3, 8, 16, 16, generator=g),
                                       [_boxes(5, 128, g), _boxes(1, 128, g), _boxes(3, 128, g)]))]
    return check_module(EXERCISES[0], cls, ref.ProposalEncoder, cases, hidden)


def check_query_encoder(cls: type) -> type:
    """Exercise 3.2: ``QueryEncoder(vocab_size, embed_dim, num_heads, num_layers, ff_dim, max_len)``
    with ``token_embed``, ``pos_embed``, ``enc_token`` and ``encoder``;
    ``forward(ids (B, L), padding_mask (B, L)) -> (B, embed_dim)`` unit vectors from ⟨ENC⟩."""
    vocab = ref.QueryVocabulary()
    kw = dict(vocab_size=len(vocab), embed_dim=16, num_heads=2, num_layers=1, ff_dim=32, max_len=16)
    q = vocab.encode
    cases = [
        ("one query", kw, q(["red circles"])),
        ("queries of different lengths (padding)", kw, q(["blue squares", "find the green triangles and red shapes"])),
        ("two layers, four heads", dict(kw, num_layers=2, num_heads=4), q(["all the objects", "circles"])),
    ]
    hidden = [(dict(kw, embed_dim=8), q(["show me the blue circles", "red", "where are the green shapes"]))]
    return check_module(EXERCISES[1], cls, ref.QueryEncoder, cases, hidden, atol=1e-4)


def check_alignment(cls: type, loss_fn: Callable) -> tuple[type, Callable]:
    """Exercise 3.3: ``AlignmentHead(region_dim, text_dim, hidden_dim)`` with ``fc1``, ``fc2``
    (Eq. 3, returns logits ``(K,)``) and ``alignment_loss(logits (N,), labels (N,)) -> scalar`` (Eq. 4)."""
    g = torch.Generator().manual_seed(303)
    kw = dict(region_dim=6, text_dim=4, hidden_dim=5)
    cases = [
        ("3 pairs", kw, (torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g))),
        ("one pair", kw, (torch.randn(1, 6, generator=g), torch.randn(1, 4, generator=g))),
    ]
    hidden = [(dict(region_dim=8, text_dim=8, hidden_dim=3),
               (torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)))]
    head = check_module(EXERCISES[2], cls, ref.AlignmentHead, cases, hidden)

    def loss_case(name, n):
        return Case(name, (torch.randn(n, generator=g) * 3, (torch.rand(n, generator=g) > 0.5).long()))

    loss_cases = [loss_case("4 pairs", 4), loss_case("confident logits", 1),
                  Case("all labels 1", (torch.tensor([2.0, -1.0, 0.0]), torch.ones(3, dtype=torch.int64)))]
    loss = run_exercise(EXERCISES[3], loss_fn, ref.alignment_loss, loss_cases,
                        [loss_case("h", 50)], atol=1e-5)
    return head, loss


def check_score_proposals(fn: Callable) -> Callable:
    """Exercise 3.4: ``score_proposals(conf (K,), align (K,), threshold, top_k) -> (keep, scores)``
    (Eq. 5: Score = Conf x Align, above the threshold, best first, at most top_k)."""
    g = torch.Generator().manual_seed(304)

    def rand(k):
        return torch.rand(k, generator=g), torch.rand(k, generator=g)

    cases = [
        Case("four proposals", (torch.tensor([0.9, 0.99, 0.6, 0.95]), torch.tensor([0.9, 0.2, 0.95, 0.7]))),
        Case("top_k = 1", (torch.tensor([0.9, 0.99, 0.6, 0.95]), torch.tensor([0.9, 0.2, 0.95, 0.7])),
             {"top_k": 1}),
        Case("nothing above the threshold", (torch.tensor([0.3, 0.4]), torch.tensor([0.9, 0.9]))),
        Case("20 random proposals, threshold 0.3", rand(20), {"threshold": 0.3}),
    ]
    hidden = [Case("h", rand(100), {"threshold": 0.2, "top_k": 10}), Case("h", rand(0))]
    return run_exercise(EXERCISES[4], fn, ref.score_proposals, cases, hidden)
