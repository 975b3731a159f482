"""Retrieval recipes (notebooks 04 and 05, ``benchmarks/retrieval.py``): written once, run by all three.

* **Region features** (:func:`build_features`): train the small :class:`~course_utils.scan.Backbone`
  once on attribute classification (:func:`train_backbone`), pick ``k`` boxes per image
  (:func:`region_boxes`: the objects, jittered objects, random boxes) and pool them with
  ``roi_align`` (:func:`extract_region_features`); cached in :func:`~course_utils.cache.run_dir`
  so the notebooks and the benchmark pool them once.
* **The Table 4.1 grid** (:func:`run_variant`): one SCAN variant (:data:`TABLE_4_1`) trained at the
  coarse or fine-grained level with :func:`train_scan` (through :func:`course_utils.train.fit`,
  checkpoints in the run folder of :func:`scan_grid_knobs`) and evaluated on the test split.
* **The query-agnostic model** (:func:`run_query_agnostic`): trained contrastively with
  :func:`train_query_agnostic`, checkpoints in the run folder of :func:`query_agnostic_knobs`.
* **Matchmaps** (:func:`train_matchmap`): the cell projection and the caption GRU on top of the
  frozen backbone.

The speed race of notebook 05 is :mod:`course_utils.recipes.speed_race`.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import run_dir
from ..captions import COLORS, CaptionedSplit, CaptionVocabulary
from ..devices import module_device
from ..matchmap import MatchmapModel, contrastive_matchmap_loss, impostor_ranking_loss
from ..query_agnostic import (
    QueryAgnostic,
    contrastive_loss,
    encode_gallery,
    encode_queries,
    keep_regions,
    score_all,
)
from ..scan import (
    SCAN,
    AttributeHead,
    Backbone,
    ScanConfig,
    evaluate_retrieval,
    hardest_negative_triplet_loss,
    pool_regions,
    recall_at_k,
    scan_step_fn,
)
from ..train import History, fit

__all__ = ["PAPER_TABLE_4_1", "QA_LOSSES", "TABLE_4_1", "TEXT_LEVELS", "PairSet", "RetrievalData", "build_features",
           "build_query_agnostic", "extract_region_features", "feature_knobs", "qa_inputs", "query_agnostic_knobs",
           "region_boxes", "run_query_agnostic", "run_variant", "scan_grid_knobs", "train_backbone", "train_matchmap",
           "train_query_agnostic", "train_scan", "variant_config"]

# ----------------------------------------------------------------------------------------------
# Region features: a small CNN trained once, regions pooled with roi_align


def train_backbone(split: CaptionedSplit, channels: int, pool: int, epochs: int, seed: int = 0,
                   batch_size: int = 64, lr: float = 2e-3, progress: bool = False,
                   device: str | torch.device | None = None) -> tuple[Backbone, dict]:
    """Train :class:`~course_utils.scan.Backbone` + :class:`~course_utils.scan.AttributeHead` to
    classify the colour, shape and size of every object box of ``split``'s images ``(N, 3, H, W)``.

    Images are rendered batch by batch (10 000 training images at 224 px would be 6 GB as one
    float tensor) and trained on ``device`` (default CPU).

    Returns the backbone (eval mode, on ``device``) and ``{"loss": last epoch mean, "acc_color"...:
    train accuracy}``.

    Why this loop is not :func:`course_utils.train.fit`: it is a one-off step whose result is cached
    with the features (:func:`build_features`), so it needs neither checkpoints nor resume, and
    ``fit`` would change its numbers.  ``fit`` shuffles epoch ``e`` with a fresh generator seeded
    ``seed + e`` and weights each metric by one batch size, while this loop draws every epoch's
    order from one generator seeded ``seed``, averages the loss over images and the accuracies
    over object boxes (an image holds several).  Measured with
    ``benchmarks/retrieval.py --profile smoke`` (one thread), the loop written with ``fit`` and
    everything else equal: one epoch of one batch, so only the order of the images in the batch
    changes, and the loss is equal (3.876687) -- but the backbone's weights differ in their last
    bits, and SCAN's i-t rows amplify that: 3 of the 10 grid rows move (fine i-t LSE rsum
    104.17 -> 86.67, fine i-t AVG 92.50 -> 90.83, coarse one-directional 105.83 -> 109.17).
    """
    device = torch.device(device or "cpu")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    boxes = [split.boxes(i).to(device) for i in range(len(split))]
    labels = [{k: v.to(device) for k, v in split.labels(i).items()} for i in range(len(split))]
    net = Backbone(channels).to(device)
    head = AttributeHead(net.out_channels * pool * pool).to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=lr)
    stats: dict = {}
    for _ in range(epochs):
        perm = torch.randperm(len(split), generator=g)
        tot, correct, n = 0.0, {k: 0 for k in ("color", "shape", "size")}, 0
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size].tolist()
            keep = [i for i in idx if len(boxes[i])]
            feats = pool_regions(net(_render_batch(split, keep).to(device)), [boxes[i] for i in keep], pool, net.stride)
            logits = head(feats)
            loss = 0.0
            for k in correct:
                y = torch.cat([labels[i][k] for i in keep])
                loss = loss + F.cross_entropy(logits[k], y)
                correct[k] += int((logits[k].argmax(1) == y).sum())
            n += feats.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(keep)
        stats = {"loss": tot / len(perm), **{f"acc_{k}": v / max(n, 1) for k, v in correct.items()}}
        if progress:
            print("backbone epoch:", {k: round(v, 3) for k, v in stats.items()})
    return net.eval(), stats


def _render_batch(split: CaptionedSplit, idx: list[int]) -> torch.Tensor:
    """Images ``idx`` of ``split`` as ``(B, 3, H, W)`` float32 in ``[0, 1]``, on the CPU."""
    arr = np.stack([split.image(i) for i in idx]) if idx else np.zeros((0, 1, 1, 3), np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def region_boxes(split: CaptionedSplit, i: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """``k`` boxes for image ``i``: its objects first, then jittered objects and random boxes.

    The extra boxes stand in for the overlapping proposals of a bottom-up detector: jittered copies
    cover parts of objects, random boxes cover background and clusters.  ``-> (k, 4)`` float32.
    """
    size = split.scenes[i].size
    obj = split.boxes(i)[:k]
    extra = []
    for j in range(k - len(obj)):
        if len(obj) and j % 2 == 0:
            x1, y1, x2, y2 = obj[int(rng.integers(len(obj)))].tolist()
            w, h = x2 - x1, y2 - y1
            dx, dy, sw, sh = rng.uniform(-0.3, 0.3, size=4)
            cx, cy = (x1 + x2) / 2 + dx * w, (y1 + y2) / 2 + dy * h
            w, h = w * (1 + sw), h * (1 + sh)
            b = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            s = rng.uniform(0.08, 0.5, size=2) * size
            x, y = rng.uniform(0, 1, size=2) * (size - s)
            b = [x, y, x + s[0], y + s[1]]
        extra.append(np.clip(b, 0, size))
    return torch.cat([obj, torch.tensor(np.array(extra), dtype=torch.float32).reshape(-1, 4)])


@torch.no_grad()
def extract_region_features(backbone: Backbone, split: CaptionedSplit, k: int, pool: int, seed: int = 0,
                            batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Pool region features for every image of ``split``.

    Returns ``{"fine": (N, k, D), "coarse": (N, 1, D), "boxes": (N, k, 4)}`` on the CPU, with
    ``D = C * pool * pool``; the coarse feature is the whole image pooled the same way.  The
    backbone runs where its weights are; images are rendered batch by batch.
    """
    dev = module_device(backbone)
    rng = np.random.default_rng([seed, 11])
    boxes = torch.stack([region_boxes(split, i, k, rng) for i in range(len(split))])
    size = split.scenes[0].size if len(split) else 1
    whole = torch.tensor([[0.0, 0.0, size, size]], device=dev)
    fine, coarse = [], []
    for s in range(0, len(split), batch_size):
        idx = list(range(s, min(s + batch_size, len(split))))
        fmap = backbone(_render_batch(split, idx).to(dev))
        b = boxes[s:s + len(idx)].to(dev)
        fine.append(pool_regions(fmap, list(b), pool, backbone.stride).view(len(idx), k, -1).cpu())
        coarse.append(pool_regions(fmap, [whole] * len(idx), pool, backbone.stride).view(len(idx), 1, -1).cpu())
    return {"fine": torch.cat(fine), "coarse": torch.cat(coarse), "boxes": boxes}


