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
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import cache_root, knobs_hash
from ..checkpoints import checkpoint_path, load_checkpoint
from ..clip.evaluation import EvalSet, build_eval_set, evaluate_word_spotting
from ..clip.finetune import WordCropDataset, checkpoint_epochs, finetune, pair_dataset
from ..clip.loading import ClipBundle
from ..clip.small import file_sha256
from ..clip.wordspotting import TABLE_COLUMNS
from ..env import seed_everything
from ..history import History
from ..svt import SVTSplit

__all__ = [
    "FinetuneResult",
    "ablation_summary",
    "best_by",
    "best_checkpoint_path",
    "evaluate_checkpoints",
    "finetune_and_select",
    "finetune_knobs",
    "ft_ablation_rows",
    "run_ft_ablation",
    "save_table",
    "split_fingerprint",
]


def split_fingerprint(split: SVTSplit) -> str:
    """12 hex digits of the sha256 of a split's XML file and of every image file it names, in
    order: a regenerated SynthSVT (another renderer, another seed) or another copy of SVT gives
    another fingerprint, the same files the same one."""
    if not isinstance(split, SVTSplit):
        raise ValueError(f"split: expected an SVTSplit, got {type(split).__name__}")
    files = [file_sha256(split.xml_path)] + [[im.image_name, file_sha256(im.path)] for im in split]
    return knobs_hash(files, length=12)


def finetune_knobs(bundle: ClipBundle, svt_cfg: Mapping[str, Any], train: SVTSplit) -> dict[str, Any]:
    """What a fine-tuning run depends on, for :func:`course_utils.cache.run_dir`: the starting
    weights (sha256 prefix, pretrained tag, or ``random``), the training split's files
    (:func:`split_fingerprint`) and every ``ft_*`` training setting (not ``ft_ablation_live``,
    which says how many ablation rows a notebook trains), so a run never resumes from
    checkpoints that grew out of other weights, other data or other settings."""
    start = "random" if bundle.info.get("random_init") else (
        bundle.info.get("sha256", "")[:12] or str(bundle.info.get("pretrained", "openai")))
    return {"kind": bundle.kind, "start": start, "train": split_fingerprint(train),
            "ft": {k: v for k, v in sorted(dict(svt_cfg).items())
                   if k.startswith("ft_") and k != "ft_ablation_live"}}


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


