"""Detection recipes (notebooks 01-03, ``benchmarks/anchors.py`` and ``benchmarks/detector.py``).

* :func:`matcher_labels` -- torchvision's labelling of one image's anchors, the reference that
  notebook 01 and the anchor benchmark hold the course's :func:`~course_utils.boxes.label_anchors`
  against.
* :func:`step_lr_optimizer` -- the optimiser and StepLR schedule of a profile section (§4.3).
* :func:`rpn_knobs`, :func:`detector_knobs` -- the settings a training run depends on, which name
  its checkpoint folder through :func:`~course_utils.cache.run_dir`: notebook 03 and the detector
  benchmark share a folder, so whichever runs second finds the finished run.
* :func:`train_detector` -- end-to-end training of the semantic detector (§3.6, §4.3) with
  :func:`course_utils.train.fit`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from ..detector import SemanticDetector, build_detector, detector_step
from ..env import get_device, seed_everything
from ..profiles import Config, Section
from ..shapes import ShapesDataset, collate_scenes
from ..train import History, fit

__all__ = ["detector_knobs", "matcher_labels", "rpn_knobs", "step_lr_optimizer", "train_detector"]


def matcher_labels(anchors: torch.Tensor, gt_boxes: torch.Tensor,
                   matcher: Matcher) -> tuple[torch.Tensor, torch.Tensor]:
    """Label ``anchors (A, 4)`` against ``gt_boxes (G, 4)`` as torchvision's RPN does.

    Returns ``labels (A,)`` int64 in ``{1, 0, -1}`` (positive, negative, between the thresholds)
    and ``matched (A,)``: ``Matcher``'s answer, the index of each anchor's box, or
    ``Matcher.BELOW_LOW_THRESHOLD`` / ``Matcher.BETWEEN_THRESHOLDS``.  An image without boxes
    gives only negatives (``RegionProposalNetwork.assign_targets_to_anchors``' rule; ``Matcher``
    itself refuses an empty image).
    """
    if gt_boxes.shape[0] == 0:
        n = anchors.shape[0]
        return (torch.zeros(n, dtype=torch.int64),
                torch.full((n,), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64))
    matched = matcher(box_iou(gt_boxes, anchors))
    labels = (matched >= 0).to(torch.int64)
    labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1
    return labels, matched


def step_lr_optimizer(model: nn.Module, section: Section
                      ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """The optimiser and StepLR schedule of a profile section (``cfg.rpn`` or ``cfg.detector``).

    ``section.optimizer == "sgd"`` is §4.3 (SGD with momentum and weight decay; the ``full``
    profile).  ``"adamw"`` (momentum unused) is there for from-scratch training in minutes on a CPU,
    where SGD needs many more epochs to get the small alignment head going.
    """
    name = section.get("optimizer", "sgd")
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=section.lr, momentum=section.momentum,
                              weight_decay=section.weight_decay)
    elif name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=section.lr_step, gamma=section.lr_gamma)


def _sections(cfg: Config, names: tuple[str, ...], seed: int) -> dict:
    return {"sections": {k: dict(cfg[k]) for k in names if k in cfg}, "seed": int(seed)}


def rpn_knobs(cfg: Config, seed: int = 0) -> dict:
    """What notebook 02's RPN run depends on: the ``shapes``, ``anchors`` and ``rpn`` sections and
    the seed.  Its checkpoints: ``run_dir(f"02_rpn_{cfg.name}", rpn_knobs(cfg, seed))``."""
    return _sections(cfg, ("shapes", "anchors", "rpn"), seed)


def detector_knobs(cfg: Config, seed: int = 0) -> dict:
    """What the detector run of notebook 03 and ``benchmarks/detector.py`` depends on: the
    ``shapes``, ``anchors``, ``rpn`` and ``detector`` sections and the seed.  Its checkpoints:
    ``run_dir(f"03_detector_{cfg.name}", detector_knobs(cfg, seed))``."""
    return _sections(cfg, ("shapes", "anchors", "rpn", "detector"), seed)


def train_detector(cfg: Config, splits: dict[str, ShapesDataset], *, model: SemanticDetector | None = None,
                   ckpt_dir: str | Path | None = None, device: torch.device | str | None = None,
                   progress: bool = True, max_steps: int | None = None, seed: int = 0,
                   resume: bool = True) -> tuple[SemanticDetector, History]:
    """Train the profile's detector end to end on ``splits["train"]`` (§3.6, §4.3).

    Args:
        cfg: the profile (``get_config()``); its ``detector`` section sizes the run.
        splits: shapes splits; ``"val"`` (if present) is evaluated after each epoch (Fig. 7).
        model: a detector to train (notebook 03 builds one with the student's modules); default
            ``build_detector(cfg)`` after ``seed_everything(seed)``.
        ckpt_dir: checkpoints, one per epoch; an interrupted run resumes from them.
        device: default :func:`~course_utils.env.get_device`.
        max_steps, resume: as :func:`~course_utils.train.fit`.

    Returns ``(model, history)``; batches are collated shapes scenes (images ``(B, 3, H, W)``).
    """
    if model is None:
        seed_everything(seed)
        model = build_detector(cfg)
    model = model.to(device or get_device())
    d = cfg.detector
    opt, sched = step_lr_optimizer(model, d)
    print(f"{type(opt).__name__} lr {d.lr}, {d.epochs} epochs, batch {d.batch_size}")
    hist = fit(model, detector_step, splits["train"], epochs=d.epochs, batch_size=d.batch_size,
               optimizer=opt, scheduler=sched, val_set=splits.get("val"), collate_fn=collate_scenes,
               ckpt_dir=ckpt_dir, resume=resume, seed=seed, max_steps=max_steps,
               grad_clip=d.grad_clip, progress=progress, desc="detector",
               num_workers=int(cfg.runtime.loader_workers), mixed_precision=bool(cfg.runtime.mixed_precision))
    return model, hist
