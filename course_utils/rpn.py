"""Region Proposal Network (notebook 02, seed 000 §3.1).

The pieces, in the order the notebook builds them:

* :func:`build_backbone` -- the feature extractor: MobileNetV2's convolutional part in the
  ``full`` profile (1280 channels, stride 32, seed 000 §4.2), a small conv net sized by the profile
  otherwise.  Both map an image ``(B, 3, H, W)`` to a feature map ``(B, C, H / s, W / s)``.
* :class:`RPNHead` -- a 3x3 conv followed by two 1x1 convs: one objectness logit and four box
  deltas (Eq. 1) per anchor, as in Faster R-CNN / ``torchvision.models.detection.rpn.RPNHead``.
* :func:`rpn_loss` -- Eq. 2 on anchors that were already labelled and sampled (notebook 01).
* :func:`decode_proposals` -- deltas -> boxes, clipping, small-box removal, ``torchvision.ops.nms``
  and the top-N proposals with their confidence.
* :class:`RPN` -- backbone + head + anchors, with ``loss`` and ``proposals`` methods; the
  detector of notebook 03 reuses it unchanged.

Choices where the paper is silent follow torchvision's ``rpn.py`` and are stated where they are
made (smooth-L1 ``beta = 1/9``, NMS at IoU 0.7, 0.01-std initialisation of the head).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes

from . import registry
from .boxes import (
    anchor_grid,
    check_boxes,
    decode_boxes,
    encode_boxes,
    label_anchors,
    sample_anchors,
)
from .distributed import global_mean

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RPN",
    "RPNHead",
    "RPNTargets",
    "SmallBackbone",
    "assign_rpn_targets",
    "build_backbone",
    "build_rpn",
    "decode_proposals",
    "flatten_head_outputs",
    "check_targets",
    "rpn_loss",
    "rpn_step",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """Subtract the ImageNet mean and divide by its std: what MobileNetV2's weights expect."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallBackbone(nn.Module):
    """A plain conv net for the ``cpu`` and ``smoke`` profiles: ``(B, 3, H, W) -> (B, C, H/s, W/s)``.

    One 3x3 conv-BN-ReLU block per entry of ``widths``; the first ``log2(stride)`` blocks halve the
    resolution, the rest keep it (they only widen the receptive field, which the RPN needs to see
    a whole object from one feature cell).
    """

    def __init__(self, widths: Sequence[int], stride: int):
        super().__init__()
        n_down = int(round(math.log2(stride)))
        if 2**n_down != stride:
            raise ValueError(f"SmallBackbone: stride must be a power of two, got {stride}")
        if len(widths) < n_down:
            raise ValueError(
                f"SmallBackbone: stride {stride} needs at least {n_down} blocks, got widths={list(widths)}"
            )
        blocks, c_in = [], 3
        for i, c_out in enumerate(widths):
            blocks.append(_conv_bn_relu(c_in, c_out, 2 if i < n_down else 1))
            c_in = c_out
        self.body = nn.Sequential(*blocks)
        self.out_channels = c_in
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MobileNetV2Features(nn.Module):
    """MobileNetV2 without its classifier: ``(B, 3, H, W) -> (B, 1280, H/32, W/32)`` (seed 000 §4.2)."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.normalize = Normalize()
        self.features = _mobilenet_v2_features(pretrained)
        self.out_channels = 1280
        self.stride = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))


def _mobilenet_v2_features(pretrained: bool) -> nn.Module:
    """``mobilenet_v2().features``, with ImageNet weights when they can be had.

    The weights are torchvision's IMAGENET1K_V1 state dict, downloaded (or found in the course
    cache) by the registry entry ``mobilenet_v2_imagenet``, so ``COURSE_OFFLINE`` and the cache
    apply as for every other file.  Without them (or with ``pretrained=False``) the backbone starts
    from random weights and one line says so: the numbers of a from-scratch run are then lower
    than the paper's, which used ImageNet weights.
    """
    model = mobilenet_v2(weights=None)
    if not pretrained:
        print("backbone: MobileNetV2 from random initialisation (pretrained=False)")
        return model.features
    # on failure the registry prints the one line saying why and what is used instead
    got, source = registry.fetch_or_fallback("mobilenet_v2_imagenet", fallback=lambda: None)
    if got is not None:
        # the entry's verify hook has checked the keys and shapes, so this cannot half-load
        model.load_state_dict(torch.load(got, map_location="cpu", weights_only=True))
        print(f"backbone: MobileNetV2 with ImageNet weights ({source})")
    return model.features


def build_backbone(name: str, stride: int, widths: Sequence[int] = (),
                   pretrained: bool = True) -> nn.Module:
    """The feature extractor named by a profile's ``rpn.backbone``.

    Args:
        name: ``"mobilenet_v2"`` (seed 000 §4.2; stride must be 32) or ``"small"``.
        stride: the anchors' stride (``cfg.anchors.stride``): feature map = image / stride.
        widths: channels of each block of the ``"small"`` backbone (ignored for MobileNetV2).
        pretrained: MobileNetV2 only -- try to load ImageNet weights.

    Returns:
        a module with attributes ``out_channels`` and ``stride``.
    """
    if name == "mobilenet_v2":
        if stride != 32:
            raise ValueError(f"MobileNetV2 features have stride 32, but the anchors use stride {stride}")
        return MobileNetV2Features(pretrained)
    if name == "small":
        return SmallBackbone(widths, stride)
    raise ValueError(f"unknown backbone {name!r}; expected 'mobilenet_v2' or 'small'")


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for objectness and box deltas (Fig. 2).

    ``(B, C, H, W) -> objectness (B, A, H, W), deltas (B, 4 * A, H, W)`` with ``A`` anchors per cell
    (1 in this course: one square anchor size, as §4.2).
    """

    def __init__(self, in_channels: int, mid_channels: int | None = None, num_anchors: int = 1):
        super().__init__()
        mid = mid_channels or in_channels
        self.conv = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.cls_logits = nn.Conv2d(mid, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(mid, 4 * num_anchors, 1)
        # torchvision's initialisation: small weights so that the first proposals are the anchors
        # themselves and the first objectness is ~0.5 everywhere.
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(features))
        return self.cls_logits(t), self.bbox_pred(t)


