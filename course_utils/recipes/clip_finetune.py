"""Recipe: fine-tune CLIP on SVT as notebook 07 does and keep the checkpoint chosen by precision.

Notebook 07 walks through the steps one cell at a time; ``benchmarks/clip_svt.py`` and notebook
08 (when notebook 07's checkpoint is missing) run them in one call, :func:`finetune_and_select`:
zero-shot evaluation, Algorithm 1 with Table 2.5's settings (:func:`course_utils.clip.finetune.finetune`),
Table 2.6 for every kept checkpoint (:func:`evaluate_checkpoints`), and the checkpoint with the
best precision (:func:`best_by`, §2.4.3).  Notebook 07 saves the chosen weights at
:func:`best_checkpoint_path`, where notebook 08 starts from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import cache_root
from ..checkpoints import checkpoint_path, load_checkpoint
from ..clip.evaluation import EvalSet, build_eval_set, evaluate_word_spotting
from ..clip.finetune import WordCropDataset, checkpoint_epochs, finetune, pair_dataset
from ..clip.loading import ClipBundle
from ..clip.wordspotting import TABLE_COLUMNS
from ..history import History
from ..svt import SVTSplit

__all__ = [
    "FinetuneResult",
    "best_by",
    "best_checkpoint_path",
    "evaluate_checkpoints",
    "finetune_and_select",
    "finetune_knobs",
    "save_table",
]


def finetune_knobs(bundle: ClipBundle, svt_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a fine-tuning run depends on, for :func:`course_utils.cache.run_dir`: the starting
    weights (sha256 prefix, pretrained tag, or ``random``) and every ``ft_*`` setting, so a run
    never resumes from checkpoints that grew out of other weights or other settings."""
    start = "random" if bundle.info.get("random_init") else (
        bundle.info.get("sha256", "")[:12] or str(bundle.info.get("pretrained", "openai")))
    return {"kind": bundle.kind, "start": start,
            "ft": {k: v for k, v in sorted(dict(svt_cfg).items()) if k.startswith("ft_")}}


def best_checkpoint_path(profile: str) -> Path:
    """Where notebook 07 saves the chosen (best-precision) fine-tuned CLIP's ``state_dict``;
    notebook 08 starts from it (:func:`course_utils.clip.loading.load_clip_weights` reads it)."""
    return cache_root() / "clip_svt" / f"finetuned_best_{profile}.pt"


def evaluate_checkpoints(model: torch.nn.Module, ev: EvalSet, ckpt_dir: str | Path,
                         epochs: Sequence[int], *, zero_shot: dict[str, Any] | None = None,
                         verbose: bool = True) -> list[dict[str, Any]]:
    """Table 2.6: one row per kept checkpoint (``epoch`` 0 = ``zero_shot``, evaluated beforehand).

    ``model`` is overwritten with each checkpoint's weights in turn (and left at the last one).

    Returns:
        rows ``{"epoch", "accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1",
        "logit_scale"}``, and ``"precision_at_zero_shot_scale"`` when ``zero_shot`` is given (the
        checkpoint's embeddings at the zero-shot temperature: see
        :func:`course_utils.clip.evaluation.evaluate_word_spotting`).
    """
    rows = []
    ref = None
    if zero_shot is not None:
        ref = zero_shot.get("logit_scale")
        rows.append({"epoch": 0, **{k: zero_shot[k] for k in TABLE_COLUMNS}, "logit_scale": ref,
                     "precision_at_zero_shot_scale": zero_shot["precision"]})
    for e in epochs:
        path = checkpoint_path(ckpt_dir, e)
        load_checkpoint(path, model=model)
        m = evaluate_word_spotting(model, ev, reference_scale=ref)
        row = {"epoch": int(e), **{k: m[k] for k in TABLE_COLUMNS}, "logit_scale": m["logit_scale"]}
        if ref is not None:
            row["precision_at_zero_shot_scale"] = m["precision_at_reference_scale"]
        rows.append(row)
        if verbose:
            print(f"checkpoint +{e}: " + "  ".join(f"{k} {m[k]:.4f}" for k in TABLE_COLUMNS)
                  + f"  1/τ {m['logit_scale']:.1f}")
    return rows


def best_by(rows: Sequence[dict[str, Any]], key: str = "precision", *, include_zero_shot: bool = False) -> dict[str, Any]:
    """The row with the largest ``key`` (the thesis picks the checkpoint by precision, §2.4.3);
    ties go to the earlier epoch."""
    pool = [r for r in rows if include_zero_shot or r["epoch"] > 0]
    if not pool:
        raise ValueError("best_by: no fine-tuned checkpoint rows")
    return max(pool, key=lambda r: (r[key] if not math.isnan(r[key]) else -math.inf, -r["epoch"]))


def save_table(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write Table 2.6 rows as JSON (the benchmark and notebook 08 read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2))
    return path


@dataclass
class FinetuneResult:
    """What :func:`finetune_and_select` measured.

    Attributes:
        ev: the test split's :class:`course_utils.clip.evaluation.EvalSet`.
        train_set: the (crop, word) pairs trained on.
        zero_shot: Table 2.6 of the model before fine-tuning (plus ``logit_scale``, ``eval_s``).
        zero_shot_P: its ``(n_rows, n_words)`` probability matrix.
        rows: Table 2.6 per kept checkpoint (``epoch`` 0 first).
        best: the row chosen by precision; the model holds its weights.
        history: the training loop's history.
    """

    ev: EvalSet
    train_set: WordCropDataset
    zero_shot: dict[str, Any]
    zero_shot_P: torch.Tensor
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    history: History


def finetune_and_select(bundle: ClipBundle, train: SVTSplit, test: SVTSplit, svt_cfg: Mapping[str, Any],
                        ckpt_dir: str | Path, *, seed: int = 0, resume: bool = False, progress: bool = False,
                        verbose: bool = False) -> FinetuneResult:
    """Notebook 07 in one call; ``bundle.model`` ends holding the best-precision checkpoint.

    Args:
        bundle: the CLIP to fine-tune (changed in place).
        train, test: the SVT splits (rows follow the model: crops or images).
        svt_cfg: the profile's ``svt`` section (Table 2.5 settings ``ft_*``).
        ckpt_dir: where the run's checkpoints go (a temporary folder for one complete run, or a
            :func:`course_utils.cache.run_dir` to resume).
        seed: the training loop's seed.

    Returns:
        a :class:`FinetuneResult`.
    """
    ev = build_eval_set(test, bundle)
    zero = evaluate_word_spotting(bundle.model, ev, return_matrices=True)
    P = zero.pop("P")
    zero.pop("image_emb"), zero.pop("text_emb")
    train_set = pair_dataset(train, bundle, pads=svt_cfg["ft_crop_pads"])
    history = finetune(bundle.model, train_set, svt_cfg, ckpt_dir, resume=resume, seed=seed, progress=progress)
    rows = evaluate_checkpoints(bundle.model, ev, ckpt_dir, checkpoint_epochs(svt_cfg), zero_shot=zero,
                                verbose=verbose)
    best = best_by(rows, "precision")
    load_checkpoint(checkpoint_path(ckpt_dir, best["epoch"]), model=bundle.model)
    bundle.model.eval()
    return FinetuneResult(ev, train_set, zero, P, rows, best, history)