def feature_knobs(cfg: dict, seed: int = 0) -> dict:
    """Every setting the region features depend on (the ``retrieval`` section's data, backbone and
    pooling knobs, the seed), for :func:`~course_utils.cache.run_dir`.

    The colour vocabulary is part of it: changing the scene generator must not reuse stale features.
    """
    keys = ("image_size", "n_train", "n_val", "n_test", "min_objects", "max_objects", "small_size",
            "large_size", "k_fine", "backbone_channels", "backbone_epochs", "feat_pool")
    return {"data": {k: cfg[k] for k in keys}, "seed": int(seed), "colors": list(COLORS)}


def build_features(splits: dict[str, CaptionedSplit], cfg: dict, seed: int = 0, cache: bool = True,
                   progress: bool = True, device: str | torch.device | None = None
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], Backbone, dict]:
    """Train the backbone once (on ``device``, default CPU) and pool features for every split,
    cached in ``run_dir("04_region_features", feature_knobs(cfg, seed))``.

    Returns ``(features[split] = {"fine" (N, k, D), "coarse" (N, 1, D), "boxes" (N, k, 4)} on the
    CPU, backbone on ``device``, backbone_stats)``.
    """
    device = torch.device(device or "cpu")
    root = run_dir("04_region_features", feature_knobs(cfg, seed))
    path = root / "features.pt"
    backbone = Backbone(int(cfg["backbone_channels"]))
    if cache and path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            backbone.load_state_dict(blob["backbone"])
            if progress:
                print(f"region features loaded from cache {path}")
            return blob["features"], backbone.to(device).eval(), blob["stats"]
        except Exception as e:  # a truncated file from an interrupted run: rebuild it
            print(f"cache {path} unreadable ({type(e).__name__}); rebuilding")
    backbone, stats = train_backbone(splits["train"], int(cfg["backbone_channels"]), int(cfg["feat_pool"]),
                                     int(cfg["backbone_epochs"]), seed=seed, progress=progress, device=device)
    feats = {name: extract_region_features(backbone, sp, int(cfg["k_fine"]), int(cfg["feat_pool"]), seed=seed + j)
             for j, (name, sp) in enumerate(splits.items())}
    if cache:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".features.pt.tmp-{os.getpid()}"  # per process: notebooks may build this at once
        torch.save({"features": feats, "backbone": backbone.state_dict(), "stats": stats}, tmp)
        tmp.replace(path)
    return feats, backbone, stats