def ft_ablation_rows(svt_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Notebook 07's ablation of fine-tuning: one knob of the profile's ``svt`` section per row.

    The temperature frozen at its zero-shot value (``ft_logit_scale_lr = 0``: only the embeddings
    can then move precision); four times the learning rate, with the temperature learnt and
    frozen; and each of the profile's departures from Table 2.5 undone (weight decay 0.2, one cut
    per word instead of ``ft_crop_pads``).  Returns ``[{"group", "label", "knobs"}]`` (``knobs``:
    overrides of ``svt_cfg``), the profile's own run first; rows that would repeat it are left out.
    """
    lr, tau_lr = float(svt_cfg["ft_lr"]), float(svt_cfg["ft_logit_scale_lr"])
    rows = [("this notebook's run", "the profile's settings (section 4)", {})]
    if tau_lr != 0:
        rows.append(("temperature", "1/τ frozen at its zero-shot value", {"ft_logit_scale_lr": 0.0}))
    rows.append(("learning rate", f"{4 * lr:g} (4×), 1/τ learnt" if tau_lr else f"{4 * lr:g} (4×)",
                 {"ft_lr": 4 * lr}))
    if tau_lr != 0:
        rows.append(("learning rate", f"{4 * lr:g} (4×), 1/τ frozen", {"ft_lr": 4 * lr, "ft_logit_scale_lr": 0.0}))
    if float(svt_cfg["ft_weight_decay"]) != 0.2:
        rows.append(("Table 2.5", "weight decay 0.2 (Table 2.5's)", {"ft_weight_decay": 0.2}))
    if tuple(svt_cfg["ft_crop_pads"]) != (0.0,):
        rows.append(("Table 2.5", "one cut per word (no extra paddings)", {"ft_crop_pads": (0.0,)}))
    return [{"group": g, "label": lab, "knobs": k} for g, lab, k in rows]


def ablation_summary(row: Mapping[str, Any], zero_shot: Mapping[str, Any], best: Mapping[str, Any],
                     train_s: float) -> dict[str, Any]:
    """One ablation row's numbers from its zero-shot row and the checkpoint chosen by precision
    (``best``, a row of :func:`evaluate_checkpoints` with ``precision_at_zero_shot_scale``):
    ``best_epoch``, precision at the learnt and at the zero-shot temperature and both relative
    gains, lexicon-50 top-1 and its change (a fraction), ``logit_scale``, and ``train_s``
    (seconds for zero-shot, fine-tuning and every checkpoint's evaluation)."""
    missing = {"epoch", "precision", "precision_at_zero_shot_scale", "lexicon50_top1", "logit_scale"} - set(best)
    if missing or "precision" not in zero_shot or "lexicon50_top1" not in zero_shot:
        raise ValueError(f"ablation_summary: best row lacks {sorted(missing)} or zero_shot lacks precision / "
                         "lexicon50_top1 (pass zero_shot= to evaluate_checkpoints)")
    z, b = zero_shot, best
    p0 = z["precision"]
    return {**dict(row), "knobs": {k: list(v) if isinstance(v, tuple) else v for k, v in row["knobs"].items()},
            "best_epoch": int(b["epoch"]), "precision": b["precision"],
            "precision_at_zero_shot_scale": b["precision_at_zero_shot_scale"],
            "precision_gain": b["precision"] / p0 - 1 if p0 else math.nan,
            "precision_gain_at_zero_shot_temperature": b["precision_at_zero_shot_scale"] / p0 - 1 if p0 else math.nan,
            "lexicon50_top1": b["lexicon50_top1"], "lexicon50_change": b["lexicon50_top1"] - z["lexicon50_top1"],
            "logit_scale": b["logit_scale"], "train_s": round(float(train_s), 1)}


def run_ft_ablation(load_bundle: Callable[[], ClipBundle], train: SVTSplit, test: SVTSplit,
                    svt_cfg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, seed: int = 0,
                    verbose: bool = True) -> list[dict[str, Any]]:
    """Fine-tune a fresh model for every row of :func:`ft_ablation_rows` and summarise it.

    Args:
        load_bundle: returns the starting CLIP, fresh on each call (each row starts from the
            same pretrained weights).
        train, test: the SVT splits.
        svt_cfg: the profile's ``svt`` section; each row's ``knobs`` override it.
        rows: the rows to run (a prefix of :func:`ft_ablation_rows`, or all of it).
        seed: every row's seed (set before it loads its model, so rows differ only in their knob).

    Returns:
        one :func:`ablation_summary` per row.  Each row runs in a temporary folder (one complete
        run, no resume), as ``benchmarks/clip_svt.py`` does.
    """
    for i, row in enumerate(rows):  # every row checked before the first one trains
        if not isinstance(row.get("knobs"), Mapping) or not set(row["knobs"]) <= set(svt_cfg):
            raise ValueError(f"ablation row {i} ({row.get('label')!r}): knobs must override keys of the svt "
                             f"section, got {row.get('knobs')!r}")
    out = []
    for i, row in enumerate(rows):
        cfg = {**dict(svt_cfg), **row["knobs"]}
        t0 = time.perf_counter()
        seed_everything(seed)
        bundle = load_bundle()
        with tempfile.TemporaryDirectory() as tmp:
            res = finetune_and_select(bundle, train, test, cfg, Path(tmp) / "run", seed=seed)
        out.append(ablation_summary(row, res.zero_shot, res.best, time.perf_counter() - t0))
        if verbose:
            r = out[-1]
            print(f"[ablation {i + 1}/{len(rows)}] {row['group']}: {row['label']}  best +{r['best_epoch']}  "
                  f"precision {r['precision_gain']:+.1%} (at the zero-shot 1/τ {r['precision_gain_at_zero_shot_temperature']:+.1%})"
                  f"  lexicon-50 {r['lexicon50_top1']:.1%} ({r['lexicon50_change'] * 100:+.1f} points)  {r['train_s']:.0f}s",
                  flush=True)
    return out
