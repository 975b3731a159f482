"""Benchmark: train and evaluate the semantic detector of notebook 03 and report Table 1.

Trains the active profile's detector end to end (seed 000 §3.6, §4.3) on the synthetic shapes
train split, evaluates it on the test split as §4.4 (all proposals and aligned proposals), and
writes ``benchmarks/results/detector_<profile>.json`` with every Table 1 metric beside the
paper's, the training and evaluation wall times and images/s for training and for inference.

    COURSE_PROFILE=cpu python benchmarks/detector.py [--fresh] [--max-steps N]

Training is notebook 03's recipe (``course_utils.recipes.detection.train_detector``) and its
checkpoints live where the notebook keeps them, ``run_dir(f"03_detector_{profile}", detector_knobs)``:
after the notebook has run in the same profile the benchmark finds the finished run and only
evaluates; the training time it reports is then the one recorded in the run's history (the sum
of the per-epoch wall times, validation included).  ``--fresh`` trains again from scratch.
``--max-steps`` stops training early (used to check on a CPU that the ``full`` profile starts and
its losses move); the JSON then says so in ``extra.max_steps``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from course_tools.report import write_result  # noqa: E402
from course_utils.cache import run_dir  # noqa: E402
from course_utils.detection_metrics import (  # noqa: E402
    PAPER_TABLE1,
    evaluate_detector,
    format_table1,
    table1_rows,
)
from course_utils.env import get_device  # noqa: E402
from course_utils.profiles import get_config  # noqa: E402
from course_utils.recipes.detection import detector_knobs, train_detector  # noqa: E402
from course_utils.shapes import build_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="smoke|cpu|full (default: $COURSE_PROFILE)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after N steps")
    parser.add_argument("--fresh", action="store_true",
                        help="train from scratch even if notebook 03's finished run is cached")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    cfg = get_config(args.profile)
    device = get_device()
    data = build_shapes(cfg.shapes, seed=0)
    print(f"profile {cfg.name}, device {device}, train/val/test = "
          f"{len(data['train'])}/{len(data['val'])}/{len(data['test'])}")

    # A --max-steps run is a smoke check of the configuration: never mix it with a cached run.
    ckpt_dir = None if args.max_steps else run_dir(f"03_detector_{cfg.name}", detector_knobs(cfg, 0))
    t0 = time.perf_counter()
    model, hist = train_detector(cfg, data, ckpt_dir=ckpt_dir, device=device, progress=False,
                                 max_steps=args.max_steps, resume=not args.fresh)
    train_s = time.perf_counter() - t0
    n_epochs = len(hist.epochs)
    if n_epochs and not args.max_steps:
        # Per-epoch wall times recorded by fit (training + validation), also for a resumed run.
        train_s = sum(hist.wall_s)
    # Only training images are counted (validation time is inside train_s), so images/s is a
    # lower bound on the training throughput.
    trained_images = (args.max_steps * cfg.detector.batch_size if args.max_steps
                      else n_epochs * len(data["train"]))

    report, _ = evaluate_detector(model, data["test"], batch_size=cfg.detector.batch_size,
                                  conf_thresh=cfg.rpn.conf_thresh,
                                  score_thresh=cfg.detector.score_thresh, progress=False)
    metrics = report.metrics()
    print(format_table1(metrics, cfg.name))
    print(f"train {train_s:.1f}s ({trained_images / train_s:.1f} images/s), "
          f"evaluation {report.wall_s:.1f}s ({report.n_images / report.wall_s:.1f} images/s)")

    def clean(v: float) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)

    result = {
        "all_precision": clean(metrics["all"]["precision"]),
        "all_recall": clean(metrics["all"]["recall"]),
        "all_iou": clean(metrics["all"]["iou"]),
        "aligned_precision": clean(metrics["aligned"]["precision"]),
        "aligned_recall": clean(metrics["aligned"]["recall"]),
        "aligned_iou": clean(metrics["aligned"]["iou"]),
        "align_acc": clean(metrics["aligned"]["align_acc"]),
        "train_wall_s": round(train_s, 1),
        "eval_wall_s": round(report.wall_s, 1),
        "train_images_per_s": round(trained_images / train_s, 2),
        "inference_images_per_s": round(report.n_images / report.wall_s, 2),
        "final_train_loss": {k: clean(v[-1]) for k, v in hist.train.items()} if n_epochs else None,
        "final_val_loss": {k: clean(v[-1]) for k, v in hist.val.items()} if hist.val else None,
    }
    paper = {f"{g}_{k}": v for g, d in PAPER_TABLE1.items() for k, v in d.items()}
    paper["align_acc"] = paper.pop("aligned_align_acc")
    rows = [dict(r, ours=clean(r["ours"])) for r in table1_rows(metrics)]
    rows += [{"notebook": "03", "experiment": "detector training", "metric": "train images/s",
              "ours": result["train_images_per_s"], "paper": None},
             {"notebook": "03", "experiment": "detector inference", "metric": "images/s",
              "ours": result["inference_images_per_s"], "paper": None}]
    extra = {"epochs_trained": n_epochs, "checkpoints": str(ckpt_dir) if ckpt_dir else None,
             "max_steps": args.max_steps, "device": str(device),
             "threads": torch.get_num_threads(), "backbone": cfg.rpn.backbone,
             "pretrained_backbone": cfg.rpn.pretrained, "n_test": report.n_images,
             "note": ("full profile is the paper's configuration (§4.2-4.3); cpu/smoke are "
                      "smaller images, a from-scratch backbone and fewer epochs")}
    if not args.no_write:
        path = write_result(f"detector_{cfg.name}", profile=cfg.name, metrics=result, paper=paper, rows=rows,
                            extra=extra)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