@dataclass
class RetrievalData:
    """Everything a variant needs: features per level and tokenised texts per level and split."""

    feats: dict[str, dict[str, torch.Tensor]]       # split -> {"fine", "coarse", "boxes"}
    texts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # split -> level -> (tokens, lengths)
    cap_to_img: dict[str, torch.Tensor]
    vocab: CaptionVocabulary

    @classmethod
    def build(cls, splits: dict[str, CaptionedSplit], feats: dict[str, dict[str, torch.Tensor]],
              vocab: CaptionVocabulary | None = None) -> RetrievalData:
        """Coarse text = the whole caption; fine-grained text = its noun phrases (seed 003 §4.1)."""
        vocab = vocab or CaptionVocabulary()
        texts = {name: {"coarse": vocab.batch(sp.texts), "fine": vocab.batch(sp.phrase_texts)}
                 for name, sp in splits.items()}
        return cls(feats, texts, {n: sp.cap_to_img for n, sp in splits.items()}, vocab)


# ----------------------------------------------------------------------------------------------
# The grid of Table 4.1


class PairSet(torch.utils.data.Dataset):
    """``(features of the caption's image (k, F), tokens (L,), length, image index)`` per caption."""

    def __init__(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, cap_to_img: torch.Tensor):
        self.feats, self.tokens, self.lengths, self.cap_to_img = feats, tokens, lengths, cap_to_img

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, c: int):
        i = self.cap_to_img[c]
        return self.feats[i], self.tokens[c], self.lengths[c], i


