"""Checks for notebook 01 (anchors and labelling).

Each ``check_*`` runs the student's function on printed and hidden cases against the reference
in :mod:`course_utils.boxes` and returns the function the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import boxes as ref
from . import Case, Hint, compare, is_package_code, run_exercise

EXERCISES = ["1.1 box_iou", "1.2 anchor_grid", "1.3 label_anchors", "1.4 sample_anchors",
             "1.5 encode_boxes / decode_boxes"]


def _random_boxes(n: int, size: float, g: torch.Generator, min_wh: float = 1.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = torch.rand(n, 2, generator=g) * size * 0.3 + min_wh
    return torch.cat([xy, xy + wh], dim=1)


# --------------------------------------------------------------------------- common mistakes
# Each is the reference with one typical mistake made; a check names it when a failed case's
# output matches (see checks.Hint).


def _iou_plus_one(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    area = lambda b: (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # noqa: E731
    wh = (torch.min(b1[:, None, 2:], b2[:, 2:]) - torch.max(b1[:, None, :2], b2[:, :2]) + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(b1)[:, None] + area(b2) - inter)


def _iou_no_clamp(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    wh = torch.min(b1[:, None, 2:], b2[:, 2:]) - torch.max(b1[:, None, :2], b2[:, :2])
    inter = wh[..., 0] * wh[..., 1]
    return inter / (ref.box_area(b1)[:, None] + ref.box_area(b2) - inter)


def _iou_union_sum(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    iou = ref.box_iou(b1, b2)
    inter = iou * (ref.box_area(b1)[:, None] + ref.box_area(b2)) / (1 + iou)
    return inter / (ref.box_area(b1)[:, None] + ref.box_area(b2))


IOU_HINTS = (
    Hint("your areas look like (x2 - x1 + 1) * (y2 - y1 + 1): the boxes here are continuous "
         "coordinates, with no +1 pixel", _iou_plus_one),
    Hint("disjoint boxes give a non-zero overlap: a negative width or height of the intersection "
         "must count as 0", _iou_no_clamp),
    Hint("the union counts the intersection twice: union = area1 + area2 - intersection", _iou_union_sum),
)


def _grid_cell_centres(feature_size, image_size, anchor_size, dtype=torch.float32):
    (fh, fw), (ih, iw) = feature_size, image_size
    return ref.anchor_grid(feature_size, image_size, anchor_size, dtype) + torch.tensor(
        [iw // fw / 2, ih // fh / 2] * 2, dtype=dtype)


def _grid_column_major(feature_size, image_size, anchor_size, dtype=torch.float32):
    fh, fw = feature_size
    return ref.anchor_grid(feature_size, image_size, anchor_size, dtype).reshape(fh, fw, 4) \
        .transpose(0, 1).reshape(-1, 4)


def _grid_full_size_half(feature_size, image_size, anchor_size, dtype=torch.float32):
    grid = ref.anchor_grid(feature_size, image_size, anchor_size, dtype)
    centre = (grid[:, :2] + grid[:, 2:]) / 2
    return torch.cat([centre - anchor_size, centre + anchor_size], dim=1)


GRID_HINTS = (
    Hint("your anchors sit at the middle of each cell; here (as torchvision) the anchor of cell "
         "(i, j) is centred on (j * stride_x, i * stride_y)", _grid_cell_centres),
    Hint("the anchors are in column-major order: walk the feature map row by row, x fastest "
         "(meshgrid with indexing='ij')", _grid_column_major),
    Hint("your anchors are twice too large: anchor_size is the side of the box, so the corners "
         "are centre ± size / 2", _grid_full_size_half),
)


def _labels_without_rule_i(anchors, gt, pos_iou=0.6, neg_iou=0.1):
    if gt.shape[0] == 0:
        return ref.label_anchors(anchors, gt, pos_iou, neg_iou)
    best, matched = ref.box_iou(gt, anchors).max(dim=0)
    labels = torch.full_like(matched, -1)
    labels[best < neg_iou] = 0
    labels[best >= pos_iou] = 1
    return labels, matched


def _labels_no_ignore(anchors, gt, pos_iou=0.6, neg_iou=0.1):
    labels, matched = ref.label_anchors(anchors, gt, pos_iou, neg_iou)
    return torch.where(labels == -1, torch.zeros_like(labels), labels), matched


LABEL_HINTS = (
    Hint("an object's best anchor is not positive when its IoU is below pos_iou: rule (i) makes "
         "every box's highest-IoU anchor positive, whatever its IoU", _labels_without_rule_i),
    Hint("anchors between the two thresholds must be ignored (-1), not negative", _labels_no_ignore),
)


def _fills_budget(got, case: Case) -> bool:
    labels, budget = case.args[0], case.kwargs["num_samples"]
    pos, neg = got
    return neg.numel() == min(int((labels == 0).sum()), budget - pos.numel())


def _draws_ignored(got, case: Case) -> bool:
    labels = case.args[0]
    return bool((labels[got[1]] == -1).any())


SAMPLE_HINTS = (
    Hint("the negatives fill the rest of the budget: 1:1 sampling takes as many negatives as "
         "positives (torchvision's sampler fills the budget; this exercise does not)", matches=_fills_budget),
    Hint("ignored anchors (label -1) were drawn as negatives: only label 0 is background",
         matches=_draws_ignored),
)


def _encode_corners(gt, anc):
    return torch.stack([(gt[:, 0] - anc[:, 0]) / (anc[:, 2] - anc[:, 0]),
                        (gt[:, 1] - anc[:, 1]) / (anc[:, 3] - anc[:, 1]),
                        *ref.encode_boxes(gt, anc)[:, 2:].unbind(1)], dim=1)


def _encode_no_log(gt, anc):
    t = ref.encode_boxes(gt, anc)
    return torch.cat([t[:, :2], t[:, 2:].exp() - 1], dim=1)


def _encode_by_gt_size(gt, anc):
    t = ref.encode_boxes(gt, anc)
    scale = (anc[:, 2:] - anc[:, :2]) / (gt[:, 2:] - gt[:, :2])
    return torch.cat([t[:, :2] * scale, t[:, 2:]], dim=1)


def _with_round_trip(encode):
    return lambda gt, anc: (encode(gt, anc), gt)


CODING_HINTS = (
    Hint("t_x, t_y look measured from the corners: Eq. 1 uses the box centres", _with_round_trip(_encode_corners)),
    Hint("t_w, t_h need a log: t_w = log(w / w_a)", _with_round_trip(_encode_no_log)),
    Hint("the offsets are divided by the box's size: Eq. 1 divides by the anchor's (w_a, h_a)",
         _with_round_trip(_encode_by_gt_size)),
)


def check_box_iou(fn: Callable) -> Callable:
    """Exercise 1.1: ``box_iou((N, 4), (M, 4)) -> (N, M)``."""
    g = torch.Generator().manual_seed(101)
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    cases = [
        Case("identical boxes", (a, a.clone()), expected=torch.tensor([[1.0]])),
        Case("half overlap", (a, torch.tensor([[5.0, 0.0, 15.0, 10.0]])),
             expected=torch.tensor([[1 / 3]])),
        Case("disjoint boxes", (a, torch.tensor([[20.0, 20.0, 30.0, 30.0]])),
             expected=torch.tensor([[0.0]])),
        Case("one box inside another", (a, torch.tensor([[2.0, 2.0, 4.0, 4.0], [0.0, 0.0, 5.0, 10.0]]))),
        Case("7 x 5 random boxes", (_random_boxes(7, 100, g), _random_boxes(5, 100, g))),
        Case("no boxes on one side", (torch.zeros(0, 4), _random_boxes(3, 50, g))),
    ]
    hidden = [Case("h", (_random_boxes(30, 512, g), _random_boxes(40, 512, g))),
              Case("h", (_random_boxes(4, 64, g, 0.0), _random_boxes(1, 64, g)))]
    return run_exercise(EXERCISES[0], fn, ref.box_iou, cases, hidden, hints=IOU_HINTS)


def check_anchor_grid(fn: Callable) -> Callable:
    """Exercise 1.2: ``anchor_grid((H_f, W_f), (H, W), size) -> (H_f * W_f, 4)`` (torchvision order)."""
    cases = [
        Case("2x3 map of a 64x96 image, 32 px anchors", ((2, 3), (64, 96), 32)),
        Case("seed 000: 16x16 map of 512x512, 64 px anchors", ((16, 16), (512, 512), 64)),
        Case("non-square map", ((4, 8), (128, 256), 16)),
    ]
    hidden = [Case("h", ((5, 7), (160, 224), 48)), Case("h", ((1, 1), (32, 32), 8))]
    return run_exercise(EXERCISES[1], fn, ref.anchor_grid, cases, hidden, hints=GRID_HINTS)


def check_label_anchors(fn: Callable) -> Callable:
    """Exercise 1.3: max-IoU three-way labelling; only ``labels`` (and ``matched`` on positives) are graded."""
    g = torch.Generator().manual_seed(103)
    anchors = ref.anchor_grid((8, 8), (256, 256), 64)

    def cmp_labels(got, expected) -> str | None:
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return "expected a tuple (labels, matched)"
        msg = compare(got[0], expected[0], path="labels")
        if msg:
            return msg
        pos = expected[0] == 1
        if pos.any():
            return compare(got[1][pos], expected[1][pos], path="matched (on positive anchors)")
        return None

    def case(name: str, gt: torch.Tensor, hi: float = 0.6, lo: float = 0.1, hidden=False) -> Case:
        return Case("h" if hidden else name, (anchors, gt), {"pos_iou": hi, "neg_iou": lo},
                    compare=cmp_labels)

    cases = [
        case("one box exactly on an anchor", torch.tensor([[32.0, 32.0, 96.0, 96.0]])),
        case("a small box (only rule (i) makes it positive)", torch.tensor([[100.0, 100.0, 120.0, 118.0]])),
        case("an image with no boxes", torch.zeros(0, 4)),
        case("12 random boxes", _random_boxes(12, 256, g, 8.0)),
        case("other thresholds 0.5 / 0.3", _random_boxes(6, 256, g, 8.0), 0.5, 0.3),
    ]
    hidden = [case("", _random_boxes(20, 256, g, 4.0), hidden=True),
              case("", _random_boxes(3, 256, g, 30.0), 0.7, 0.3, hidden=True)]
    return run_exercise(EXERCISES[2], fn, ref.label_anchors, cases, hidden, hints=LABEL_HINTS)


def check_sample_anchors(fn: Callable) -> Callable:
    """Exercise 1.4: 1:1 sampling.  Random, so we check the rules, not the exact indices."""

    def make_rule(labels: torch.Tensor, num_samples: int):
        n_pos_all = int((labels == 1).sum())
        n_neg_all = int((labels == 0).sum())

        def rule(got, _expected) -> str | None:
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                return "expected a tuple (pos_idx, neg_idx)"
            pos, neg = got
            for name, idx, want in (("pos_idx", pos, 1), ("neg_idx", neg, 0)):
                if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.ndim != 1:
                    return f"{name}: expected a 1-D int64 index tensor, got {getattr(idx, 'dtype', type(idx))}"
                if idx.numel() and not bool((labels[idx] == want).all()):
                    return f"{name}: contains anchors whose label is not {want}"
                if idx.unique().numel() != idx.numel():
                    return f"{name}: an anchor was picked twice (sample without replacement)"
            exp_pos = min(n_pos_all, num_samples // 2)
            exp_neg = min(n_neg_all, exp_pos if exp_pos > 0 else num_samples // 2)
            if pos.numel() != exp_pos or neg.numel() != exp_neg:
                return (f"expected {exp_pos} positives and {exp_neg} negatives "
                        f"(from {n_pos_all} / {n_neg_all} available), got {pos.numel()} and {neg.numel()}")
            return None
        return rule

    g = torch.Generator().manual_seed(104)
    specs = [("few positives, many negatives", 5, 200, 20, 64),
             ("more positives than half the budget", 100, 300, 0, 64),
             ("no positives (empty image)", 0, 50, 0, 32),
             ("fewer negatives than positives", 10, 3, 7, 256)]
    cases, hidden = [], []
    for name, n_pos, n_neg, n_ign, budget in specs + [("h", 40, 40, 10, 32), ("h", 1, 1000, 0, 256)]:
        labels = torch.cat([torch.ones(n_pos), torch.zeros(n_neg), -torch.ones(n_ign)]).long()
        labels = labels[torch.randperm(labels.numel(), generator=g)]
        c = Case(name, (labels,), {"num_samples": budget}, compare=make_rule(labels, budget))
        (hidden if name == "h" else cases).append(c)
    return run_exercise(EXERCISES[3], fn, ref.sample_anchors, cases, hidden, hints=SAMPLE_HINTS)


def check_box_coding(encode: Callable, decode: Callable) -> tuple[Callable, Callable]:
    """Exercise 1.5: Eq. 1 both ways; also checks that ``decode(encode(b, a), a) == b``."""
    g = torch.Generator().manual_seed(105)
    anchors = _random_boxes(20, 512, g, 16.0)
    gt = _random_boxes(20, 512, g, 8.0)

    def both(gt_boxes: torch.Tensor, anc: torch.Tensor):
        return encode(gt_boxes, anc), decode(encode(gt_boxes, anc), anc)

    def reference(gt_boxes: torch.Tensor, anc: torch.Tensor):
        return ref.encode_boxes(gt_boxes, anc), gt_boxes

    cases = [
        Case("box equal to its anchor", (torch.tensor([[0.0, 0.0, 64.0, 64.0]]),
                                         torch.tensor([[0.0, 0.0, 64.0, 64.0]]))),
        Case("shifted and doubled", (torch.tensor([[16.0, 0.0, 144.0, 64.0]]),
                                     torch.tensor([[0.0, 0.0, 64.0, 64.0]]))),
        Case("20 random pairs (round trip)", (gt, anchors)),
    ]
    hidden = [Case("h", (_random_boxes(50, 256, g, 4.0), _random_boxes(50, 256, g, 4.0)))]
    chosen = run_exercise(EXERCISES[4], both, reference, cases, hidden, atol=1e-3, rtol=1e-4,
                          uses_reference=is_package_code(encode) or is_package_code(decode),
                          hints=CODING_HINTS)
    if chosen is both:
        return encode, decode
    return ref.encode_boxes, ref.decode_boxes


# What each exercise re-implements in a library: calling it from the exercise scores 0.
LIBRARY_EQUIVALENTS = {
    "check_box_iou": ("torchvision.ops:box_iou", "torchvision.ops.boxes:box_iou",
                      "torchvision.ops.boxes:_box_inter_union"),
    "check_anchor_grid": ("torchvision.models.detection.anchor_utils:AnchorGenerator",),
    "check_label_anchors": ("torchvision.models.detection._utils:Matcher",),
    "check_sample_anchors": ("torchvision.models.detection._utils:BalancedPositiveNegativeSampler",),
    "check_box_coding": ("torchvision.models.detection._utils:BoxCoder",
                         "torchvision.models.detection._utils:encode_boxes"),
}
