"""The notebook-01 reference implementations equal their torchvision counterparts."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou as tv_box_iou

from course_utils import boxes as B


def random_boxes(n: int, size: float, g: torch.Generator, min_wh: float = 1.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.85
    wh = torch.rand(n, 2, generator=g) * size * 0.25 + min_wh
    return torch.cat([xy, xy + wh], dim=1)


def tv_anchors(feature_size, image_size, anchor_size) -> torch.Tensor:
    gen = AnchorGenerator(((anchor_size,),), ((1.0,),))
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    return gen(images, [torch.zeros(1, 1, *feature_size)])[0]


def test_box_iou_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(40, 512, g), random_boxes(30, 512, g)
    assert torch.allclose(B.box_iou(a, b), tv_box_iou(a, b), atol=1e-6)
    assert B.box_iou(torch.zeros(0, 4), b).shape == (0, 30)


def test_box_iou_zero_area_pairs_are_zero_not_nan():
    z = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert B.box_iou(z, z).item() == 0.0
    assert B.box_iou(z, torch.tensor([[0.0, 0.0, 10.0, 10.0]])).item() == 0.0


@pytest.mark.parametrize("feature_size,image_size,size", [
    ((16, 16), (512, 512), 64), ((2, 3), (64, 96), 32), ((5, 7), (160, 224), 48), ((16, 16), (128, 128), 16)])
def test_anchor_grid_equals_anchor_generator(feature_size, image_size, size):
    assert torch.equal(B.anchor_grid(feature_size, image_size, size),
                       tv_anchors(feature_size, image_size, size))


def test_labels_equal_matcher_on_1000_random_cases_including_empty_images():
    anchors = B.anchor_grid((16, 16), (512, 512), 64)
    matcher = Matcher(0.6, 0.1, allow_low_quality_matches=True)
    g = torch.Generator().manual_seed(1)
    n_empty = 0
    for _ in range(1000):
        n = int(torch.randint(0, 21, (1,), generator=g))
        gt = random_boxes(n, 512, g, 8.0)
        labels, matched = B.label_anchors(anchors, gt, 0.6, 0.1)
        if n == 0:
            n_empty += 1
            # torchvision's RPN treats an image without boxes as all background.
            assert torch.equal(labels, torch.zeros(len(anchors), dtype=torch.int64))
            continue
        m = matcher(tv_box_iou(gt, anchors))
        expected = torch.where(m >= 0, 1, torch.where(m == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
        assert torch.equal(labels, expected)
        assert torch.equal(matched[labels == 1], m[labels == 1])
    assert n_empty > 10


def test_every_box_gets_a_positive_anchor_rule_i():
    anchors = B.anchor_grid((16, 16), (512, 512), 64)
    tiny = torch.tensor([[100.0, 100.0, 110.0, 108.0], [300.0, 40.0, 306.0, 80.0]])
    labels, matched = B.label_anchors(anchors, tiny)
    assert set(matched[labels == 1].tolist()) == {0, 1}


def test_sampling_is_one_to_one_and_within_labels():
    g = torch.Generator().manual_seed(2)
    labels = torch.cat([torch.ones(30), torch.zeros(500), -torch.ones(40)]).long()
    labels = labels[torch.randperm(len(labels), generator=g)]
    pos, neg = B.sample_anchors(labels, 256, generator=g)
    assert len(pos) == 30 and len(neg) == 30
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert pos.unique().numel() == 30 and neg.unique().numel() == 30
    # Capped at half the budget.
    many = torch.ones(400, dtype=torch.int64)
    many[:100] = 0
    pos, neg = B.sample_anchors(many, 256)
    assert len(pos) == 128 and len(neg) == 100
    # No positives: still some background.
    pos, neg = B.sample_anchors(torch.zeros(300, dtype=torch.int64), 256)
    assert len(pos) == 0 and len(neg) == 128


def test_sampling_positives_match_torchvision_sampler_counts():
    # torchvision fills the budget with negatives; the number of positives is the same rule.
    labels = torch.cat([torch.ones(20), torch.zeros(400)])
    tv = BalancedPositiveNegativeSampler(256, 0.5)
    (tv_pos,), (tv_neg,) = tv([labels])
    pos, neg = B.sample_anchors(labels.long(), 256)
    assert int(tv_pos.sum()) == len(pos) == 20
    assert int(tv_neg.sum()) == 236 and len(neg) == 20


def test_sampling_is_reproducible_with_a_generator():
    labels = torch.randint(-1, 2, (1000,), generator=torch.Generator().manual_seed(3))
    a = B.sample_anchors(labels, 128, generator=torch.Generator().manual_seed(7))
    b = B.sample_anchors(labels, 128, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_box_coding_equals_boxcoder_and_round_trips():
    g = torch.Generator().manual_seed(4)
    gt, anchors = random_boxes(200, 512, g, 4.0), random_boxes(200, 512, g, 16.0)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    deltas = B.encode_boxes(gt, anchors)
    assert torch.allclose(deltas, coder.encode_single(gt, anchors), atol=1e-5)
    assert torch.allclose(B.decode_boxes(deltas, anchors), coder.decode_single(deltas, anchors), atol=1e-4)
    assert torch.allclose(B.decode_boxes(deltas, anchors), gt, atol=1e-3)


def test_decode_clamps_huge_scales_like_torchvision():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 50.0, 50.0]])
    out = B.decode_boxes(deltas, anchors)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas, anchors))


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3, 5), r"boxes: expected shape \(N, 4\)"),
    (torch.zeros(3, 4, dtype=torch.int64), "floating dtype"),
    (torch.tensor([[5.0, 5.0, 1.0, 9.0]]), "box 0 .* x2 < x1"),
    (torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), "NaN"),
])
def test_check_boxes_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        B.check_boxes(bad)


def test_check_boxes_empty_policy():
    B.check_boxes(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="at least one box"):
        B.check_boxes(torch.zeros(0, 4), allow_empty=False)
