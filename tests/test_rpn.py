"""Tests of course_utils.rpn: Eq. 2 by hand, torchvision agreement, proposals, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import clip_boxes_to_image, nms

from course_utils.boxes import anchor_grid, encode_boxes
from course_utils.profiles import get_config
from course_utils.rpn import (
    RPN,
    RPNHead,
    SmallBackbone,
    assign_rpn_targets,
    build_backbone,
    build_rpn,
    check_targets,
    decode_proposals,
    flatten_head_outputs,
    rpn_loss,
    rpn_step,
)


def _smooth_l1(x: float, beta: float) -> float:
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def test_rpn_loss_equals_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    labels = torch.tensor([1, 1, 0, 0])
    deltas = torch.tensor([[0.1, -0.2, 0.0, 0.5], [1.0, 0.0, -0.05, 0.0],
                           [9.0, 9.0, 9.0, 9.0], [-9.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    beta, lam = 1 / 9, 2.0
    cls, box = rpn_loss(logits, deltas, labels, targets, box_weight=lam, beta=beta)

    def bce(z: float, y: int) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    want_cls = sum(bce(z, y) for z, y in zip(logits.tolist(), labels.tolist())) / 4
    # Only the two positives regress; N_reg = 2 (Eq. 2 read literally).
    want_box = lam * sum(_smooth_l1(v, beta) for row in deltas[:2].tolist() for v in row) / 2
    assert cls.item() == pytest.approx(want_cls, rel=1e-6)
    assert box.item() == pytest.approx(want_box, rel=1e-6)


def test_rpn_loss_relates_to_torchvision_normalisation():
    torch.manual_seed(0)
    logits, deltas, targets = torch.randn(10), torch.randn(10, 4), torch.randn(10, 4)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    cls, box = rpn_loss(logits, deltas, labels, targets)
    # torchvision: BCE mean, smooth-L1 (beta 1/9) summed over positives / number sampled.
    pos = labels == 1
    tv_box = F.smooth_l1_loss(deltas[pos], targets[pos], beta=1 / 9, reduction="sum") / labels.numel()
    tv_cls = F.binary_cross_entropy_with_logits(logits, labels.float())
    assert cls.item() == pytest.approx(tv_cls.item(), rel=1e-6)
    assert box.item() * 3 / 10 == pytest.approx(tv_box.item(), rel=1e-6)


def test_rpn_loss_without_positives_is_finite_and_has_no_box_term():
    cls, box = rpn_loss(torch.zeros(4), torch.randn(4, 4), torch.zeros(4), torch.zeros(4, 4))
    assert cls.item() == pytest.approx(math.log(2))
    assert box.item() == 0.0


def test_flatten_matches_torchvision_and_anchor_order():
    torch.manual_seed(0)
    obj, dl = torch.randn(2, 1, 3, 5), torch.randn(2, 4, 3, 5)
    o, d = flatten_head_outputs(obj, dl)
    tv_o, tv_d = concat_box_prediction_layers([obj], [dl])
    assert torch.equal(o.reshape(-1, 1), tv_o)
    assert torch.equal(d.reshape(-1, 4), tv_d)
    # Cell (y=1, x=2) of the map is anchor 1 * 5 + 2 of anchor_grid.
    assert o[0, 7] == obj[0, 0, 1, 2]


def test_head_and_backbone_shapes():
    bb = SmallBackbone((8, 16, 16), stride=4)
    feats = bb(torch.rand(2, 3, 32, 48))
    assert feats.shape == (2, 16, 8, 12) and bb.out_channels == 16
    obj, dl = RPNHead(16, 8)(feats)
    assert obj.shape == (2, 1, 8, 12) and dl.shape == (2, 4, 8, 12)
    with pytest.raises(ValueError, match="power of two"):
        SmallBackbone((8, 8), stride=3)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet", 8)


def test_mobilenet_backbone_is_the_papers(capsys):
    bb = build_backbone("mobilenet_v2", 32, pretrained=False)
    assert "random initialisation" in capsys.readouterr().out
    assert bb.out_channels == 1280 and bb.stride == 32
    assert bb(torch.rand(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
    with pytest.raises(ValueError, match="stride 32"):
        build_backbone("mobilenet_v2", 16, pretrained=False)


def test_decode_proposals_recovers_boxes_and_equals_torchvision_pipeline():
    anchors = anchor_grid((4, 4), (32, 32), 8.0)
    gt = torch.tensor([[2.0, 3.0, 9.0, 11.0], [17.0, 16.0, 27.0, 25.0]])
    deltas = torch.zeros(16, 4)
    logits = -5.0 - 0.01 * torch.arange(16.0)  # distinct: no ties for NMS to order
    # Anchor 5 (cell 1,1) and its neighbour 6 both predict gt 0 exactly: NMS keeps one.
    for a, g, s in ((5, 0, 4.0), (6, 0, 3.0), (10, 1, 2.0)):
        deltas[a] = encode_boxes(gt[g:g + 1], anchors[a:a + 1])[0]
        logits[a] = s
    boxes, conf = decode_proposals(logits, deltas, anchors, (32, 32), post_nms_top_n=3)
    assert boxes.shape == (3, 4) and conf.shape == (3,)
    assert torch.allclose(boxes[0], gt[0], atol=1e-4) and torch.allclose(boxes[1], gt[1], atol=1e-4)
    assert torch.all(conf[:-1] >= conf[1:])
    assert conf[0] == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    # torchvision's own pipeline gives the same proposals.
    tv = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas, anchors)
    tv = clip_boxes_to_image(tv, (32, 32))
    keep = nms(tv, torch.sigmoid(logits), 0.7)[:3]
    assert torch.allclose(boxes, tv[keep], atol=1e-5)


def test_decode_proposals_clips_and_limits():
    torch.manual_seed(0)
    anchors = anchor_grid((8, 8), (64, 64), 16.0)
    boxes, conf = decode_proposals(torch.randn(64), torch.randn(64, 4) * 3, anchors, (64, 64),
                                   pre_nms_top_n=30, post_nms_top_n=10, nms_iou=0.5)
    assert len(boxes) <= 10
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 64 and boxes[:, 3].max() <= 64
    assert ((boxes[:, 2] - boxes[:, 0]) >= 1e-3).all()
    from torchvision.ops import box_iou
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert iou.max() <= 0.5 + 1e-6


def test_assign_targets_for_image_without_objects():
    anchors = anchor_grid((4, 4), (32, 32), 8.0)
    t = assign_rpn_targets(anchors, torch.zeros(0, 4), 0.6, 0.1, 16)
    assert len(t.pos_idx) == 0 and len(t.neg_idx) == 8 and t.target_deltas.shape == (0, 4)


def _tiny_rpn() -> RPN:
    torch.manual_seed(0)
    return RPN(SmallBackbone((8, 16), stride=4), anchor_size=8, batch_per_image=32, head_channels=16,
               post_nms_top_n=20)


def test_rpn_forward_loss_and_proposals_on_a_batch_with_an_empty_image():
    rpn = _tiny_rpn()
    images = torch.rand(2, 3, 32, 32)
    batch = {"image": images, "boxes": [torch.tensor([[4.0, 4.0, 12.0, 12.0]]), torch.zeros(0, 4)],
             "image_id": [0, 1]}
    out = rpn(images)
    assert out["objectness"].shape == (2, 64) and out["deltas"].shape == (2, 64, 4)
    assert out["anchors"].shape == (64, 4)
    losses = rpn_step(rpn, batch)
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in rpn.parameters() if p.grad is not None)
    props = rpn.proposals(out)
    assert len(props) == 2 and all(len(b) <= 20 and b.shape[1] == 4 for b, _ in props)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        rpn(torch.rand(3, 32, 32))


def test_rpn_learns_a_single_image():
    torch.manual_seed(0)
    rpn = RPN(SmallBackbone((8, 8), stride=4), anchor_size=8, batch_per_image=16, head_channels=8)
    batch = {"image": torch.zeros(1, 3, 16, 16), "boxes": [torch.tensor([[4.0, 4.0, 12.0, 12.0]])],
             "image_id": [0]}
    batch["image"][0, 0, 4:12, 4:12] = 1.0
    opt = torch.optim.Adam(rpn.parameters(), 2e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = rpn_step(rpn, batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    rpn.eval()
    boxes, conf = rpn.proposals(rpn(batch["image"]))[0]
    from torchvision.ops import box_iou
    assert box_iou(boxes[:1], batch["boxes"][0]).item() > 0.5 and conf[0] > 0.5


def test_zero_area_and_malformed_annotations():
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 3.0, 9.0]])
    with pytest.warns(UserWarning, match="zero-area"):
        keep = check_targets(boxes, "image 7")
    assert keep.tolist() == [True, False]
    with pytest.raises(ValueError, match="image 7"):
        check_targets(torch.tensor([[5.0, 0.0, 1.0, 4.0]]), "image 7")
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        check_targets(torch.zeros(3), "image 7")
    # A batch with a zero-area box trains (the box is dropped) instead of giving inf.
    rpn = _tiny_rpn()
    batch = {"image": torch.rand(1, 3, 32, 32), "boxes": [boxes * 3], "image_id": [0]}
    with pytest.warns(UserWarning, match="zero-area"):
        assert torch.isfinite(rpn_step(rpn, batch)["loss"])


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_profiles_build_and_match_anchor_grid(profile):
    cfg = get_config(profile)
    rpn = build_rpn(cfg)
    size = cfg.shapes.image_size
    out = rpn(torch.rand(1, 3, size, size))
    side = size // cfg.anchors.stride
    assert out["features"].shape[-2:] == (side, side)
    assert out["anchors"].shape == (side * side, 4)
    assert torch.equal(out["anchors"], anchor_grid((side, side), (size, size), cfg.anchors.anchor_size))


def test_nb02_checks_accept_the_reference_and_fall_back_on_mistakes(capsys):
    from course_utils.checks import nb02

    class MyHead(RPNHead):  # a student's copy of the reference
        pass

    def my_loss(*args, **kwargs):
        return rpn_loss(*args, **kwargs)

    def my_decode(*args, **kwargs):
        return decode_proposals(*args, **kwargs)

    assert nb02.check_rpn_head(MyHead) is MyHead
    assert nb02.check_rpn_loss(my_loss) is my_loss
    assert nb02.check_decode_proposals(my_decode) is my_decode
    out = capsys.readouterr().out
    assert "[x] 2.1" in out and "[x] 2.2" in out and "[x] 2.3" in out
    # Handing in the package's own class earns nothing.
    assert nb02.check_rpn_head(RPNHead) is RPNHead
    assert "[ ] 2.1" in capsys.readouterr().out

    class WrongNames(torch.nn.Module):
        def __init__(self, in_channels, mid_channels, num_anchors=1):
            super().__init__()
            self.conv3 = torch.nn.Conv2d(in_channels, mid_channels, 3, padding=1)

    assert nb02.check_rpn_head(WrongNames) is RPNHead
    assert "missing parameters" in capsys.readouterr().out

    def loss_by_all_sampled(obj, d, lab, tgt, box_weight=1.0, beta=1 / 9):  # torchvision's N
        pos = lab > 0
        return (F.binary_cross_entropy_with_logits(obj, lab.float()),
                box_weight * F.smooth_l1_loss(d[pos], tgt[pos], beta=beta, reduction="sum") / len(lab))

    assert nb02.check_rpn_loss(loss_by_all_sampled) is rpn_loss
    assert "output[1]" in capsys.readouterr().out

    def no_nms(objectness, deltas, anchors, image_size, pre_nms_top_n=1000, post_nms_top_n=100,
               nms_iou=0.7, min_size=1e-3, score_thresh=0.0):
        raise NotImplementedError

    assert nb02.check_decode_proposals(no_nms) is decode_proposals
    assert nb02.EXERCISES == ["2.1 RPNHead", "2.2 rpn_loss", "2.3 decode_proposals"]