def flatten_head_outputs(objectness: torch.Tensor,
                         deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A, H, W), (B, 4A, H, W) -> (B, H*W*A), (B, H*W*A, 4)`` in :func:`anchor_grid`'s order.

    The anchor grid runs row-major over ``(y, x)`` with the ``A`` anchors of a cell adjacent, so the
    channel axis has to move last before flattening.
    """
    b, a, h, w = objectness.shape
    obj = objectness.permute(0, 2, 3, 1).reshape(b, h * w * a)
    dl = deltas.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, 4)
    return obj, dl


# --------------------------------------------------------------------------------------------
# Loss (Eq. 2)
# --------------------------------------------------------------------------------------------


def rpn_loss(objectness: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
             target_deltas: torch.Tensor, box_weight: float = 1.0,
             beta: float = 1.0 / 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 over anchors that were already labelled and sampled.

    Args:
        objectness: ``(N,)`` logits of the sampled anchors.
        deltas: ``(N, 4)`` predicted deltas of the same anchors.
        labels: ``(N,)`` 1 for positives and 0 for negatives (no -1 here: ignored anchors are not
            sampled).
        target_deltas: ``(N, 4)`` Eq. 1 targets; only rows with ``labels == 1`` are used.
        box_weight: lambda of Eq. 2.
        beta: smooth-L1 transition point; 1/9 as torchvision's RPN.

    Returns:
        ``(cls_loss, box_loss)``: scalars with ``cls_loss = mean BCE over the N anchors`` (N_cls = N)
        and ``box_loss = box_weight * sum of smooth-L1 over positives / N_reg``.  We read Eq. 2's
        ``N_reg`` literally as the number of anchors that take part in regression (the positives;
        1 when there are none).  torchvision divides by N instead; with 1:1 sampling that is the
        same loss with lambda halved.
    """
    labels = labels.to(objectness.dtype)
    cls_loss = F.binary_cross_entropy_with_logits(objectness, labels)
    pos = labels > 0
    n_reg = max(int(pos.sum()), 1)
    box_loss = F.smooth_l1_loss(deltas[pos], target_deltas[pos], beta=beta, reduction="sum") / n_reg
    return cls_loss, box_weight * box_loss


