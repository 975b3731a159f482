"""Boxes and anchors (notebook 01, seed 000 §3.1).

Reference implementations of what the student writes in notebook 01.  Each one is tested
against its ``torchvision`` counterpart (``ops.box_iou``, ``AnchorGenerator``, ``Matcher``,
``BalancedPositiveNegativeSampler``, ``BoxCoder``), and follows torchvision's conventions so
that the comparison is exact:

* boxes are ``(x1, y1, x2, y2)`` in pixels, width = ``x2 - x1`` (no ``+ 1``);
* anchors of a feature cell ``(i, j)`` are centred on ``(j * stride_x, i * stride_y)``;
* labels are ``1`` (object), ``0`` (background) and ``-1`` (ignored by the loss).
"""

from __future__ import annotations

import math
import operator

import torch

# Largest log-scale change decode_boxes accepts, as torchvision's BoxCoder: exp() of anything
# larger overflows to inf for a randomly initialised head on the first steps.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


def check_boxes(boxes: torch.Tensor, name: str = "boxes", allow_empty: bool = True) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``boxes`` is a valid ``(N, 4)`` float box tensor.

    Valid means: floating dtype, shape ``(N, 4)``, finite, and ``x2 >= x1``, ``y2 >= y1``.
    Degenerate boxes (``x2 == x1``) are valid: only inverted ones are rejected.
    """
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N, 4), got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape (N, 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)} "
                         f"dtype {boxes.dtype}")
    if not boxes.dtype.is_floating_point:
        # torchvision's box_iou takes integer boxes; ours does not, so that IoU, Eq. 1 and the
        # anchors all run in one float dtype instead of silently mixing int and float arithmetic.
        raise ValueError(f"{name}: expected a floating dtype, got {boxes.dtype} (use boxes.float())")
    if boxes.shape[0] == 0:
        if not allow_empty:
            raise ValueError(f"{name}: expected at least one box, got none")
        return
    # One mask and one .any(): a single host sync when the boxes are on a GPU.
    nonfinite = ~torch.isfinite(boxes).all(dim=1)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if not bool((nonfinite | inverted).any()):
        return
    if nonfinite.any():
        raise ValueError(f"{name}: contains NaN or inf (box {int(nonfinite.nonzero()[0])})")
    i = int(inverted.nonzero()[0])
    raise ValueError(f"{name}: box {i} = {boxes[i].tolist()} has x2 < x1 or y2 < y1")


def _check_deltas(deltas: torch.Tensor, name: str) -> None:
    """``deltas`` must be an ``(N, 4)`` float tensor; values are not checked (a diverging head's
    NaN is reported by ``fit``'s finite-loss check, not here)."""
    if not isinstance(deltas, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N, 4), got {type(deltas).__name__}")
    if deltas.ndim != 2 or deltas.shape[1] != 4 or not deltas.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a float tensor of shape (N, 4) as (tx, ty, tw, th), got "
                         f"shape {tuple(deltas.shape)} dtype {deltas.dtype}")


def _check_same_length(a: torch.Tensor, b: torch.Tensor, where: str, names: tuple[str, str]) -> None:
    """Eq. 1 pairs row ``i`` with row ``i``: different lengths would broadcast or fail deep inside."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{where}: {names[0]} has {a.shape[0]} rows but {names[1]} has "
                         f"{b.shape[0]} (expected one anchor per row)")


def _positive_pair(value: tuple[int, int], name: str) -> tuple[int, int]:
    """``(height, width)`` as two positive ints; ``ValueError`` naming ``name`` otherwise."""
    try:
        h, w = (operator.index(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"anchor_grid: {name} must be a pair of ints (height, width), "
                         f"got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"anchor_grid: {name} must be positive, got {(h, w)}")
    return h, w


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``boxes`` ``(N, 4)`` -> ``(N,)``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair: ``(N, 4)``, ``(M, 4)`` -> ``(N, M)``.

    Equal to ``torchvision.ops.box_iou``.  A pair whose union is empty (two zero-area boxes)
    gets IoU 0 rather than NaN.  Boxes must be float (:func:`check_boxes`), unlike
    torchvision's, which also takes integer boxes.
    """
    check_boxes(boxes1, "box_iou: boxes1")
    check_boxes(boxes2, "box_iou: boxes2")
    return _box_iou(boxes1, boxes2)


