"""Evaluation of seed 000 §4.4: Table 1, Fig. 8, and proposal recall for notebook 02.

Definitions (the paper states them loosely; these are ours, stated once here and in notebook 03):

* A prediction matches a ground-truth box when their IoU is at least 0.5.  Matching is one to one
  and greedy by score: predictions are visited best first and each takes the still-unmatched
  ground-truth box it overlaps most (as in the PASCAL VOC / COCO evaluation).
* **All proposals**: predictions are the RPN proposals with Conf > 0.5, ground truth is every
  object of the image.
* **Aligned proposals**: predictions are the proposals with Score = Conf x Align > 0.5 (Eq. 5),
  ground truth is the objects the query describes.
* **Mean precision** = mean over images of TP / #predictions (images with no prediction are left
  out: their precision is undefined).  **Mean recall** = mean over images of TP / #ground truth
  (images with no ground truth left out).  **Mean IoU** = mean IoU over all matched pairs.
* **Alignment accuracy**: for every "all proposals" prediction matched to an object, whether
  ``Align > 0.5`` equals the object's alignment label; mean over images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_iou
from tqdm.auto import tqdm

from .shapes import collate_scenes

__all__ = [
    "PAPER_TABLE1",
    "DetectionReport",
    "GroupStats",
    "alignment_by_query_kind",
    "evaluate_detector",
    "query_kind",
    "format_table1",
    "match_greedy",
    "proposal_recall",
    "table1_rows",
]

#: Table 1 of seed 000.
PAPER_TABLE1 = {
    "all": {"precision": 0.932, "recall": 0.862, "iou": 0.759},
    "aligned": {"precision": 0.948, "recall": 0.966, "iou": 0.767, "align_acc": 0.996},
}


def match_greedy(pred_boxes: torch.Tensor, pred_scores: torch.Tensor, gt_boxes: torch.Tensor,
                 iou_thresh: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-to-one greedy matching by score.

    Args:
        pred_boxes: ``(P, 4)``; pred_scores: ``(P,)``; gt_boxes: ``(G, 4)``.

    Returns:
        ``(pred_idx (T,), gt_idx (T,), iou (T,))`` of the ``T`` matched pairs, best prediction first.
    """
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return empty
    iou = box_iou(pred_boxes.float().cpu(), gt_boxes.float().cpu())  # (P, G)
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    pi, gi, vals = [], [], []
    for p in torch.argsort(pred_scores.cpu(), descending=True, stable=True).tolist():
        row = iou[p].masked_fill(taken, -1.0)
        g = int(row.argmax())
        if row[g] >= iou_thresh:
            taken[g] = True
            pi.append(p)
            gi.append(g)
            vals.append(float(row[g]))
    if not pi:
        return empty
    return torch.tensor(pi), torch.tensor(gi), torch.tensor(vals)


@dataclass
class GroupStats:
    """Per-image counts of one group (all or aligned proposals) and the IoUs of its matches."""

    tp: list[int] = field(default_factory=list)
    n_pred: list[int] = field(default_factory=list)
    n_gt: list[int] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)

    def add(self, tp: int, n_pred: int, n_gt: int, ious: Sequence[float]) -> None:
        self.tp.append(tp)
        self.n_pred.append(n_pred)
        self.n_gt.append(n_gt)
        self.ious.extend(float(v) for v in ious)

    @property
    def precision(self) -> float:
        v = [t / p for t, p in zip(self.tp, self.n_pred) if p > 0]
        return float(np.mean(v)) if v else float("nan")

    @property
    def recall(self) -> float:
        v = [t / g for t, g in zip(self.tp, self.n_gt) if g > 0]
        return float(np.mean(v)) if v else float("nan")

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else float("nan")