@dataclass
class RPNTargets:
    """What labelling + sampling (notebook 01) gives for one image.

    Attributes:
        pos_idx: ``(P,)`` indices of the sampled positive anchors.
        neg_idx: ``(Q,)`` indices of the sampled negative anchors.
        matched: ``(P,)`` index of each positive's ground-truth box.
        target_deltas: ``(P, 4)`` Eq. 1 targets of the positives.
    """

    pos_idx: torch.Tensor
    neg_idx: torch.Tensor
    matched: torch.Tensor
    target_deltas: torch.Tensor


def assign_rpn_targets(anchors: torch.Tensor, gt_boxes: torch.Tensor, pos_iou: float, neg_iou: float,
                       batch_per_image: int, generator: torch.Generator | None = None) -> RPNTargets:
    """Label (max-IoU rule) and sample (1:1) the anchors of one image.

    Args:
        anchors: ``(A, 4)``.
        gt_boxes: ``(G, 4)``; ``G = 0`` (an image with no objects) gives only negatives.
        pos_iou, neg_iou: thresholds of §4.2 (0.6 / 0.1).
        batch_per_image: the most anchors one image contributes to the loss.
    """
    labels, matched = label_anchors(anchors, gt_boxes, pos_iou, neg_iou)
    # Sampling runs on the CPU generator: the same seed then gives the same anchors on any device.
    pos_idx, neg_idx = sample_anchors(labels.cpu(), batch_per_image, 0.5, generator)
    pos_idx, neg_idx = pos_idx.to(anchors.device), neg_idx.to(anchors.device)
    m = matched[pos_idx]
    targets = encode_boxes(gt_boxes[m], anchors[pos_idx]) if len(pos_idx) else anchors.new_zeros((0, 4))
    return RPNTargets(pos_idx, neg_idx, m, targets)


# --------------------------------------------------------------------------------------------
# Proposals
# --------------------------------------------------------------------------------------------