def _box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """:func:`box_iou` without the checks, for callers that have just checked their boxes."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    # Broadcasting (N, 1, 2) against (M, 2) gives the corners of every intersection at once.
    top_left = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny),
                       torch.zeros_like(inter))


def anchor_grid(feature_size: tuple[int, int], image_size: tuple[int, int],
                anchor_size: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One square anchor per feature-map cell: ``-> (H_f * W_f, 4)``, row-major over ``(y, x)``.

    Equal to ``AnchorGenerator(((anchor_size,),), ((1.0,),))`` on a ``(H_f, W_f)`` feature map of
    an ``(H, W)`` image: the stride is ``H // H_f`` (integer division, as torchvision) and the
    anchor of cell ``(i, j)`` is centred on ``(j * stride_x, i * stride_y)``.

    Raises:
        ValueError: a non-positive size, or a feature map larger than the image (the stride
            would be 0 and every anchor would sit at ``(0, 0)``).
    """
    (fh, fw), (ih, iw) = _positive_pair(feature_size, "feature_size"), _positive_pair(image_size, "image_size")
    if fh > ih or fw > iw:
        raise ValueError(f"anchor_grid: feature_size {(fh, fw)} is larger than image_size {(ih, iw)}; "
                         "expected a feature map of an image (stride = image // feature >= 1)")
    try:
        size_ok = math.isfinite(float(anchor_size)) and float(anchor_size) > 0
    except (TypeError, ValueError):
        size_ok = False
    if not size_ok:
        raise ValueError(f"anchor_grid: anchor_size must be a positive number of pixels, got {anchor_size!r}")
    stride_y, stride_x = ih // fh, iw // fw
    half = torch.round(torch.tensor(anchor_size, dtype=dtype) / 2)
    base = torch.stack([-half, -half, half, half])
    ys = torch.arange(fh, dtype=torch.int32).to(dtype) * stride_y
    xs = torch.arange(fw, dtype=torch.int32).to(dtype) * stride_x
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 4)
    return shifts + base