def train_scan(model: SCAN, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
               cap_to_img: torch.Tensor, *, epochs: int, batch_size: int, lr: float, margin: float = 0.2,
               warmup_epochs: int = 1, seed: int = 0, ckpt_dir: str | Path | None = None, progress: bool = True,
               desc: str = "scan", device: str | torch.device | None = None) -> History:
    """Train one SCAN variant on precomputed features with :func:`~course_utils.train.fit`, on
    ``device`` (default: where the model is); the features stay on the CPU, batches move.

    Args:
        feats: ``(N, k, F)`` region features of the training images.
        tokens, lengths: ``(C, L)``, ``(C,)`` training captions; ``cap_to_img``: ``(C,)``.

    Returns the :class:`~course_utils.train.History`.
    """
    data = PairSet(feats, tokens, lengths, cap_to_img)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Decay the learning rate over the last third: the hardest-negative loss is noisy at the end.
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, (2 * epochs) // 3)], gamma=0.1)
    return fit(model, scan_step_fn(margin, warmup_epochs * steps_per_epoch, opt), data, epochs=epochs,
               batch_size=batch_size, optimizer=opt, scheduler=sched, ckpt_dir=ckpt_dir, seed=seed,
               grad_clip=2.0, progress=progress, desc=desc, device=device)


#: The rows of seed 003's Table 4.1: (row label, direction, pooling, bidirectional GRU).
TABLE_4_1 = [("t-i LSE", "t2i", "lse", True), ("t-i AVG", "t2i", "avg", True),
             ("i-t LSE", "i2t", "lse", True), ("i-t AVG", "i2t", "avg", True),
             ("One-directional GRU + i-t AVG", "i2t", "avg", False)]
#: Seed 003 Table 4.1, Chinese artwork dataset (fine-grained): row -> (i2t R@1/5/10, t2i R@1/5/10).
PAPER_TABLE_4_1 = {"t-i LSE": (8.7, 14.1, 20.3, 5.7, 9.2, 15.6), "t-i AVG": (7.9, 14.4, 20.6, 6.2, 9.6, 16.2),
                   "i-t LSE": (12.8, 20.7, 28.7, 9.3, 15.7, 22.4), "i-t AVG": (12.6, 20.3, 28.9, 9.1, 15.9, 23.2),
                   "One-directional GRU + i-t AVG": (15.5, 18.5, 24.8, 7.5, 14.7, 19.8)}


def variant_config(direction: str, agg: str, cfg: dict) -> ScanConfig:
    """The :class:`~course_utils.scan.ScanConfig` of a variant with the profile's lambdas."""
    lam = cfg["lambda_softmax_i2t"] if direction == "i2t" else cfg["lambda_softmax_t2i"]
    return ScanConfig(direction, agg, float(lam), float(cfg["lambda_lse"]))


def scan_grid_knobs(cfg: dict, seed: int = 0, features: dict | None = None) -> dict:
    """What the grid's checkpoints depend on: the feature knobs and every training knob of
    :func:`run_variant`.  Its checkpoints: ``run_dir("04_scan_grid", scan_grid_knobs(cfg, seed))``,
    one subfolder per variant.

    ``features``: what the features depend on when they are not the synthetic ones of
    :func:`feature_knobs` (``source.knobs`` of
    :func:`~course_utils.recipes.retrieval_data.load_retrieval_inputs`; for the synthetic scenes it
    *is* ``feature_knobs(cfg, seed)``, so the folder is the same as without it)."""
    keys = ("word_dim", "embed_dim", "batch_size", "epochs", "lr", "margin", "lambda_softmax_t2i",
            "lambda_softmax_i2t", "lambda_lse", "warmup_epochs")
    return {"features": feature_knobs(cfg, seed) if features is None else features,
            "train": {k: cfg[k] for k in keys}}


