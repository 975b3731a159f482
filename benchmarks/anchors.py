"""Benchmark: the course's anchor labelling vs torchvision's Matcher + sampler (notebook 01).

Seed-000 setting whatever the profile: a 512x512 image, 64 px anchors on the 16x16 feature map of
MobileNetV2 (stride 32), 20 ground-truth boxes, thresholds 0.6 / 0.1.  Both pipelines run on the
same inputs; their labels are asserted equal before anything is timed.  Times are medians of
interleaved blocks measured in one run, and the result is their ratio (ours / torchvision), the
only number that travels between machines.

    python benchmarks/anchors.py [--images 200] [--blocks 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from course_tools.report import write_result
from course_utils import boxes
from course_utils.profiles import resolve_profile_name
from course_utils.recipes.detection import matcher_labels


def make_cases(n_images: int, n_boxes: int = 20, size: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """``n_images`` sets of ``(n_boxes, 4)`` ground-truth boxes of 40-80 px (the shapes world)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        wh = torch.rand(n_boxes, 1, generator=g) * 40 + 40
        xy = torch.rand(n_boxes, 2, generator=g) * (size - wh)
        out.append(torch.cat([xy, xy + wh], dim=1))
    return out


def ours_label(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return boxes.label_anchors(anchors, gt, 0.6, 0.1)[0]


def torchvision_label(anchors: torch.Tensor, gt: torch.Tensor, matcher: Matcher) -> torch.Tensor:
    # What torchvision's RegionProposalNetwork.assign_targets_to_anchors does per image.
    return matcher_labels(anchors, gt, matcher)[0]


def time_blocks(fn, cases, blocks: int) -> list[float]:
    out = []
    for _ in range(blocks):
        t = time.perf_counter()
        for gt in cases:
            fn(gt)
        out.append((time.perf_counter() - t) / len(cases))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per-image work this small only measures threading overhead otherwise

    anchors = boxes.anchor_grid((16, 16), (512, 512), 64)
    cases = make_cases(args.images)
    matcher = Matcher(0.6, 0.1, allow_low_quality_matches=True)
    sampler = BalancedPositiveNegativeSampler(256, 0.5)
    g = torch.Generator().manual_seed(0)

    for gt in cases:  # same labels, asserted, before anything is timed
        assert torch.equal(ours_label(anchors, gt), torchvision_label(anchors, gt, matcher))

    pipelines = {
        "ours_label": lambda gt: ours_label(anchors, gt),
        "torchvision_label": lambda gt: torchvision_label(anchors, gt, matcher),
        "ours_label_sample": lambda gt: boxes.sample_anchors(ours_label(anchors, gt), 256, generator=g),
        "torchvision_label_sample": lambda gt: sampler([torchvision_label(anchors, gt, matcher)]),
    }
    for fn in pipelines.values():  # warm-up
        time_blocks(fn, cases[:20], 1)
    samples: dict[str, list[float]] = {k: [] for k in pipelines}
    for _ in range(args.blocks):  # interleave so drifts in machine load hit every pipeline alike
        for name, fn in pipelines.items():
            samples[name] += time_blocks(fn, cases, 1)
    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}  # microseconds per image
    ratio_label = med["ours_label"] / med["torchvision_label"]
    ratio_total = med["ours_label_sample"] / med["torchvision_label_sample"]

    print(f"{len(anchors)} anchors, 20 boxes per image, {args.images} images x {args.blocks} blocks")
    for k, v in med.items():
        print(f"  {k:26s} {v:8.1f} us / image")
    print(f"  labelling ratio ours/torchvision           {ratio_label:.3f}")
    print(f"  labelling + sampling ratio ours/torchvision {ratio_total:.3f}")

    metrics = {
        "us_per_image": med,
        "ratio_label": ratio_label,
        "ratio_label_sample": ratio_total,
        "labels_identical": True,
        "n_anchors": len(anchors),
        "n_images": args.images,
        "blocks": args.blocks,
    }
    rows = [
        {"notebook": "01", "experiment": "anchor labelling vs torchvision Matcher (512 px, 20 boxes)",
         "metric": "time ratio ours / torchvision (labels identical)", "ours": round(ratio_label, 3),
         "paper": None},
        {"notebook": "01", "experiment": "labelling + 1:1 sampling vs Matcher + BalancedPositiveNegativeSampler",
         "metric": "time ratio ours / torchvision", "ours": round(ratio_total, 3), "paper": None},
    ]
    path = write_result("anchors", profile=resolve_profile_name(), metrics=metrics, paper=None, rows=rows,
                        extra={"setting": "seed 000 §4.2: 512x512, 64 px anchors, stride 32, IoU 0.6/0.1",
                               "threads": 1})
    print(f"wrote {path}")
    return metrics


if __name__ == "__main__":
    main()
