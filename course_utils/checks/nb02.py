"""Checks for notebook 02 (region proposal network).

Each ``check_*`` runs the student's function or class on printed and hidden cases against the
reference in :mod:`course_utils.rpn` and returns what the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import rpn as ref
from ..boxes import anchor_grid, encode_boxes
from . import Case, compare, run_exercise
from ._modules import check_module

EXERCISES = ["2.1 RPNHead", "2.2 rpn_loss", "2.3 decode_proposals"]


def check_rpn_head(cls: type) -> type:
    """Exercise 2.1: ``RPNHead(in_channels, mid_channels, num_anchors)``; layers ``conv``,
    ``cls_logits``, ``bbox_pred``; ``forward((B, C, H, W)) -> (B, A, H, W), (B, 4A, H, W)``."""
    g = torch.Generator().manual_seed(201)
    cases = [
        ("8 channels, 4x4 map", dict(in_channels=8, mid_channels=16, num_anchors=1),
         (torch.randn(1, 8, 4, 4, generator=g),)),
        ("batch of 3, non-square map", dict(in_channels=4, mid_channels=4, num_anchors=1),
         (torch.randn(3, 4, 5, 7, generator=g),)),
        ("3 anchors per cell", dict(in_channels=6, mid_channels=8, num_anchors=3),
         (torch.randn(2, 6, 3, 3, generator=g),)),
    ]
    hidden = [(dict(in_channels=16, mid_channels=8, num_anchors=2), (torch.randn(2, 16, 6, 2, generator=g),))]
    return check_module(EXERCISES[0], cls, ref.RPNHead, cases, hidden)


def check_rpn_loss(fn: Callable) -> Callable:
    """Exercise 2.2: ``rpn_loss(objectness (N,), deltas (N, 4), labels (N,), target_deltas (N, 4),
    box_weight, beta) -> (cls_loss, box_loss)`` (Eq. 2)."""
    g = torch.Generator().manual_seed(202)

    def rand_case(n: int, n_pos: int, **kw):
        labels = torch.zeros(n, dtype=torch.int64)
        labels[:n_pos] = 1
        labels = labels[torch.randperm(n, generator=g)]
        return (torch.randn(n, generator=g) * 2, torch.randn(n, 4, generator=g),
                labels, torch.randn(n, 4, generator=g) * 0.5), kw

    def case(name, n, n_pos, **kw):
        args, kw = rand_case(n, n_pos, **kw)
        return Case(name, args, kw)

    cases = [
        Case("two anchors, one positive, exact targets",
             (torch.tensor([3.0, -3.0]), torch.zeros(2, 4), torch.tensor([1, 0]), torch.zeros(2, 4))),
        case("8 anchors, 4 positives", 8, 4),
        case("lambda = 10 and beta = 1", 16, 5, box_weight=10.0, beta=1.0),
        Case("no positive (an empty image): box loss must be 0, not NaN",
             (torch.randn(6, generator=g), torch.randn(6, 4, generator=g), torch.zeros(6, dtype=torch.int64),
              torch.randn(6, 4, generator=g))),
    ]
    hidden = [case("h", 256, 40), case("h", 30, 1, box_weight=0.5)]
    return run_exercise(EXERCISES[1], fn, ref.rpn_loss, cases, hidden, atol=1e-5, rtol=1e-4)


def check_decode_proposals(fn: Callable) -> Callable:
    """Exercise 2.3: ``decode_proposals(objectness (A,), deltas (A, 4), anchors (A, 4), image_size,
    pre_nms_top_n, post_nms_top_n, nms_iou, min_size) -> (boxes (K, 4), conf (K,))``."""
    g = torch.Generator().manual_seed(203)

    def rand(h: int, w: int, stride: int, size: float, scale: float = 1.0):
        anchors = anchor_grid((h // stride, w // stride), (h, w), size)
        n = anchors.shape[0]
        # Distinct logits: with ties NMS may order boxes either way.
        logits = torch.randperm(n, generator=g).float() / n * 8 - 4
        return logits, torch.randn(n, 4, generator=g) * 0.3 * scale, anchors

    # A hand-made case: two anchors predict the same object, NMS must keep the better one.
    anchors = anchor_grid((4, 4), (32, 32), 8.0)
    gt = torch.tensor([[2.0, 3.0, 9.0, 11.0]])
    deltas = torch.zeros(16, 4)
    logits = -4.0 - 0.1 * torch.arange(16.0)
    for a, s in ((5, 3.0), (6, 2.0)):
        deltas[a] = encode_boxes(gt, anchors[a:a + 1])[0]
        logits[a] = s

    def sorted_conf(got, expected):
        msg = compare(got, expected, atol=1e-4)
        if msg is None or not isinstance(got, (tuple, list)) or len(got) != 2:
            return msg
        conf = got[1]
        if isinstance(conf, torch.Tensor) and conf.numel() > 1 and not bool((conf[:-1] >= conf[1:]).all()):
            return msg + " (are the proposals sorted by decreasing confidence?)"
        return msg

    cases = [
        Case("duplicate boxes: NMS keeps the more confident", (logits, deltas, anchors, (32, 32)),
             {"post_nms_top_n": 3}, compare=sorted_conf),
        Case("boxes leaving a 64x64 image are clipped", (*rand(64, 64, 8, 16.0, 3.0), (64, 64)),
             {"post_nms_top_n": 20}, compare=sorted_conf),
        Case("pre-NMS top 10, post-NMS top 5, NMS IoU 0.5", (*rand(128, 96, 8, 16.0), (128, 96)),
             {"pre_nms_top_n": 10, "post_nms_top_n": 5, "nms_iou": 0.5}, compare=sorted_conf),
    ]
    hidden = [Case("h", (*rand(128, 128, 8, 16.0, 2.0), (128, 128)), {"post_nms_top_n": 50}),
              Case("h", (*rand(64, 64, 4, 8.0), (64, 64)), {"pre_nms_top_n": 100, "nms_iou": 0.3})]
    return run_exercise(EXERCISES[2], fn, ref.decode_proposals, cases, hidden, atol=1e-4)


# What an exercise re-implements in a library: calling it from the exercise scores 0.
LIBRARY_EQUIVALENTS = {
    "check_decode_proposals": ("torchvision.models.detection.rpn:RegionProposalNetwork.filter_proposals",),
}