def run_variant(data: RetrievalData, level: str, row: str, cfg: dict, *, seed: int = 0,
                ckpt_root: Path | None = None, split: str = "test", progress: bool = True,
                device: str | torch.device | None = None) -> dict:
    """Train (or resume from ``ckpt_root``) one row of Table 4.1 at ``level`` on ``device`` (default
    CPU) and evaluate it.

    Returns ``{"row", "level", **R@K, "train_s", "eval_s", "model", "sims" (I, C), "history"}``.
    """
    _, direction, agg, bi = next(r for r in TABLE_4_1 if r[0] == row)
    feats = data.feats["train"][level]
    torch.manual_seed(seed)
    model = SCAN(feats.shape[-1], len(data.vocab), int(cfg["word_dim"]), int(cfg["embed_dim"]),
                 variant_config(direction, agg, cfg), bidirectional=bi)
    tok, ln = data.texts["train"][level]
    ckpt = None
    if ckpt_root is not None:
        ckpt = Path(ckpt_root) / f"{level}_{direction}_{agg}_{'bi' if bi else 'uni'}"
    t = time.perf_counter()
    hist = train_scan(model, feats, tok, ln, data.cap_to_img["train"], epochs=int(cfg["epochs"]),
                      batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]), margin=float(cfg["margin"]),
                      warmup_epochs=int(cfg["warmup_epochs"]), seed=seed, ckpt_dir=ckpt, progress=progress,
                      desc=f"{level} {row}", device=torch.device(device or "cpu"))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    tok_e, ln_e = data.texts[split][level]
    metrics, sims = evaluate_retrieval(model, data.feats[split][level], tok_e, ln_e, data.cap_to_img[split],
                                       tuple(cfg["eval_shard"]))
    return {"row": row, "level": level, **metrics, "train_s": train_s, "eval_s": time.perf_counter() - t,
            "model": model, "sims": sims, "history": hist}


# ----------------------------------------------------------------------------------------------
# The query-agnostic model (notebook 05)


#: What the caption tower reads.  ``"fine"``: the caption's noun phrases, the same tokens as SCAN's
#: fine-grained level, so the speed race compares the two models on identical queries;
#: ``"coarse"``: the whole sentence.  Measured on the ``cpu`` test split: rsum 318.2 with noun
#: phrases vs 311.7 with sentences, and 20 % fewer words to encode (notebook 05, section 4).
TEXT_LEVELS = {"fine": "noun phrases", "coarse": "whole caption"}


