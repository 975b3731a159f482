"""Benchmark: ODITS vs the CLIP it was initialised from, on the same SVT split (notebook 08).

Seed 004 Ch. 3 designs ODITS but never trains it; this script does, then measures on the test
split, for every model, the five columns of Table 2.6 (accuracy, precision, recall, F1 with the
soft counts of approach 2, and the normalised similarity entropy, the thesis's "Uniformity") plus
lexicon-50 top-1 (share of test images whose most probable lexicon word is written in them), all
through the one evaluator of notebooks 06-08 (``course_utils.clip.wordspotting.table_2_6_metrics``):

* **CLIP** — the word–image probabilities of the CLIP ODITS starts from (whole image only);
* **ODITS** — trained on the train split (shared CLIP towers frozen, new layers learnt);
* **ODITS, the seed's class-weighted loss** — the same model trained with seed 004's loss
  instead of the course's written-word mass (``odits.loss``);
* **ODITS without objects** — the ablation: same layers and training, objects switched off;
* **objects, no training** — each word scores its best-matching object: what the objects alone
  bring, without any learnt fusion.

Also: ODITS trained for a third and for twice the profile's epochs (the training-length curve),
object counts per image, the Anderson–Darling table (Table 3.3) on the training split's
counts, and wall times.  Writes ``benchmarks/results/odits_<profile>.json``.

Read the numbers honestly: in ``cpu``/``smoke`` the objects come from the course's small SAM
(``data/small_sam``, trained on SynthSVT street scenes that are neither its train nor its test
images) through the same ``SamAutomaticMaskGenerator`` as SAM ViT-B in ``full``; the small CLIP
reads 32x128 word crops well but a whole street scene squashed to 32x128 hardly at all, so
CLIP-on-the-whole-image is a weak reader there.

    python benchmarks/odits.py [--profile smoke|cpu|full] [--clip-checkpoint runs/07/epoch_005.pt]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from course_tools.report import write_result
from course_utils.clip.data import load_svt_data
from course_utils.clip.objects import anderson_table, count_statistics, format_anderson_table
from course_utils.clip.odits import set_deterministic
from course_utils.env import get_device
from course_utils.profiles import get_config, resolve_profile_name
from course_utils.recipes.odits import (
    MODEL_NAMES,
    TRAINED,
    finetune_start_clip,
    head_to_head,
    load_start_clip,
    profile_mask_source,
    row_settings,
    split_features,
    train_odits,
)
from course_utils.svt import load_svt_splits, word_spotting_vocabulary

#: what each profile's objects are, for rows and notes
OBJECTS_NAME = {"sam": "SAM ViT-B", "small_sam": "the course's small SAM",
                "boxes": "word-box (oracle)"}
TABLE_COLUMNS = ("accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1")
#: Table 3.3 of the seed: SAM objects on real SVT, H0 "exponential"
PAPER_AD_EXPON = 20.4421


def _finite(x: Any) -> Any:
    """JSON has no NaN: non-finite numbers become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None)
    ap.add_argument("--clip-checkpoint", default=None,
                    help="notebook 07's fine-tuned CLIP (default: recipes.clip_finetune.best_checkpoint_path(profile) if it exists)")
    ap.add_argument("--svt", default=None, help="a real SVT folder (train.xml, test.xml, img/)")
    ap.add_argument("--no-finetune", action="store_true",
                    help="without notebook 07's checkpoint, start from the CLIP as loaded instead of fine-tuning it here")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    profile = resolve_profile_name(args.profile)
    cfg = get_config(profile)
    oc = cfg.odits
    t_all = time.perf_counter()
    set_deterministic(oc.seed)

    if args.svt:
        splits = load_svt_splits(args.svt)
        data_line = f"SVT ({args.svt})"
    else:  # the same data notebooks 06-07 use (real SVT when cached, else SynthSVT)
        data = load_svt_data(cfg.svt, allow_download=profile == "full", verbose=False)
        splits = {"train": data.train, "test": data.test}
        data_line = (f"{'SVT' if data.real else 'SynthSVT'} ({len(data.train)} train / "
                     f"{len(data.test)} test)")
    words = word_spotting_vocabulary(list(splits.values()))
    device = get_device()
    bundle = load_start_clip(cfg.svt.clip_kind, profile, args.clip_checkpoint, device,
                             when_unavailable=cfg.runtime.weights_when_unavailable)
    t0 = time.perf_counter()
    if not bundle.info.get("finetuned") and oc.finetune_clip_if_missing and not args.no_finetune:
        finetune_start_clip(bundle, splits["train"], splits["test"], cfg.svt)
    t_finetune = time.perf_counter() - t0
    source, source_line = profile_mask_source(oc, device=device, when_unavailable=cfg.runtime.weights_when_unavailable)
    print(f"[odits] data: {data_line}; vocabulary {len(words)} words\n[odits] {bundle.weights}\n"
          f"[odits] objects: {source_line}")

    t0 = time.perf_counter()
    text_emb = bundle.encode_texts(words)
    feats = split_features(bundle, {s: splits[s] for s in ("train", "test")}, source, words, oc)
    t_features = time.perf_counter() - t0
    scale = bundle.logit_scale

    test = feats["test"]
    models, runs = {}, {}
    for name in TRAINED:
        use, settings = row_settings(oc, name)
        models[name], _, runs[name] = train_odits(bundle.model, feats["train"], words, text_emb, settings,
                                                  use_objects=use, device=device, desc=MODEL_NAMES[name])
    t0 = time.perf_counter()
    _, results = head_to_head(models, test, text_emb, scale)
    t_compare = time.perf_counter() - t0
    # training length: ODITS at a third and at twice the profile's epochs (the curve behind the choice)
    length = {}
    for epochs in sorted({max(1, oc.epochs // 3), 2 * oc.epochs} - {oc.epochs}):
        m, _, run = train_odits(bundle.model, feats["train"], words, text_emb, {**dict(oc), "epochs": epochs},
                                device=device, desc=f"ODITS, {epochs} epochs")
        length[epochs] = {**head_to_head({"odits": m}, test, text_emb, scale)[1]["odits"], "train_s": run["train_s"]}
    length[oc.epochs] = {**results["odits"], "train_s": runs["odits"]["train_s"]}
    length = {str(e): length[e] for e in sorted(length)}

    counts = {s: feats[s].counts.tolist() for s in feats}
    try:
        ad = anderson_table(counts["train"])
    except ValueError as err:  # e.g. every image has the same number of objects
        print(f"[odits] Anderson–Darling skipped: {err}")
        ad = []
    stats = {s: count_statistics(c) for s, c in counts.items()}
    wall = time.perf_counter() - t_all

    print(f"\n{'model':<22}" + "".join(f"{c:>15}" for c in TABLE_COLUMNS))
    for name, m in results.items():
        print(f"{name:<22}" + "".join(f"{m[c]:>15.4f}" for c in TABLE_COLUMNS))
    for e, m in length.items():
        print(f"{'odits, ' + e + ' epochs':<22}" + "".join(f"{m[c]:>15.4f}" for c in TABLE_COLUMNS))
    if ad:
        print("\nTable 3.3 (object counts of the train split)\n" + format_anderson_table(ad))
    print(f"\nobjects per image: {stats}\nwall: features {t_features:.1f}s, total {wall:.1f}s")

    label = {"clip": "CLIP (init of ODITS)", "odits": "ODITS", "odits_no_objects": "ODITS without objects",
             "odits_seed_loss": "ODITS, the seed's class-weighted loss",
             "objects_no_training": "objects, no training (max over objects)"}
    if bundle.info.get("random_init"):  # no shipped weights yet: say it in the table
        label = {k: v + " [random CLIP]" for k, v in label.items()}
    rows = [{"notebook": "08", "experiment": f"{label[n]}, {data_line.split(' (')[0]} test", "metric": c,
             "ours": round(results[n][c], 4), "paper": None}
            for n in ("clip", "odits", "odits_no_objects", "objects_no_training")
            for c in ("precision", "f1", "lexicon50_top1")]
    rows += [{"notebook": "08", "experiment": f"{label['odits_seed_loss']}, {data_line.split(' (')[0]} test",
              "metric": c, "ours": round(results["odits_seed_loss"][c], 4), "paper": None}
             for c in ("f1", "lexicon50_top1")]
    rows += [{"notebook": "08", "experiment": f"ODITS trained {e} epochs (profile: {oc.epochs}), "
              f"{data_line.split(' (')[0]} test", "metric": "f1", "ours": round(m["f1"], 4), "paper": None}
             for e, m in length.items() if e != str(oc.epochs)]
    for r in ad:
        rows.append({"notebook": "08", "experiment": f"object counts, Anderson–Darling H0 {r['distribution']} "
                     f"({OBJECTS_NAME[oc.mask_source]} objects; paper: SAM on SVT)",
                     "metric": "A² statistic", "ours": round(r["statistic"], 4),
                     "paper": PAPER_AD_EXPON if r["distribution"] == "exponential" else None})
    metrics = _finite({
        "models": results, "runs": runs, "training_length": length, "anderson_darling": ad, "object_counts": counts,
        "object_count_stats": stats,
        "wall_s": {"finetune_clip": t_finetune, "features": t_features, "compare": t_compare, "total": wall,
                   **{f"train_{k}": v["train_s"] for k, v in runs.items()}},
    })
    extra = {"data": data_line, "weights": bundle.weights, "objects": source_line, "vocabulary": len(words),
             "n_train": len(feats["train"]), "n_test": len(test), "settings": dict(oc),
             "note": (f"objects: {OBJECTS_NAME[oc.mask_source]}; the small CLIP sees a whole scene squashed to "
                      "32x128, so whole-image CLIP reads it poorly")}
    path = write_result(f"odits_{profile}", profile=profile, metrics=metrics, paper={"anderson_darling_expon": PAPER_AD_EXPON},
                        rows=_finite(rows), extra=extra,
                        results_dir=Path(args.results_dir) if args.results_dir else None)
    print(f"[odits] wrote {path}")
    return metrics


if __name__ == "__main__":
    main()
