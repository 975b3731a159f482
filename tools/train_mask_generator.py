"""Train the course's small Segment Anything on SynthSVT street scenes and write ``data/small_sam/``.

Usage (the command that built the shipped weights is in ``data/small_sam/manifest.json``)::

    python tools/train_mask_generator.py                          # full run, writes data/small_sam/
    python tools/train_mask_generator.py --steps 20 --out /tmp/ss --eval-images 4   # quick check

What it does:

1. draws scenes from :func:`course_utils.synthsvt.street_scene`'s ``"masks"`` stream (SynthSVT's
   street renderer, never one of SynthSVT's train or test images), resized as SAM resizes them
   (``ResizeLongestSide`` to 256 px), with ``--points`` single-point prompts per scene: half
   inside a word's box, half anywhere in the scene.  A point's target is the box of the word it
   falls in (the whole word, as the thesis's objects), or nothing for a point on the background;
2. trains :func:`course_utils.clip.small_sam.build_sam` as SAM was trained (Kirillov et al. 2023,
   §3 and appendix A): focal + dice loss (20 : 1) on the best of the three multimask outputs, and
   the mean squared error between the predicted IoU and the real IoU of each output (a point on
   the background must predict IoU 0, so the generator's ``pred_iou_thresh`` drops it);
3. chooses the generator's two quality thresholds for these weights on held-out scenes of the
   stream (:func:`calibrate`: Table 3.2's 0.88 and 0.95 are SAM ViT-B's calibration);
4. saves ``small_sam.safetensors`` and ``manifest.json``: config, sha256, the exact command,
   seeds, steps, wall time, the loss log, the thresholds, and the mask generator's word recall
   and precision on the SynthSVT test split of the ``cpu`` profile, with the calibrated
   thresholds and with Table 3.2's.

Determinism: scene ``k`` and its points depend only on ``(seed, k)``; torch runs with a fixed
number of threads and deterministic algorithms, and MKL/oneDNN/ATen are pinned to AVX2 code
paths, so the same command writes the same bytes on any x86-64 CPU with AVX2.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO)]

import _shared  # noqa: E402

_shared.pin_numerics()  # before torch loads MKL/oneDNN

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402
from torchvision.ops import box_iou, sigmoid_focal_loss  # noqa: E402

from course_utils import synthsvt as ss  # noqa: E402
from course_utils.clip import small_sam  # noqa: E402
from course_utils.clip.masks import SamMaskSource  # noqa: E402
from course_utils.env import seed_everything  # noqa: E402
from course_utils.loaders import worker_context  # noqa: E402

FOCAL_WEIGHT = 20.0  # SAM's 20 : 1 focal : dice
THRESHOLDS = ("pred_iou_thresh", "stability_score_thresh")  # calibrated per model (calibrate)


# --------------------------------------------------------------------------------------------
# training scenes and their point prompts
# --------------------------------------------------------------------------------------------


class PromptedScenes(torch.utils.data.Dataset):
    """Scene ``k`` of the ``"masks"`` stream with its prompts.

    Returns ``(image (3, h, w) uint8, points (P, 2) float, targets (P, S, S) float)``: the scene
    resized to ``S`` on its long side, ``P`` points in that frame, and each point's target mask
    in the padded ``S x S`` frame SAM's encoder sees (its word's box, or all zeros).
    """

    def __init__(self, seed: int, points: int, size: int) -> None:
        self.seed, self.points, self.size = seed, points, size
        self.resize = ResizeLongestSide(size)

    def __len__(self) -> int:  # endless: the sampler decides how far we read
        return 1 << 40

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scene, words, _, _ = ss.street_scene(self.seed, "masks", k)
        image = self.resize.apply_image(np.asarray(scene))  # (h, w, 3)
        h, w = image.shape[:2]
        scale = self.size / max(scene.size)
        boxes = np.array([b for _, b in words], dtype=np.float64).reshape(-1, 4) * scale
        rng = np.random.default_rng([self.seed, k, 3])
        n_in = self.points // 2 if len(boxes) else 0
        owner = rng.integers(0, max(len(boxes), 1), size=n_in)
        inside = boxes[owner, :2] + rng.random((n_in, 2)) * (boxes[owner, 2:] - boxes[owner, :2])
        anywhere = rng.random((self.points - n_in, 2)) * np.array([w, h])
        points = np.concatenate([inside, anywhere])
        targets = torch.zeros(self.points, self.size, self.size)
        ys = torch.arange(self.size, dtype=torch.float64)[:, None] + 0.5
        xs = torch.arange(self.size, dtype=torch.float64)[None, :] + 0.5
        for i, (x, y) in enumerate(points):
            hit = [j for j, b in enumerate(boxes) if b[0] <= x < b[2] and b[1] <= y < b[3]]
            if hit:  # the smallest word under the point (boxes of one sign do not overlap)
                x1, y1, x2, y2 = boxes[min(hit, key=lambda j: (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]))]
                targets[i] = ((xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)).float()
        return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), torch.tensor(points, dtype=torch.float32),
                targets)


def _stack(items):
    return tuple(torch.stack(parts) for parts in zip(*items))


# --------------------------------------------------------------------------------------------
# SAM's losses
# --------------------------------------------------------------------------------------------


def sam_losses(sam: torch.nn.Module, images: torch.Tensor, points: torch.Tensor,
               targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAM's training loss for single-point prompts.

    Args:
        images: ``(B, 3, h, w)`` uint8, resized; points: ``(B, P, 2)`` in that frame;
        targets: ``(B, P, S, S)`` 0/1 masks in the padded frame.

    Returns:
        ``loss`` (focal x 20 + dice on the best of the 3 outputs, + IoU MSE on all 3), its parts,
        and ``iou`` (the mean real IoU of the best output at the input resolution).
    """
    S = targets.shape[-1]
    emb = sam.image_encoder(sam.preprocess(images.float()))
    pe = sam.prompt_encoder.get_dense_pe()
    parts = {"focal": [], "dice": [], "iou_mse": [], "iou": []}
    for b in range(images.shape[0]):
        labels = torch.ones(points.shape[1], 1, dtype=torch.int)
        sparse, dense = sam.prompt_encoder(points=(points[b][:, None, :], labels), boxes=None, masks=None)
        low, iou_pred = sam.mask_decoder(image_embeddings=emb[b:b + 1], image_pe=pe, sparse_prompt_embeddings=sparse,
                                         dense_prompt_embeddings=dense, multimask_output=True)  # (P, 3, s, s), (P, 3)
        s = low.shape[-1]
        # the loss at the decoder's resolution, against the target's share of each cell
        soft = F.avg_pool2d(targets[b][:, None], S // s).expand_as(low)
        focal = sigmoid_focal_loss(low, soft, reduction="none").mean((2, 3))
        prob = low.sigmoid()
        dice = 1 - (2 * (prob * soft).sum((2, 3)) + 1) / (prob.sum((2, 3)) + soft.sum((2, 3)) + 1)
        per_output = FOCAL_WEIGHT * focal + dice
        best = per_output.argmin(dim=1)
        rows = torch.arange(len(best))
        with torch.no_grad():  # the IoU the generator would see: logits upsampled, cut at 0
            pred = F.interpolate(low, (S, S), mode="bilinear", align_corners=False) > 0
            tgt = targets[b][:, None].bool()
            inter = (pred & tgt).sum((2, 3)).float()
            union = (pred | tgt).sum((2, 3)).float()
            real = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
            real = torch.where(tgt.flatten(1).any(1)[:, None], real, torch.zeros_like(real))
        parts["focal"].append(focal[rows, best])
        parts["dice"].append(dice[rows, best])
        parts["iou_mse"].append(((iou_pred - real) ** 2).mean(1))
        parts["iou"].append(real[rows, best][tgt.flatten(1).any(1)])
    out = {k: torch.cat(v).mean() for k, v in parts.items()}
    out["loss"] = FOCAL_WEIGHT * out["focal"] + out["dice"] + out["iou_mse"]
    return out


# --------------------------------------------------------------------------------------------
# evaluation: the automatic mask generator on SynthSVT test
# --------------------------------------------------------------------------------------------


def _match(boxes: torch.Tensor, words: torch.Tensor) -> tuple[int, int]:
    """(words found, masks that are words) at box IoU >= 0.5."""
    if not len(boxes) or not len(words):
        return 0, 0
    iou = box_iou(boxes, words)
    return int((iou.max(0).values >= 0.5).sum()), int((iou.max(1).values >= 0.5).sum())


@torch.no_grad()
def calibrate(sam: torch.nn.Module, first: int, n: int, seed: int) -> dict[str, Any]:
    """The generator's two quality thresholds for this model, chosen on held-out stream scenes.

    Table 3.2's ``pred_iou_thresh`` 0.88 and ``stability_score_thresh`` 0.95 are SAM ViT-B's
    calibration: a model with half a million parameters predicts lower IoUs and softer mask
    edges for the same words.  Scenes ``first .. first + n - 1`` of the ``"masks"`` stream (after
    every scene of training, and never a SynthSVT test image) go once through the generator with
    both thresholds at 0 (every other setting Table 3.2's, the ``cpu`` profile's grid); each pair
    of a grid of thresholds is then applied to the masks it returned, and the pair with the best
    F1 of word recall and mask precision (box IoU >= 0.5) is kept.
    """
    from course_utils.profiles import get_config

    cfg = get_config("cpu").odits
    gen = SamMaskSource(sam.eval(), description="small SAM", points_per_side=cfg["points_per_side"],
                        pred_iou_thresh=0.0, stability_score_thresh=0.0).generator
    found: list[tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]] = []
    for k in range(first, first + n):
        scene, words, _, _ = ss.street_scene(seed, "masks", k)
        out = [m for m in gen.generate(np.asarray(scene)) if m["area"] > 0]
        boxes = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for m in out for b in [m["bbox"]]],
                             dtype=torch.float32).reshape(-1, 4)
        found.append((np.array([m["predicted_iou"] for m in out]), np.array([m["stability_score"] for m in out]),
                      boxes, torch.tensor([b for _, b in words], dtype=torch.float32).reshape(-1, 4)))
    grid = [round(0.05 * i, 2) for i in range(4, 20)]  # 0.20 .. 0.95
    best: dict[str, Any] = {"f1": -1.0}
    for t_iou in grid:
        for t_stab in grid:
            hit_w = n_w = hit_m = n_m = 0
            for iou, stab, boxes, words in found:
                keep = torch.from_numpy((iou >= t_iou) & (stab >= t_stab)) if len(iou) else torch.zeros(0, dtype=torch.bool)
                kept = boxes[keep][: cfg["max_objects"]]  # the source keeps the most confident first
                w, m = _match(kept, words)
                hit_w, n_w, hit_m, n_m = hit_w + w, n_w + len(words), hit_m + m, n_m + len(kept)
            r, p = hit_w / max(n_w, 1), hit_m / max(n_m, 1)
            f1 = 2 * p * r / max(p + r, 1e-12)
            if f1 > best["f1"] + 1e-12:
                best = {"f1": round(f1, 4), "word_recall": round(r, 4), "mask_precision": round(p, 4),
                        "pred_iou_thresh": t_iou, "stability_score_thresh": t_stab}
    return {**best, "scenes": f"street_scene(seed={seed}, 'masks', k) for {first} <= k < {first + n}",
            "grid": f"{grid[0]} .. {grid[-1]} step 0.05 for both"}