def decode_proposals(objectness: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                     image_size: tuple[int, int], pre_nms_top_n: int = 1000,
                     post_nms_top_n: int = 100, nms_iou: float = 0.7, min_size: float = 1e-3,
                     score_thresh: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn one image's head outputs into proposals with a confidence.

    Args:
        objectness: ``(A,)`` logits.
        deltas: ``(A, 4)`` Eq. 1 deltas.
        anchors: ``(A, 4)``.
        image_size: ``(H, W)``: proposals are clipped to the image.
        pre_nms_top_n: keep the best this many anchors before NMS (NMS is quadratic).
        post_nms_top_n: return at most this many proposals.
        nms_iou: NMS drops a box overlapping a better one by more than this.
        min_size: drop boxes narrower or shorter than this (pixels) after clipping.
        score_thresh: drop proposals whose confidence is not above this.

    Returns:
        ``boxes (K, 4)`` and ``conf (K,)`` = sigmoid(objectness), sorted by decreasing confidence,
        ``K <= post_nms_top_n``.
    """
    # Pick the candidates before decoding: decoding and NMS then touch only pre_nms_top_n boxes.
    k = min(pre_nms_top_n, objectness.numel())
    top = objectness.topk(k).indices
    conf = torch.sigmoid(objectness[top])
    boxes = decode_boxes(deltas[top], anchors[top])
    boxes = clip_boxes_to_image(boxes, image_size)
    keep = remove_small_boxes(boxes, min_size)
    boxes, conf = boxes[keep], conf[keep]
    keep = conf > score_thresh
    boxes, conf = boxes[keep], conf[keep]
    keep = nms(boxes, conf, nms_iou)[:post_nms_top_n]  # nms returns indices by decreasing score
    return boxes[keep], conf[keep]


# --------------------------------------------------------------------------------------------
# The RPN as one module
# --------------------------------------------------------------------------------------------


class RPN(nn.Module):
    """Backbone + :class:`RPNHead` + one square anchor per feature cell.

    ``forward(images (B, 3, H, W))`` returns a dict with ``features (B, C, h, w)``,
    ``objectness (B, A)``, ``deltas (B, A, 4)`` and ``anchors (A, 4)`` (``A = h * w``).
    """

    def __init__(self, backbone: nn.Module, anchor_size: float, pos_iou: float = 0.6,
                 neg_iou: float = 0.1, batch_per_image: int = 256, head_channels: int | None = None,
                 box_weight: float = 1.0, beta: float = 1.0 / 9, pre_nms_top_n: int = 1000,
                 post_nms_top_n: int = 100, nms_iou: float = 0.7, min_size: float = 1e-3):
        super().__init__()
        self.backbone = backbone
        self.head = RPNHead(backbone.out_channels, head_channels, num_anchors=1)
        self.anchor_size = anchor_size
        self.pos_iou, self.neg_iou, self.batch_per_image = pos_iou, neg_iou, batch_per_image
        self.box_weight, self.beta = box_weight, beta
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n
        self.nms_iou, self.min_size = nms_iou, min_size
        self._anchor_cache: dict[tuple, torch.Tensor] = {}

    @property
    def out_channels(self) -> int:
        return self.backbone.out_channels

    def anchors(self, feature_size: tuple[int, int], image_size: tuple[int, int],
                device: torch.device) -> torch.Tensor:
        """``(h * w, 4)`` anchors of a feature map, cached (they depend only on the sizes)."""
        key = (tuple(feature_size), tuple(image_size), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = anchor_grid(feature_size, image_size, self.anchor_size).to(device)
        return self._anchor_cache[key]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
        features = self.backbone(images)
        obj, deltas = flatten_head_outputs(*self.head(features))
        anchors = self.anchors(features.shape[-2:], images.shape[-2:], images.device)
        return {"features": features, "objectness": obj, "deltas": deltas, "anchors": anchors,
                "image_size": torch.tensor(images.shape[-2:])}

    def assign(self, out: dict[str, torch.Tensor], gt_boxes: Sequence[torch.Tensor],
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> list[RPNTargets]:
        """Label and sample the anchors of every image of the batch (notebook 01).

        ``generator``: one for the whole batch (``None``: the global RNG), or one per image.
        """
        if len(gt_boxes) != out["objectness"].shape[0]:
            raise ValueError(f"gt_boxes: expected one (N, 4) tensor per image "
                             f"({out['objectness'].shape[0]}), got {len(gt_boxes)}")
        if isinstance(generator, (list, tuple)):
            if len(generator) != len(gt_boxes):
                raise ValueError(f"generator: expected one torch.Generator per image ({len(gt_boxes)}), "
                                 f"got {len(generator)}")
            gens = list(generator)
        else:
            gens = [generator] * len(gt_boxes)
        return [assign_rpn_targets(out["anchors"], g, self.pos_iou, self.neg_iou,
                                   self.batch_per_image, gen) for g, gen in zip(gt_boxes, gens)]

    def loss(self, out: dict[str, torch.Tensor], targets: Sequence[RPNTargets]) -> dict[str, torch.Tensor]:
        """Eq. 2 over the sampled anchors of the whole batch: ``{"rpn", "rpn_cls", "rpn_box"}``."""
        obj, dl, tgt, lab = [], [], [], []
        for i, t in enumerate(targets):
            idx = torch.cat([t.pos_idx, t.neg_idx])
            obj.append(out["objectness"][i, idx])
            dl.append(out["deltas"][i, idx])
            tgt.append(torch.cat([t.target_deltas, t.target_deltas.new_zeros((len(t.neg_idx), 4))]))
            lab.append(torch.cat([torch.ones_like(t.pos_idx), torch.zeros_like(t.neg_idx)]))
        cls_loss, box_loss = rpn_loss(torch.cat(obj), torch.cat(dl), torch.cat(lab), torch.cat(tgt),
                                      self.box_weight, self.beta)
        # under torchrun: means over the global batch's sampled anchors and positives
        cls_loss = global_mean(cls_loss, sum(len(t.pos_idx) + len(t.neg_idx) for t in targets))
        box_loss = global_mean(box_loss, sum(len(t.pos_idx) for t in targets))
        return {"rpn": cls_loss + box_loss, "rpn_cls": cls_loss.detach(), "rpn_box": box_loss.detach()}

    @torch.no_grad()
    def proposals(self, out: dict[str, torch.Tensor],
                  post_nms_top_n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: ``(boxes (K, 4), conf (K,))`` after decoding, clipping and NMS."""
        h, w = (int(v) for v in out["image_size"])
        n = self.post_nms_top_n if post_nms_top_n is None else post_nms_top_n
        return [decode_proposals(out["objectness"][i], out["deltas"][i], out["anchors"], (h, w),
                                 self.pre_nms_top_n, n, self.nms_iou, self.min_size)
                for i in range(out["objectness"].shape[0])]


def build_rpn(cfg) -> RPN:
    """The RPN of a profile: ``build_rpn(get_config())``."""
    r, a = cfg.rpn, cfg.anchors
    backbone = build_backbone(r.backbone, a.stride, r.backbone_widths, r.pretrained)
    return RPN(backbone, a.anchor_size, a.pos_iou, a.neg_iou, a.rpn_batch_per_image,
               head_channels=r.head_channels, box_weight=r.box_weight, beta=r.smooth_l1_beta,
               pre_nms_top_n=r.pre_nms_top_n, post_nms_top_n=r.post_nms_top_n, nms_iou=r.nms_iou,
               min_size=r.min_box_size)


def check_targets(boxes: torch.Tensor, where: str = "boxes") -> torch.Tensor:
    """Validate one image's annotation boxes; return the boolean mask of boxes to keep.

    Malformed boxes (wrong shape, NaN, x2 < x1) raise a ``ValueError`` naming ``where``.
    Zero-area boxes cannot be regressed to (Eq. 1 takes ``log(w)``): they are dropped with a
    warning that names them, instead of turning the loss into inf.
    """
    check_boxes(boxes, where)
    if boxes.shape[0] == 0:
        return torch.ones(0, dtype=torch.bool, device=boxes.device)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    if not bool(keep.all()):
        bad = (~keep).nonzero().flatten().tolist()
        warnings.warn(f"{where}: dropping {len(bad)} zero-area box(es) at index {bad} "
                      f"(e.g. {boxes[bad[0]].tolist()}); they cannot be regressed to", stacklevel=2)
    return keep


def rpn_step(model: RPN, batch: dict) -> dict[str, torch.Tensor]:
    """``train.fit`` step for notebook 02: the RPN loss of one collated shapes batch.

    Returns ``{"loss", "rpn_cls", "rpn_box"}`` (``loss`` = Eq. 2).
    """
    out = model(batch["image"])
    gts = [b[check_targets(b, f"batch['boxes'][{i}] (image_id {batch['image_id'][i]})")]
           for i, b in enumerate(batch["boxes"])]
    losses = model.loss(out, model.assign(out, gts))
    return {"loss": losses["rpn"], "rpn_cls": losses["rpn_cls"], "rpn_box": losses["rpn_box"]}