@dataclass
class DetectionReport:
    """What :func:`evaluate_detector` measures; ``metrics()`` gives Table 1's numbers."""

    all: GroupStats = field(default_factory=GroupStats)
    aligned: GroupStats = field(default_factory=GroupStats)
    align_correct: list[float] = field(default_factory=list)  # per image accuracy
    n_images: int = 0
    wall_s: float = 0.0

    @property
    def align_acc(self) -> float:
        return float(np.mean(self.align_correct)) if self.align_correct else float("nan")

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{"all": {precision, recall, iou}, "aligned": {precision, recall, iou, align_acc}}``."""
        return {
            "all": {"precision": self.all.precision, "recall": self.all.recall, "iou": self.all.mean_iou},
            "aligned": {"precision": self.aligned.precision, "recall": self.aligned.recall,
                        "iou": self.aligned.mean_iou, "align_acc": self.align_acc},
        }


@torch.no_grad()
def evaluate_detector(model, dataset, batch_size: int = 32, conf_thresh: float = 0.5,
                      score_thresh: float = 0.5, iou_thresh: float = 0.5,
                      device: torch.device | str | None = None, progress: bool = True,
                      keep_detections: int = 0) -> tuple[DetectionReport, list]:
    """Run ``model.detect`` on ``dataset`` and measure Table 1 (§4.4).

    Args:
        model: a :class:`course_utils.detector.SemanticDetector`.
        dataset: a shapes split (items with image, boxes, aligned, query).
        keep_detections: also return the detections of the first this many images (for figures).

    Returns:
        ``(report, detections)``; ``detections`` is a list of ``(item, Detections)`` pairs.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    report, kept = DetectionReport(), []
    t0 = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_scenes)
    try:
        for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            dets = model.detect(batch["image"].to(device), batch["query"])
            for i, det in enumerate(dets):
                gt, aligned = batch["boxes"][i], batch["aligned"][i]
                det = type(det)(*(t.cpu() for t in (det.boxes, det.conf, det.align, det.score)))
                _score_image(report, det, gt, aligned, conf_thresh, score_thresh, iou_thresh)
                if len(kept) < keep_detections:
                    kept.append(({k: v[i] for k, v in batch.items() if k != "image"}
                                 | {"image": batch["image"][i]}, det))
    finally:
        model.train(was_training)
    report.wall_s = time.perf_counter() - t0
    return report, kept


def _score_image(report: DetectionReport, det, gt: torch.Tensor, aligned: torch.Tensor,
                 conf_thresh: float, score_thresh: float, iou_thresh: float) -> None:
    report.n_images += 1
    # All proposals: confident RPN boxes against every object.
    keep = det.conf > conf_thresh
    pi, gi, ious = match_greedy(det.boxes[keep], det.conf[keep], gt, iou_thresh)
    report.all.add(len(pi), int(keep.sum()), len(gt), ious.tolist())
    if len(pi):
        pred_aligned = det.align[keep][pi] > 0.5
        report.align_correct.append(float((pred_aligned == aligned[gi]).float().mean()))
    # Aligned proposals: Score > 0.5 against the objects the query describes.
    keep = det.score > score_thresh
    gt_al = gt[aligned]
    pi, gi, ious = match_greedy(det.boxes[keep], det.score[keep], gt_al, iou_thresh)
    report.aligned.add(len(pi), int(keep.sum()), len(gt_al), ious.tolist())


def table1_rows(metrics: dict[str, dict[str, float]]) -> list[dict]:
    """Table 1 as rows ``{"experiment", "metric", "ours", "paper"}`` (for the results JSON)."""
    rows = []
    for group, name in (("all", "all proposals"), ("aligned", "aligned proposals")):
        for key in ("precision", "recall", "iou", "align_acc"):
            if key in metrics[group]:
                rows.append({"notebook": "03", "experiment": name, "metric": key,
                             "ours": round(float(metrics[group][key]), 4),
                             "paper": PAPER_TABLE1[group].get(key)})
    return rows


