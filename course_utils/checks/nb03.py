"""Checks for notebook 03 (proposal-text alignment).

Each ``check_*`` runs the student's class or function on printed and hidden cases against the
reference in :mod:`course_utils.detector` and returns what the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import detector as ref
from . import Case, Hint, run_exercise
from ._modules import check_module

EXERCISES = ["3.1 ProposalEncoder", "3.2 QueryEncoder", "3.3a AlignmentHead", "3.3b alignment_loss",
             "3.4 score_proposals"]


def _boxes(n: int, size: float, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = torch.rand(n, 2, generator=g) * size * 0.3 + 2.0
    return torch.cat([xy, xy + wh], dim=1)


def _proposal_encoder(m, features, boxes, *, normalise=True, scale=True):
    from torchvision.ops import roi_pool

    pooled = roi_pool(features, [b.to(features.dtype) for b in boxes], output_size=m.roi_size,
                      spatial_scale=m.spatial_scale if scale else 1.0)
    x = m.fc2(torch.relu(m.fc1(torch.relu(m.conv(pooled)).flatten(1))))
    return torch.nn.functional.normalize(x, dim=-1) if normalise else x


PROPOSAL_ENCODER_HINTS = (
    Hint("the embeddings are not unit length: l2-normalise the output of fc2",
         lambda m, f, b: _proposal_encoder(m, f, b, normalise=False)),
    Hint("the boxes are in image pixels: roi_pool needs spatial_scale (feature stride 1/s) to map "
         "them onto the feature map", lambda m, f, b: _proposal_encoder(m, f, b, scale=False)),
)


def _query_encoder(m, ids, padding_mask, *, enc_first=True, use_mask=True, normalise=True):
    b = ids.shape[0]
    x = torch.cat([m.enc_token.expand(b, -1, -1), m.token_embed(ids)], dim=1)
    x = x + m.pos_embed[:, : x.shape[1]]
    mask = torch.cat([padding_mask.new_zeros((b, 1)), padding_mask], dim=1)
    x = m.encoder(x, src_key_padding_mask=mask if use_mask else None)
    out = x[:, 0] if enc_first else x[:, 1:].mean(1)
    return torch.nn.functional.normalize(out, dim=-1) if normalise else out


QUERY_ENCODER_HINTS = (
    Hint("the padding is attended to: pass the padding mask (with a False for ⟨ENC⟩ in front) as "
         "src_key_padding_mask", lambda m, i, p: _query_encoder(m, i, p, use_mask=False)),
    Hint("the query's vector is the ⟨ENC⟩ token's output (position 0), not a mean over the words",
         lambda m, i, p: _query_encoder(m, i, p, enc_first=False)),
    Hint("the embeddings are not unit length: l2-normalise the ⟨ENC⟩ output",
         lambda m, i, p: _query_encoder(m, i, p, normalise=False)),
)


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
    return check_module(EXERCISES[0], cls, ref.ProposalEncoder, cases, hidden,
                        hints=PROPOSAL_ENCODER_HINTS)


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
    return check_module(EXERCISES[1], cls, ref.QueryEncoder, cases, hidden, atol=1e-4,
                        hints=QUERY_ENCODER_HINTS)


def _bce(p, y):
    y = y.to(p.dtype)
    return -(y * p.clamp_min(1e-12).log() + (1 - y) * (1 - p).clamp_min(1e-12).log())


ALIGNMENT_LOSS_HINTS = (
    Hint("the sigmoid is applied twice: binary_cross_entropy_with_logits takes the raw logits",
         lambda logits, labels: _bce(logits.sigmoid().sigmoid(), labels).mean()),
    Hint("Eq. 4 is a mean over the pairs, not a sum", lambda logits, labels: _bce(logits.sigmoid(), labels).sum()),
    Hint("the labels are flipped: y = 1 for a matching (proposal, query) pair",
         lambda logits, labels: _bce(logits.sigmoid(), 1 - labels).mean()),
)


ALIGNMENT_HEAD_HINTS = (
    Hint("the ReLU between fc1 and fc2 is missing (Eq. 3)", lambda m, r, t: m.fc2(m.fc1(torch.cat([r, t], -1))).squeeze(-1)),
    Hint("the head returns probabilities: it returns logits, and the loss applies the sigmoid",
         lambda m, r, t: m(r, t).sigmoid()),
)


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
    head = check_module(EXERCISES[2], cls, ref.AlignmentHead, cases, hidden, hints=ALIGNMENT_HEAD_HINTS)

    def loss_case(name, n):
        return Case(name, (torch.randn(n, generator=g) * 3, (torch.rand(n, generator=g) > 0.5).long()))

    loss_cases = [loss_case("4 pairs", 4), loss_case("confident logits", 1),
                  Case("all labels 1", (torch.tensor([2.0, -1.0, 0.0]), torch.ones(3, dtype=torch.int64)))]
    loss = run_exercise(EXERCISES[3], loss_fn, ref.alignment_loss, loss_cases,
                        [loss_case("h", 50)], atol=1e-5, hints=ALIGNMENT_LOSS_HINTS)
    return head, loss


def _scores_unsorted(conf, align, threshold=0.5, top_k=None):
    scores = conf * align
    keep = torch.nonzero(scores > threshold).flatten()[:top_k]
    return keep, scores[keep]


def _scores_threshold_on_conf(conf, align, threshold=0.5, top_k=None):
    scores = conf * align
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[conf[order] > threshold][:top_k]
    return order, scores[order]


def _scores_mean(conf, align, threshold=0.5, top_k=None):
    scores = (conf + align) / 2
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] > threshold][:top_k]
    return order, scores[order]


SCORE_HINTS = (
    Hint("the proposals must come best first: sort by decreasing score before cutting at top_k",
         _scores_unsorted),
    Hint("the threshold applies to the score Conf x Align, not to the RPN confidence alone",
         _scores_threshold_on_conf),
    Hint("Eq. 5 multiplies the two: Score = Conf x Align (an average lets a confident proposal "
         "through with any text)", _scores_mean),
)


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
    return run_exercise(EXERCISES[4], fn, ref.score_proposals, cases, hidden, hints=SCORE_HINTS)