def qa_inputs(feats: dict[str, torch.Tensor], image_size: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(global (N, F), regions (N, k, F), keep (N, k))`` from one split's cached features.

    Real precomputed features carry no boxes: :mod:`~course_utils.recipes.retrieval_data` gives each
    region the whole frame, so the object prior keeps all of them."""
    return feats["coarse"][:, 0], feats["fine"], keep_regions(feats["boxes"], image_size, alpha)


class _QueryAgnosticPairs(torch.utils.data.Dataset):
    """``(global (F,), regions (k, F), keep (k,), tokens (L,), length, image index)`` per caption."""

    def __init__(self, glob: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor, tokens: torch.Tensor,
                 lengths: torch.Tensor, cap_to_img: torch.Tensor):
        self.glob, self.regions, self.keep = glob, regions, keep
        self.tokens, self.lengths, self.cap_to_img = tokens, lengths, cap_to_img

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, c: int):
        i = self.cap_to_img[c]
        return self.glob[i], self.regions[i], self.keep[i], self.tokens[c], self.lengths[c], i


#: The query-agnostic model's losses (knob ``qa_loss``): the poster's contrastive InfoNCE, and
#: SCAN's hinge triplet loss with the hardest negative of the batch or with the sum over all of them.
QA_LOSSES = ("infonce", "triplet-hardest", "triplet-sum")


def _query_agnostic_step(model: QueryAgnostic, batch, loss: str = "infonce",
                         margin: float = 0.2) -> dict[str, torch.Tensor]:
    g, r, kp, tok, ln, ids = batch
    L = int(ln.max())
    img, txt = model.encode_image(g, r, kp), model.encode_text(tok[:, :L], ln)
    if loss == "infonce":
        return {"loss": contrastive_loss(img, txt, model.temperature, ids)}
    return {"loss": hardest_negative_triplet_loss(img @ txt.T, margin, max_violation=loss == "triplet-hardest",
                                                  img_ids=ids)}


def train_query_agnostic(model: QueryAgnostic, global_feat: torch.Tensor, regions: torch.Tensor,
                         keep: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                         cap_to_img: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                         seed: int = 0, ckpt_dir: str | Path | None = None, progress: bool = True,
                         device: str | torch.device | None = None, loss: str = "infonce",
                         margin: float = 0.2) -> History:
    """Training with :func:`~course_utils.train.fit` on features ``global (N, F)``,
    ``regions (N, k, F)``, ``keep (N, k)`` and captions ``tokens (C, L)``, ``lengths (C,)``,
    ``cap_to_img (C,)``; ``loss`` one of :data:`QA_LOSSES` (``margin``: the triplet losses').
    The learning rate drops tenfold after two thirds of the epochs.
    Returns the :class:`~course_utils.train.History`."""
    if loss not in QA_LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {QA_LOSSES}")
    data = _QueryAgnosticPairs(global_feat, regions, keep, tokens, lengths, cap_to_img)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, (2 * epochs) // 3)], gamma=0.1)
    step = functools.partial(_query_agnostic_step, loss=loss, margin=margin)
    return fit(model, step, data, epochs=epochs, batch_size=batch_size, optimizer=opt,
               scheduler=sched, ckpt_dir=ckpt_dir, seed=seed, grad_clip=2.0, progress=progress,
               desc="query-agnostic", device=device)


def query_agnostic_knobs(cfg: dict, seed: int = 0, features: dict | None = None) -> dict:
    """What the query-agnostic model's checkpoints depend on: the feature knobs and every knob of
    :func:`run_query_agnostic`.  Its checkpoints:
    ``run_dir("05_query_agnostic", query_agnostic_knobs(cfg, seed))``, one subfolder per text level.
    ``features`` as in :func:`scan_grid_knobs`."""
    keys = ("word_dim", "embed_dim", "batch_size", "qa_alpha", "qa_heads", "qa_epochs", "qa_lr", "qa_layers",
            "qa_ffn_norm", "qa_loss", "margin", "qa_text_tower")
    return {"features": feature_knobs(cfg, seed) if features is None else features,
            "train": {k: cfg[k] for k in keys}}


def build_query_agnostic(data: RetrievalData, cfg: dict) -> QueryAgnostic:
    """A freshly initialised (global RNG) :class:`QueryAgnostic` of ``cfg``'s sizes for ``data``'s features
    and vocabulary, on the CPU.  Also what notebook 05 times the other caption tower with: a
    forward pass costs the same whatever the weights."""
    return QueryAgnostic(data.feats["train"]["coarse"].shape[-1], len(data.vocab), int(cfg["word_dim"]),
                         int(cfg["embed_dim"]), int(cfg["qa_heads"]), layers=int(cfg["qa_layers"]),
                         ffn_norm=bool(cfg["qa_ffn_norm"]), text_tower=str(cfg["qa_text_tower"]))


def run_query_agnostic(data: RetrievalData, cfg: dict, *, text_level: str = "fine", seed: int = 0,
                       ckpt_dir: str | Path | None = None, split: str = "test", progress: bool = True,
                       device: str | torch.device | None = None) -> dict:
    """Train (or resume) the query-agnostic model on ``data`` on ``device`` (default CPU) and
    evaluate R@K on ``split``.

    Returns ``{**R@K, "train_s", "eval_s", "model", "sims" (I, C), "history", "kept", "text_level"}``;
    ``kept`` is the mean number of regions per test image the object prior keeps.
    ``text_level`` is a key of :data:`TEXT_LEVELS`; checkpoints go to ``ckpt_dir / text_level``.
    """
    if text_level not in TEXT_LEVELS:
        raise ValueError(f"text_level={text_level!r}: expected one of {sorted(TEXT_LEVELS)}")
    size, alpha = int(cfg["image_size"]), float(cfg["qa_alpha"])
    g, r, keep = qa_inputs(data.feats["train"], size, alpha)
    tok, ln = data.texts["train"][text_level]
    torch.manual_seed(seed)
    model = build_query_agnostic(data, cfg)
    t = time.perf_counter()
    hist = train_query_agnostic(model, g, r, keep, tok, ln, data.cap_to_img["train"], epochs=int(cfg["qa_epochs"]),
                                batch_size=int(cfg["batch_size"]), lr=float(cfg["qa_lr"]), seed=seed,
                                ckpt_dir=None if ckpt_dir is None else Path(ckpt_dir) / text_level,
                                progress=progress, device=torch.device(device or "cpu"),
                                loss=str(cfg["qa_loss"]), margin=float(cfg["margin"]))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    gt, rt, kt = qa_inputs(data.feats[split], size, alpha)
    tok_e, ln_e = data.texts[split][text_level]
    sims = score_all(encode_gallery(model, gt, rt, kt), encode_queries(model, tok_e, ln_e)).cpu()
    return {**recall_at_k(sims, data.cap_to_img[split]), "train_s": train_s, "eval_s": time.perf_counter() - t,
            "model": model, "sims": sims, "history": hist, "kept": float(kt.float().sum(1).mean()),
            "text_level": text_level}


# ----------------------------------------------------------------------------------------------
# Matchmaps (notebook 04, seed 002)


def train_matchmap(model: MatchmapModel, split: CaptionedSplit, vocab: CaptionVocabulary, *, epochs: int,
                   batch_size: int = 32, lr: float = 1e-3, agg: str = "misa", seed: int = 0,
                   margin: float = 0.2, impostors: int = 1, loss: str = "ranking", temperature: float = 0.1,
                   progress: bool = False) -> list[float]:
    """Train on (image ``(3, H, W)``, one random caption of it) pairs; returns the mean loss of
    each epoch.  Trains where the model is (move it first); images are rendered per batch.

    ``loss="ranking"``: :func:`~course_utils.matchmap.impostor_ranking_loss` (``margin``,
    ``impostors``); ``loss="contrastive"``:
    :func:`~course_utils.matchmap.contrastive_matchmap_loss` (``temperature``).

    Why this loop is not :func:`course_utils.train.fit`: one generator seeded ``seed`` draws, in
    order, every epoch's image order, each pair's caption and the ranking loss's impostors, and a
    batch of one pair is skipped (neither loss is defined on it) while the epoch mean still
    divides by every image.  ``fit`` shuffles each epoch with a fresh generator seeded
    ``seed + e`` and averages over the pairs it trained on, so it cannot give the same numbers.
    Measured with ``benchmarks/retrieval.py --profile smoke`` (one thread), the loop written with
    ``fit`` (captions and impostors drawn from the global generator, which ``fit`` checkpoints):
    contrastive loss 2.080209 -> 2.080548, ranking loss 0.401134 -> 0.399942.
    """
    if loss not in ("ranking", "contrastive"):
        raise ValueError(f"loss={loss!r}: expected 'ranking' or 'contrastive'")
    empty = [i for i in range(len(split)) if not len(split.caption_range(i))]
    if empty:
        raise ValueError(f"image {empty[0]} of the split has no caption; every image needs one to train on")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    dev = module_device(model)
    tokens, lengths = vocab.batch(split.texts)
    tokens, lengths = tokens.to(dev), lengths.to(dev)
    losses = []
    model.train()
    for e in range(epochs):
        perm = torch.randperm(len(split), generator=g).tolist()
        tot = 0.0
        for s in range(0, len(perm) - 1, batch_size):
            idx = perm[s:s + batch_size]
            if len(idx) < 2:
                continue
            # One caption of each image, drawn uniformly among that image's own captions.
            caps = [split.caption_range(i)[int(torch.randint(len(split.caption_range(i)), (1,), generator=g))]
                    for i in idx]
            images = _render_batch(split, idx).to(dev)
            L = int(lengths[caps].max())
            cells, words = model.cells(images), model.words(tokens[caps, :L], lengths[caps])
            if loss == "ranking":
                value = impostor_ranking_loss(cells, words, lengths[caps], agg, margin=margin, generator=g,
                                              impostors=impostors)
            else:
                value = contrastive_matchmap_loss(cells, words, lengths[caps], agg, temperature)
            opt.zero_grad()
            value.backward()
            opt.step()
            tot += value.item() * len(idx)
        losses.append(tot / len(perm))
        if progress:
            print(f"matchmap epoch {e + 1}/{epochs}: loss {losses[-1]:.4f}")
    return losses