@torch.no_grad()
def evaluate(sam: torch.nn.Module, split, thresholds: dict[str, float] | None = None) -> dict[str, float]:
    """Word recall and mask precision of ``SamAutomaticMaskGenerator`` on ``split``, with Table
    3.2's settings at the ``cpu`` profile's sizes (``points_per_side``, ``max_objects``), the two
    quality thresholds replaced by ``thresholds`` when given (:func:`calibrate`).

    A word is found when a mask's box overlaps its box with IoU >= 0.5; a mask is a word when
    its box overlaps some word's box so.
    """
    from course_utils.profiles import get_config

    cfg = get_config("cpu").odits
    source = SamMaskSource(sam.eval(), max_objects=cfg["max_objects"], description="small SAM",
                           points_per_side=cfg["points_per_side"], **(thresholds or {}))
    found = words = hits = masks = 0
    t = time.perf_counter()
    for rec in split:
        obj = source(rec.load())
        gt = torch.tensor([w.xyxy for w in rec.words], dtype=torch.float32).reshape(-1, 4)
        masks += len(obj)
        words += len(gt)
        w, m = _match(obj.boxes, gt)
        found, hits = found + w, hits + m
    n = max(len(split), 1)
    return {"word_recall_iou50": found / max(words, 1), "mask_precision_iou50": hits / max(masks, 1),
            "masks_per_image": masks / n, "seconds_per_image": (time.perf_counter() - t) / n,
            "n_images": len(split), "n_words": words}


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8, help="scenes per step")
    ap.add_argument("--points", type=int, default=8, help="point prompts per scene")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (fixed: results depend on it)")
    ap.add_argument("--workers", type=int, default=1, help="rendering processes (do not change results)")
    ap.add_argument("--eval-every", type=int, default=750)
    ap.add_argument("--eval-images", type=int, default=60)
    ap.add_argument("--calibration-scenes", type=int, default=40,
                    help="held-out stream scenes that choose the generator's two quality thresholds")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "small_sam")
    ap.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "small_sam_train.pt",
                    help="resumable state, written at every evaluation (resuming gives the same bytes)")
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args(argv)
    command = ("python tools/train_mask_generator.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).rstrip()

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    config = dict(small_sam.SMALL_SAM_CONFIG)
    sam = small_sam.build_sam(config, seed=args.seed).train()
    decay = [p for p in sam.parameters() if p.ndim >= 2]
    no_decay = [p for p in sam.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    start, log, done_time = 0, [], 0.0
    run_key = json.dumps({k: getattr(args, k) for k in ("steps", "batch_size", "points", "lr", "warmup",
                                                         "weight_decay", "seed", "threads")} | {"config": config},
                         sort_keys=True)
    if not args.no_resume and args.ckpt.is_file():
        state = torch.load(args.ckpt, weights_only=True)
        if state["run_key"] == run_key:
            sam.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, log, done_time = state["step"], json.loads(state["log"]), state["time"]
            print(f"resuming from {args.ckpt} at step {start}", flush=True)

    data = PromptedScenes(args.seed, args.points, config["image_size"])
    batches = [list(range(s * args.batch_size, (s + 1) * args.batch_size)) for s in range(start, args.steps)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=_stack, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers else None,
                                         multiprocessing_context=worker_context(args.workers))
    split = _shared.synthsvt_test(args.eval_images)
    n_params = sum(p.numel() for p in sam.parameters())
    print(f"training small SAM ({n_params:,} parameters): {args.steps} steps x {args.batch_size} scenes x "
          f"{args.points} points, lr {args.lr}, seed {args.seed}, {args.threads} threads; "
          f"eval on {len(split)} SynthSVT test images", flush=True)

    t0 = time.time() - done_time
    running: dict[str, float] = {}
    for step, (images, points, targets) in enumerate(loader, start=start):
        for group in opt.param_groups:
            group["lr"] = _shared.lr_at(step, args.steps, args.warmup, args.lr)
        out = sam_losses(sam, images, points, targets)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        for k, v in out.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % 50 == 0:
            row = {"step": step + 1, **{k: round(v / 50, 4) for k, v in running.items()}}
            print(f"step {step + 1:5d}  loss {row['loss']:.3f}  focal {row['focal']:.4f}  dice {row['dice']:.3f}  "
                  f"iou-mse {row['iou_mse']:.3f}  word IoU {row['iou']:.3f}  {time.time() - t0:.0f}s", flush=True)
            log.append(row)
            running = {}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            cal = calibrate(sam, args.steps * args.batch_size, args.calibration_scenes, args.seed)
            m = evaluate(sam, split, {k: cal[k] for k in THRESHOLDS})
            sam.train()
            print(f"step {step + 1:5d}  generator: word recall {m['word_recall_iou50']:.3f}, mask precision "
                  f"{m['mask_precision_iou50']:.3f}, {m['masks_per_image']:.2f} masks/image", flush=True)
            log.append({"step": step + 1, **{k: round(v, 4) for k, v in m.items()}})
            torch.save({"run_key": run_key, "model": sam.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "log": json.dumps(log), "time": time.time() - t0}, args.ckpt)
    train_time = time.time() - t0

    sha = small_sam.save_small_sam(sam, args.out / small_sam.SMALL_SAM_WEIGHTS)
    reloaded = small_sam.build_sam(config)
    reloaded.load_state_dict(load_file(str(args.out / small_sam.SMALL_SAM_WEIGHTS)))
    # the weights as saved (what users load) choose their thresholds and are measured
    cal = calibrate(reloaded, args.steps * args.batch_size, args.calibration_scenes, args.seed)
    thresholds = {k: cal[k] for k in THRESHOLDS}
    print(f"generator thresholds on {args.calibration_scenes} held-out stream scenes: {thresholds} "
          f"(F1 {cal['f1']}: word recall {cal['word_recall']}, mask precision {cal['mask_precision']})", flush=True)
    final = evaluate(reloaded, split, thresholds)
    table = evaluate(reloaded, split)
    print(f"generator on SynthSVT test: word recall {final['word_recall_iou50']:.3f}, mask precision "
          f"{final['mask_precision_iou50']:.3f}, {final['masks_per_image']:.2f} masks/image, "
          f"{final['seconds_per_image']:.2f} s/image; with Table 3.2's thresholds: word recall "
          f"{table['word_recall_iou50']:.3f}, {table['masks_per_image']:.2f} masks/image; sha256 {sha}", flush=True)
    manifest = {
        "model": "segment_anything.modeling.Sam built by course_utils.clip.small_sam.build_sam(config)",
        "config": config,
        "parameters": n_params,
        "file": small_sam.SMALL_SAM_WEIGHTS,
        "sha256": sha,
        "bytes": (args.out / small_sam.SMALL_SAM_WEIGHTS).stat().st_size,
        "command": command,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "points_per_scene": args.points,
        "scenes_seen": args.steps * args.batch_size,
        "training_data": "course_utils.synthsvt.street_scene(seed, 'masks', k) for k < scenes_seen: SynthSVT's street "
                         "renderer, a stream of scenes that is neither SynthSVT's train nor its test split; targets are "
                         "the words' boxes",
        "hyperparameters": {k: getattr(args, k) for k in ("lr", "warmup", "weight_decay", "threads")},
        "wall_time_s": round(train_time, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "generator_thresholds": thresholds,
        "calibration": cal,
        "eval_split": f"SynthSVT test of the cpu profile (seed {_shared.EVAL_SEED}), {len(split)} images",
        "final_metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()},
        "final_metrics_table_3_2_thresholds": {k: (round(v, 4) if isinstance(v, float) else v)
                                               for k, v in table.items()},
        "loss_log": log,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    main()