def format_table1(metrics: dict[str, dict[str, float]], profile: str = "") -> str:
    """Table 1 with the paper's numbers beside ours, as aligned text."""
    names = {"precision": "Mean Precision", "recall": "Mean Recall", "iou": "Mean IoU",
             "align_acc": "Alignment Accuracy"}
    head = f"{'Metric':<20}{'All (ours)':>12}{'All (paper)':>13}{'Aligned (ours)':>16}{'Aligned (paper)':>17}"
    lines = [f"Table 1 ({profile} profile vs seed 000)" if profile else "Table 1", head, "-" * len(head)]

    def f(v) -> str:
        return "N/A" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

    for key, label in names.items():
        lines.append(f"{label:<20}{f(metrics['all'].get(key)):>12}{f(PAPER_TABLE1['all'].get(key)):>13}"
                     f"{f(metrics['aligned'].get(key)):>16}{f(PAPER_TABLE1['aligned'].get(key)):>17}")
    return "\n".join(lines)


def proposal_recall(proposals: Sequence[torch.Tensor], gt_boxes: Sequence[torch.Tensor],
                    top_n: Sequence[int], iou_thresh: float = 0.5) -> dict[int, float]:
    """Recall of ground-truth boxes by the best ``n`` proposals, for each ``n`` in ``top_n``.

    Args:
        proposals: per image ``(K_i, 4)`` sorted by decreasing confidence.
        gt_boxes: per image ``(G_i, 4)``.

    Returns:
        ``{n: recall}``: the fraction of all ground-truth boxes (pooled over images) with IoU >= 0.5
        to at least one of the first ``n`` proposals of its image (a proposal may cover several
        objects here: this measures coverage, as in the Faster R-CNN paper's recall curves).
    """
    hits = {n: 0 for n in top_n}
    total = 0
    for props, gt in zip(proposals, gt_boxes):
        total += len(gt)
        if len(gt) == 0 or len(props) == 0:
            continue
        iou = box_iou(props.float().cpu(), gt.float().cpu())
        for n in top_n:
            hits[n] += int((iou[:n].max(dim=0).values >= iou_thresh).sum())
    return {n: hits[n] / total if total else float("nan") for n in top_n}


def query_kind(terms: Sequence[tuple[str | None, str | None]]) -> str:
    """Name the kind of a shapes query from its terms (what it asks the text encoder to do).

    ``"one term"`` ("red circles", "blue shapes"); ``"two terms, no binding"`` when each term is a
    colour alone or a shape alone ("red shapes and circles": which word goes with which does not
    matter); ``"two terms, binding"`` when a term pairs a colour with a shape ("red circles and blue
    shapes"): "red shapes and blue circles" has the same words, so the encoder has to use their order.
    """
    if len(terms) == 1:
        return "one term"
    return "two terms, binding" if any(c is not None and s is not None for c, s in terms) else "two terms, no binding"


@torch.no_grad()
def alignment_by_query_kind(model, dataset, batch_size: int = 50) -> dict[str, dict[str, float]]:
    """Alignment accuracy on the ground-truth boxes, split by :func:`query_kind`.

    Every object of every image is scored against the image's query (``Align > 0.5`` vs its
    label); the RPN plays no part, so this isolates the proposal encoder, text encoder and
    alignment head.  Returns ``{kind: {"objects": n, "queries": q, "accuracy": a}}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stats: dict[str, list[int]] = {}
    try:
        for start in range(0, len(dataset), batch_size):
            idx = range(start, min(start + batch_size, len(dataset)))
            batch = collate_scenes([dataset[i] for i in idx])
            out = model.rpn(batch["image"].to(device))
            text = model.encode_queries(batch["query"], device)
            logits = model.align_logits(out["features"], [b.to(device) for b in batch["boxes"]], text).cpu()
            pos = 0
            for i, lab in zip(idx, batch["aligned"]):
                pred = logits[pos: pos + len(lab)] > 0
                pos += len(lab)
                s = stats.setdefault(query_kind(dataset.scenes[i].terms), [0, 0, 0])
                s[0] += len(lab)
                s[1] += 1
                s[2] += int((pred == lab).sum())
    finally:
        model.train(was_training)
    order = ("one term", "two terms, no binding", "two terms, binding")
    return {k: {"objects": stats[k][0], "queries": stats[k][1], "accuracy": stats[k][2] / max(stats[k][0], 1)}
            for k in order if k in stats}
