"""Checks for notebook 02 (region proposal network).

Each ``check_*`` runs the student's function or class on printed and hidden cases against the
reference in :mod:`course_utils.rpn` and returns what the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import rpn as ref
from ..boxes import anchor_grid, encode_boxes
from . import Case, Hint, compare, run_exercise
from ._modules import check_module

EXERCISES = ["2.1 RPNHead", "2.2 rpn_loss", "2.3 decode_proposals"]


RPN_HEAD_HINTS = (
    Hint("the ReLU after the 3x3 conv is missing: both outputs read relu(conv(features))",
         lambda m, x: (m.cls_logits(m.conv(x)), m.bbox_pred(m.conv(x)))),
    Hint("the objectness went through a sigmoid: the head returns logits (the loss applies the "
         "sigmoid)", lambda m, x: (m(x)[0].sigmoid(), m(x)[1])),
    Hint("the two outputs are in the wrong order: return (objectness, deltas)", lambda m, x: m(x)[::-1]),
)


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
    return check_module(EXERCISES[0], cls, ref.RPNHead, cases, hidden, hints=RPN_HEAD_HINTS)


def _loss_parts(objectness, deltas, labels, target_deltas, box_weight=1.0, beta=1.0 / 9):
    pos = labels > 0
    l1 = torch.nn.functional.smooth_l1_loss(deltas, target_deltas, beta=beta, reduction="none").sum(1)
    cls = torch.nn.functional.binary_cross_entropy_with_logits(objectness, labels.to(objectness.dtype))
    return cls, l1, pos


def _box_loss_over_all(objectness, deltas, labels, target_deltas, box_weight=1.0, beta=1.0 / 9):
    cls, l1, pos = _loss_parts(objectness, deltas, labels, target_deltas, box_weight, beta)
    return cls, box_weight * l1[pos].sum() / len(labels)


def _box_loss_with_negatives(objectness, deltas, labels, target_deltas, box_weight=1.0, beta=1.0 / 9):
    cls, l1, pos = _loss_parts(objectness, deltas, labels, target_deltas, box_weight, beta)
    return cls, box_weight * l1.sum() / max(int(pos.sum()), 1)


def _bce_on_probabilities(objectness, deltas, labels, target_deltas, box_weight=1.0, beta=1.0 / 9):
    _, box = ref.rpn_loss(objectness, deltas, labels, target_deltas, box_weight, beta)
    cls = torch.nn.functional.binary_cross_entropy_with_logits(objectness.sigmoid(), labels.to(objectness.dtype))
    return cls, box


RPN_LOSS_HINTS = (
    Hint("the box loss is divided by all sampled anchors: Eq. 2's N_reg here is the number of "
         "positives (at least 1)", _box_loss_over_all),
    Hint("the box loss includes negative anchors: only positives have a box to regress",
         _box_loss_with_negatives),
    Hint("the sigmoid is applied twice: binary_cross_entropy_with_logits takes the raw logits",
         _bce_on_probabilities),
)


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
    return run_exercise(EXERCISES[1], fn, ref.rpn_loss, cases, hidden, atol=1e-5, rtol=1e-4,
                        hints=RPN_LOSS_HINTS)


def _proposals(objectness, deltas, anchors, image_size, pre_nms_top_n=1000, post_nms_top_n=100,
               nms_iou=0.7, min_size=1e-3, score_thresh=0.0, *, clip=True, sigmoid=True, use_nms=True):
    from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes

    top = objectness.topk(min(pre_nms_top_n, objectness.numel())).indices
    conf = torch.sigmoid(objectness[top]) if sigmoid else objectness[top]
    boxes = ref.decode_boxes(deltas[top], anchors[top])
    if clip:
        boxes = clip_boxes_to_image(boxes, image_size)
    keep = remove_small_boxes(boxes, min_size)
    boxes, conf = boxes[keep], conf[keep]
    keep = conf > score_thresh
    boxes, conf = boxes[keep], conf[keep]
    keep = nms(boxes, conf, nms_iou) if use_nms else torch.argsort(conf, descending=True)
    keep = keep[:post_nms_top_n]
    return boxes[keep], conf[keep]


PROPOSAL_HINTS = (
    Hint("boxes reach outside the image: clip them to (0, 0, W, H) after decoding",
         lambda *a, **k: _proposals(*a, **k, clip=False)),
    Hint("the confidences are raw logits: conf = sigmoid(objectness)", lambda *a, **k: _proposals(*a, **k, sigmoid=False)),
    Hint("overlapping duplicates survive: run NMS (IoU above nms_iou with a better box drops it) "
         "before keeping the top post_nms_top_n", lambda *a, **k: _proposals(*a, **k, use_nms=False)),
)


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
    return run_exercise(EXERCISES[2], fn, ref.decode_proposals, cases, hidden, atol=1e-4,
                        hints=PROPOSAL_HINTS)


# What an exercise re-implements in a library: calling it from the exercise scores 0.
LIBRARY_EQUIVALENTS = {
    "check_decode_proposals": ("torchvision.models.detection.rpn:RegionProposalNetwork.filter_proposals",),
}
