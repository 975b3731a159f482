"""Recipe: ODITS on an SVT split, trained and compared with the CLIP it starts from (notebook 08).

Shared by notebook 08 and ``benchmarks/odits.py``:

* :func:`load_start_clip` — the profile's CLIP with notebook 07's fine-tuned weights (§3.2);
* :func:`finetune_start_clip` — notebook 07's recipe run here when its checkpoint is missing;
* :func:`profile_mask_source` — the profile's mask source (its kind, grid and object cap);
* :func:`split_features` — objects and CLIP embeddings of both splits;
* :func:`train_odits` — ODITS (or its no-object ablation) through :func:`course_utils.train.fit`;
* :func:`head_to_head` — the four rows of the comparison on the test split, scored with the one
  Table 2.6 evaluator (:func:`course_utils.clip.wordspotting.table_2_6_metrics`).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..clip.loading import ClipBundle, load_clip, load_clip_weights
from ..clip.masks import MaskSource, load_mask_source
from ..clip.objects import (
    ObjectFeatureDataset,
    ObjectFeatures,
    clip_probabilities,
    extract_object_features,
    object_max_probabilities,
)
from ..clip.odits import ODITS, predict, set_deterministic
from ..clip.odits_loss import odits_step_fn, word_class_weights
from ..clip.wordspotting import table_2_6_metrics
from ..history import History
from ..svt import SVTSplit
from ..tracking import tensors_sha256, weights_sha256
from ..train import fit
from .clip_finetune import best_checkpoint_path, finetune_and_select

__all__ = [
    "MODEL_NAMES",
    "TRAINED",
    "finetune_start_clip",
    "head_to_head",
    "load_start_clip",
    "profile_mask_source",
    "row_settings",
    "odits_knobs",
    "split_features",
    "train_odits",
]

#: the rows of the comparison, in order: key -> what it is
MODEL_NAMES = {"clip": "CLIP", "odits": "ODITS", "odits_seed_loss": "ODITS, seed's weighted loss",
               "odits_no_objects": "ODITS without objects", "objects_no_training": "objects, no training"}

#: the trained rows of :data:`MODEL_NAMES`: key -> (use_objects, the ``odits.loss`` it trains with;
#: None = the profile's)
TRAINED = {"odits": (True, None), "odits_seed_loss": (True, "class_weighted"), "odits_no_objects": (False, None)}


def load_start_clip(kind: str, profile: str, checkpoint: str | Path | None = None,
                    device: str | torch.device = "cpu", when_unavailable: str = "fallback") -> ClipBundle:
    """The CLIP ODITS is initialised from (§3.2): the profile's CLIP, then notebook 07's weights.

    Notebook 07's weights are ``checkpoint`` when given, else the best-precision checkpoint that
    notebook 07 saved for ``profile`` (:func:`course_utils.recipes.clip_finetune.best_checkpoint_path`),
    if it exists and is newer than the shipped small-CLIP weights (an older file was fine-tuned
    from something else).  ``bundle.info["finetuned"]`` says whether they were loaded.

    ``when_unavailable`` is :func:`~course_utils.clip.loading.load_clip`'s.

    Raises:
        FileNotFoundError: ``checkpoint`` was given and does not exist.
    """
    bundle = load_clip(kind, device=device, when_unavailable=when_unavailable)
    path = Path(checkpoint) if checkpoint else best_checkpoint_path(profile)
    shipped = bundle.info.get("path")  # the small CLIP's weights file
    if (not checkpoint and path.is_file() and shipped
            and path.stat().st_mtime < Path(shipped).stat().st_mtime):
        print(f"[odits] ignoring {path}: older than {shipped}, so not fine-tuned from it")
        return bundle
    if path.is_file():
        load_clip_weights(bundle.model, path)
        bundle.weights += f" + notebook 07's fine-tuned weights ({path})"
        bundle.info["finetuned"] = True
    elif checkpoint:
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file (expected notebook 07's fine-tuned CLIP)")
    return bundle


def finetune_start_clip(bundle: ClipBundle, train: SVTSplit, test: SVTSplit, svt_cfg: Mapping[str, Any],
                        progress: bool = False) -> str:
    """Notebook 07's recipe, for when its checkpoint is missing; changes ``bundle.model`` in place.

    Fine-tunes with Algorithm 1 and the profile's Table 2.5 settings (``svt_cfg``) in a fresh
    temporary folder, keeps the checkpoint with the best test precision, as the thesis and
    notebook 07 do (:func:`course_utils.recipes.clip_finetune.finetune_and_select`), and returns
    a line saying what was done (appended to ``bundle.weights``).
    """
    with tempfile.TemporaryDirectory(prefix="odits_ft_") as tmp:
        res = finetune_and_select(bundle, train, test, svt_cfg, Path(tmp), seed=svt_cfg["seed"],
                                  progress=progress)
    best, zero = res.best, res.zero_shot
    line = (f" + fine-tuned here with notebook 07's recipe (checkpoint +{best['epoch']} of "
            f"{svt_cfg['ft_epochs']}, chosen by precision: {zero['precision']:.4f} -> {best['precision']:.4f} "
            f"on {res.ev.unit}s)")
    bundle.weights += line
    bundle.info["finetuned"] = True
    return line


def profile_mask_source(cfg: Mapping[str, Any], device: str | torch.device = "cpu",
                        when_unavailable: str = "fallback") -> tuple[MaskSource, str]:
    """:func:`course_utils.clip.masks.load_mask_source` with the profile's ``odits`` settings
    (``mask_source``, ``points_per_side``, ``max_objects``), so that the notebook, the command
    line and the benchmark extract the same objects (and so find each other's runs)."""
    return load_mask_source(cfg["mask_source"], device=device, max_objects=cfg["max_objects"],
                            when_unavailable=when_unavailable, points_per_side=cfg["points_per_side"])


def split_features(bundle: ClipBundle, splits: Mapping[str, SVTSplit], source: MaskSource,
                   words: Sequence[str], cfg: Mapping[str, Any], progress: bool = False) -> dict[str, ObjectFeatures]:
    """:func:`course_utils.clip.objects.extract_object_features` for every split, with the
    profile's ``odits`` settings (``max_objects``, ``background``, ``crop``)."""
    return {name: extract_object_features(bundle, split.images, source, words, max_objects=cfg["max_objects"],
                                          background=cfg["background"], crop=cfg["crop"], progress=progress)
            for name, split in splits.items()}


def odits_knobs(clip: nn.Module, feats: ObjectFeatures, words: Sequence[str], cfg: Mapping[str, Any],
                use_objects: bool) -> dict[str, Any]:
    """What an ODITS run depends on, for :func:`course_utils.cache.run_dir`: the profile's
    ``odits`` settings, the ablation, the starting CLIP's weights and the training features
    (sha256 of each), so that a run never resumes from checkpoints of other weights or objects."""
    tensors = {k: getattr(feats, k) for k in ("image_emb", "object_emb", "conf", "valid", "counts", "targets")}
    return {"odits": {k: v for k, v in sorted(dict(cfg).items())}, "use_objects": bool(use_objects),
            "clip": weights_sha256(clip)[:16], "features": tensors_sha256(tensors)[:16], "words": list(words)}


def row_settings(cfg: Mapping[str, Any], key: str) -> tuple[bool, dict[str, Any]]:
    """``(use_objects, settings)`` that train the row ``key`` of :data:`TRAINED` from the
    profile's ``odits`` section ``cfg`` (the same section with the row's loss, if it has one)."""
    if key not in TRAINED:
        raise ValueError(f"row_settings: {key!r} is not a trained row; expected one of {list(TRAINED)}")
    use_objects, loss = TRAINED[key]
    return use_objects, {**dict(cfg), **({"loss": loss} if loss else {})}


def train_odits(clip: nn.Module, feats: ObjectFeatures, words: Sequence[str], text_emb: torch.Tensor,
                cfg: Mapping[str, Any], *, use_objects: bool = True, device: str | torch.device | None = None,
                progress: bool = False, ckpt_dir: str | Path | None = None, resume: bool = True,
                desc: str | None = None, **model_kwargs: Any) -> tuple[ODITS, History, dict[str, Any]]:
    """Build ODITS on a deep copy of ``clip`` and train its new layers with the shared loop.

    Args:
        clip: the starting CLIP (left untouched).
        feats: the training split's :class:`course_utils.clip.objects.ObjectFeatures`.
        words, text_emb: the vocabulary and its ``(n, d)`` embeddings.
        cfg: the profile's ``odits`` section (heads, ff_mult, init, seed, freeze_clip, epochs,
            batch_size, lr, weight_decay, loss, class_weight_power, grad_clip).
        use_objects: False trains the ablation without objects.
        device: where to train (default: where ``clip`` is).  ODITS is built on ``clip``'s
            device and :func:`course_utils.train.fit` moves it to ``device``; ``feats`` stay on
            the CPU and fit moves each batch.
        desc: the name in the progress lines (default: the row's name in :data:`MODEL_NAMES`,
            "ODITS" or "ODITS without objects").
        ckpt_dir, resume: :func:`course_utils.train.fit`'s (notebook 08 and the command line use
            ``run_dir("08_odits", odits_knobs(...))``, so either finds the other's run).
        model_kwargs: passed to :class:`course_utils.clip.odits.ODITS` (e.g. the notebook's
            ``similarity_fn``).

    Returns:
        ``(model, history, info)``; ``info`` has ``train_s``, ``final_loss``, ``trainable_params``.
    """
    set_deterministic(cfg["seed"])
    model = ODITS(copy.deepcopy(clip), heads=cfg["heads"], ff_mult=cfg["ff_mult"], init=cfg["init"],
                  seed=cfg["seed"], use_objects=use_objects, freeze_clip=cfg["freeze_clip"], **model_kwargs)
    model.set_vocabulary(words, text_emb)
    weights = word_class_weights(feats.targets, cfg["class_weight_power"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    t0 = time.perf_counter()
    hist = fit(model, odits_step_fn(weights, cfg["loss"]), ObjectFeatureDataset(feats), epochs=cfg["epochs"],
               batch_size=cfg["batch_size"], optimizer=opt, seed=cfg["seed"], grad_clip=cfg["grad_clip"],
               progress=progress, desc=desc or MODEL_NAMES["odits" if use_objects else "odits_no_objects"], device=device,
               ckpt_dir=ckpt_dir, resume=resume, keep_epochs=())  # the latest only: each holds the CLIP
    info = {"train_s": time.perf_counter() - t0, "final_loss": hist.train["loss"][-1],
            "trainable_params": sum(p.numel() for p in params)}
    return model, hist, info


def head_to_head(models: Mapping[str, ODITS], test: ObjectFeatures, text_emb: torch.Tensor,
                 logit_scale: float) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """The comparison of notebook 08 on the test split: probabilities and Table 2.6 per model.

    Args:
        models: ``{"odits": ..., "odits_seed_loss": ..., "odits_no_objects": ...}`` (the keys of
            :data:`TRAINED`; any may be missing).
        test: the test split's features; text_emb: ``(n, d)``; logit_scale: CLIP's ``1/τ``.

    Returns:
        ``(P, metrics)``: per row of :data:`MODEL_NAMES`, the ``(N, n)`` word probabilities and
        :func:`course_utils.clip.wordspotting.table_2_6_metrics` against the words written in
        each image (approach 1 included, lexicon-50 from each image's lexicon).  The matrices
        are on the CPU; ``text_emb`` and the models may be on any device.
    """
    # the matrices are for tables and figures: on the CPU, wherever text_emb and the models are
    P = {"clip": clip_probabilities(test, text_emb, logit_scale).cpu()}
    unknown = set(models) - set(TRAINED)
    if unknown:
        raise ValueError(f"head_to_head: models has keys {sorted(unknown)}; expected some of {list(TRAINED)}")
    P.update({name: predict(models[name], test)["P"] for name in TRAINED if name in models})
    P["objects_no_training"] = object_max_probabilities(test, text_emb, logit_scale).cpu()
    metrics = {name: table_2_6_metrics(p, test.targets, lexicon=test.lexicon, approach1=True)
               for name, p in P.items()}
    return P, metrics
