"""Notebook 05's ablation of the query-agnostic model (seed 001's claim that it is as accurate as SCAN).

One knob of :func:`~course_utils.recipes.retrieval.run_query_agnostic` changed per row
(:func:`qa_ablation_rows`), every row trained and evaluated by :func:`run_qa_ablation`, each in its
own cached run folder.  Notebook 05 shows the table; ``benchmarks/retrieval.py`` saves it.
"""

from __future__ import annotations

import time

import torch

from ..cache import run_dir
from .retrieval import QA_LOSSES, RetrievalData, query_agnostic_knobs, run_query_agnostic

__all__ = ["qa_ablation_rows", "run_qa_ablation"]


def qa_ablation_rows(cfg: dict) -> list[dict]:
    """Notebook 05's ablation of the query-agnostic model: one knob changed per row.

    Sizes follow the profile (training length at 1/3, 2/3 and 4/3 of ``qa_epochs``, twice
    ``embed_dim``, twice ``qa_heads``); the other rows flip a switch: the object
    prior's ``alpha``, a second decoder block, the pre-norm FFN, SCAN's triplet losses, the other
    caption tower of :data:`~course_utils.query_agnostic.TEXT_TOWERS`, whole captions.  Returns ``[{"group", "label", "knobs" (overrides of cfg), "text_level"}]``, the
    profile's own model first.
    """
    e, d, h = int(cfg["qa_epochs"]), int(cfg["embed_dim"]), int(cfg["qa_heads"])
    rows = [("this notebook's model", "as trained in section 3", {}, "fine")]
    rows += [("training length", f"{n} epochs (of {e})", {"qa_epochs": n}, "fine")
             for n in sorted({max(1, e // 3), max(1, 2 * e // 3), 4 * e // 3} - {e})]
    rows += [("region count and alpha", f"alpha = {a} (of {cfg['qa_alpha']})", {"qa_alpha": a}, "fine")
             for a in (0.05, 0.1) if a != float(cfg["qa_alpha"])]
    rows += [("decoder", "two decoder blocks", {"qa_layers": 2}, "fine"),
             ("decoder", "FFN(LN(Y)) (pre-norm) instead of the poster's FFN(Y)",
              {"qa_ffn_norm": not cfg["qa_ffn_norm"]}, "fine")]
    rows += [("decoder", f"{2 * h} attention heads (of {h})", {"qa_heads": 2 * h}, "fine")]
    rows += [("embedding size", f"d = {2 * d} (of {d})", {"embed_dim": 2 * d}, "fine")]
    rows += [("loss", {"infonce": "InfoNCE (the poster's contrastive loss)",
                       "triplet-hardest": "triplet, hardest negative (VSE++, SCAN's)",
                       "triplet-sum": "triplet, every negative"}[lo], {"qa_loss": lo}, "fine")
             for lo in QA_LOSSES if lo != cfg["qa_loss"]]
    other = {"conv": "bigru", "bigru": "conv"}[cfg["qa_text_tower"]]
    rows += [("text tower", {"bigru": "SCAN's bi-GRU instead of the word convolution",
                             "conv": "a word convolution instead of SCAN's bi-GRU"}[other], {"qa_text_tower": other}, "fine"),
             ("text tower", "whole captions instead of noun phrases", {}, "coarse")]
    return [{"group": g, "label": lab, "knobs": k, "text_level": t} for g, lab, k, t in rows]


def run_qa_ablation(data: RetrievalData, cfg: dict, *, seed: int = 0, source_knobs: dict | None = None,
                    rows: list[dict] | None = None, device: str | torch.device | None = None,
                    progress: bool = True) -> list[dict]:
    """Train (or load from the cache) every row of :func:`qa_ablation_rows` and evaluate it on test.

    Each row's checkpoints sit in ``run_dir("05_query_agnostic", query_agnostic_knobs(row's cfg))``,
    so the first row is the notebook's own model and a second run only evaluates.
    Returns one dict per row: the row, its R@K, ``"kept"`` (regions per test image) and ``"train_s"``
    (0 when it came from the cache).
    """
    out = []
    rows = qa_ablation_rows(cfg) if rows is None else rows
    for i, row in enumerate(rows):
        rcfg = {**cfg, **row["knobs"]}
        root = run_dir("05_query_agnostic", query_agnostic_knobs(rcfg, seed, source_knobs))
        t = time.perf_counter()
        res = run_query_agnostic(data, rcfg, text_level=row["text_level"], seed=seed, ckpt_dir=root,
                                 progress=False, device=device)
        keep = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
        out.append({**row, **{k: float(res[k]) for k in keep}, "kept": res["kept"],
                    "train_s": round(res["train_s"], 1)})
        if progress:
            print(f"[ablation {i + 1}/{len(rows)}] {row['group']}: {row['label']}: image R@1 "
                  f"{res['t2i_r1']:.1f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out