def label_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, pos_iou: float = 0.6,
                  neg_iou: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three-way labelling of anchors by the max-IoU rule (seed 000 §3.1).

    Args:
        anchors: ``(A, 4)``.
        gt_boxes: ``(G, 4)``; ``G`` may be 0 (an image with no objects: every anchor negative).
        pos_iou: an anchor whose best IoU is ``>= pos_iou`` is positive.
        neg_iou: an anchor whose best IoU is ``< neg_iou`` is negative; in between is ignored.

    Returns:
        labels: ``(A,)`` int64 in ``{1, 0, -1}``.  Rule (i) also makes positive every anchor that
            has the highest IoU with some ground-truth box (ties included), so that every object
            gets at least one positive anchor, as ``Matcher(..., allow_low_quality_matches=True)``.
        matched: ``(A,)`` int64, the index of each anchor's best ground-truth box (``-1`` when
            ``G == 0``); only meaningful where ``labels == 1``.
    """
    check_boxes(anchors, "label_anchors: anchors")
    check_boxes(gt_boxes, "label_anchors: gt_boxes")
    num_anchors = anchors.shape[0]
    if gt_boxes.shape[0] == 0:
        return (torch.zeros(num_anchors, dtype=torch.int64, device=anchors.device),
                torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device))
    iou = _box_iou(gt_boxes, anchors)  # (G, A), both checked above
    best_iou, matched = iou.max(dim=0)
    labels = torch.full((num_anchors,), IGNORE, dtype=torch.int64, device=anchors.device)
    labels[best_iou < neg_iou] = NEGATIVE
    labels[best_iou >= pos_iou] = POSITIVE
    # Rule (i): the anchors that are some box's best match, whatever their IoU.
    best_for_gt = iou.max(dim=1, keepdim=True).values
    is_best = (iou == best_for_gt).any(dim=0)
    labels[is_best] = POSITIVE
    return labels, matched


def sample_anchors(labels: torch.Tensor, num_samples: int = 256, positive_fraction: float = 0.5,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick anchors for the loss so that positives and negatives are roughly 1:1 (seed 000 §3.1).

    Args:
        labels: ``(A,)`` in ``{1, 0, -1}`` from :func:`label_anchors`.
        num_samples: the most anchors one image contributes.
        positive_fraction: the largest share of positives; 0.5 gives the paper's 1:1.
        generator: the random generator (for reproducible sampling).

    Returns:
        ``(pos_idx, neg_idx)``: int64 index tensors, ``P = min(#pos, num_samples * f)`` positives
        and ``min(#neg, P * (1 - f) / f)`` negatives, chosen uniformly without replacement.  An
        image with no positive anchor still contributes ``num_samples * (1 - f)`` negatives so the
        network learns what background looks like.  (torchvision's sampler instead fills the whole
        ``num_samples`` with negatives; the benchmark compares both.)
    """
    # A 2-D label map would give (row, col) pairs from nonzero(), flattened into wrong indices.
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point \
            or labels.dtype.is_complex or labels.dtype == torch.bool:
        got = (f"shape {tuple(labels.shape)} dtype {labels.dtype}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise ValueError(f"sample_anchors: labels must be a 1-D int tensor of shape (A,) in {{1, 0, -1}}, "
                         f"got {got}")
    if not 0.0 < positive_fraction <= 1.0:
        raise ValueError(f"sample_anchors: positive_fraction must be in (0, 1], got {positive_fraction!r}")
    if num_samples < 0:
        raise ValueError(f"sample_anchors: num_samples must be >= 0, got {num_samples!r}")
    pos = torch.nonzero(labels == POSITIVE).flatten()
    neg = torch.nonzero(labels == NEGATIVE).flatten()
    n_pos = min(pos.numel(), int(num_samples * positive_fraction))
    if n_pos > 0:
        n_neg = min(neg.numel(), round(n_pos * (1 - positive_fraction) / positive_fraction))
    else:
        n_neg = min(neg.numel(), int(num_samples * (1 - positive_fraction)))
    pos_idx = pos[torch.randperm(pos.numel(), generator=generator)[:n_pos]]
    neg_idx = neg[torch.randperm(neg.numel(), generator=generator)[:n_neg]]
    return pos_idx, neg_idx


def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(gt_boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Regression targets of Eq. 1: ``(N, 4)`` boxes and their ``(N, 4)`` anchors -> ``(N, 4)``.

    ``t_x = (x - x_a) / w_a``, ``t_y = (y - y_a) / h_a``, ``t_w = log(w / w_a)``,
    ``t_h = log(h / h_a)``, with ``(x, y)`` box centres.  Equal to ``BoxCoder((1, 1, 1, 1))``.
    """
    check_boxes(gt_boxes, "encode_boxes: gt_boxes")
    check_boxes(anchors, "encode_boxes: anchors")
    _check_same_length(gt_boxes, anchors, "encode_boxes", ("gt_boxes", "anchors"))
    xa, ya, wa, ha = _centre_size(anchors)
    x, y, w, h = _centre_size(gt_boxes)
    return torch.stack([(x - xa) / wa, (y - ya) / ha, torch.log(w / wa), torch.log(h / ha)], dim=1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 1: ``(N, 4)`` deltas on ``(N, 4)`` anchors -> ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.

    ``t_w`` and ``t_h`` are clamped at ``log(1000 / 16)`` before ``exp`` as torchvision does.
    """
    _check_deltas(deltas, "decode_boxes: deltas")
    check_boxes(anchors, "decode_boxes: anchors")
    _check_same_length(deltas, anchors, "decode_boxes", ("deltas", "anchors"))
    xa, ya, wa, ha = _centre_size(anchors.to(deltas.dtype))
    tx, ty = deltas[:, 0], deltas[:, 1]
    tw, th = deltas[:, 2].clamp(max=BBOX_XFORM_CLIP), deltas[:, 3].clamp(max=BBOX_XFORM_CLIP)
    x, y = tx * wa + xa, ty * ha + ya
    w, h = torch.exp(tw) * wa, torch.exp(th) * ha
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=1)
