"""Train a course recipe from the command line: one process, or several under ``torchrun``.

::

    python -m course_utils.cli detector --profile cpu
    torchrun --standalone --nproc_per_node=2 -m course_utils.cli clip-finetune --profile full --resume
    python -m course_utils.cli --help          # the recipes and their profile knobs

Each recipe calls the functions its notebook and its benchmark call, with the same seed, and
writes its checkpoints where the notebook looks for them (``run_dir`` of the same knobs): a
notebook run afterwards finds the finished run and loads it instead of training.  Under
``torchrun`` every rank trains its share of each global batch (:func:`course_utils.train.fit`),
rank 0 alone prints and writes, and a rank that fails stops the others with one clear error.

Each recipe imports its own stack when it runs (the ``# lazy`` imports): importing every recipe's
models and data (open_clip, segment-anything...) takes several seconds that ``--help`` and the
other recipes would pay.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .cache import run_dir
from .checkpoints import list_checkpoints
from .profiles import Section, get_config
from .tracking import tracking_to

__all__ = ["RECIPES", "Recipe", "main"]


@dataclass(frozen=True)
class Recipe:
    """One trainable recipe: what it runs, which notebook it stands for, which knobs size it."""

    run: Callable[[Any, argparse.Namespace, torch.device], None]
    notebook: str
    summary: str
    knobs: tuple[str, ...]


def _detector(cfg, args: argparse.Namespace, device: torch.device) -> None:
    from .recipes import detection  # lazy
    from .shapes import build_shapes  # lazy

    with distributed.main_process_first():  # rank 0 writes the scenes' cache, the others read it
        splits = build_shapes(cfg.shapes, seed=args.seed, cache=distributed.is_main_process())
    ckpt = run_dir(f"03_detector_{cfg.name}", detection.detector_knobs(cfg, args.seed))
    _say(f"checkpoints: {ckpt}")
    detection.train_detector(cfg, splits, ckpt_dir=ckpt, device=device, seed=args.seed,
                             resume=args.resume, progress=_progress())


def _retrieval_inputs(cfg, args: argparse.Namespace, device: torch.device):
    from .recipes.retrieval_data import load_retrieval_inputs  # lazy

    with distributed.main_process_first():  # rank 0 trains and caches the region features
        data, source = load_retrieval_inputs(cfg.retrieval, seed=args.seed, device=device, progress=_progress())
    # a log must say which data ran; the loader says it only with progress on (or when data it
    # looked for is absent)
    if not _progress() and not (source.synthetic and cfg.retrieval.real_data):
        _say(source.message)
    return data, source


def _scan(cfg, args: argparse.Namespace, device: torch.device) -> None:
    from .recipes import retrieval  # lazy

    data, source = _retrieval_inputs(cfg, args, device)
    R = cfg.retrieval
    root = run_dir("04_scan_grid", retrieval.scan_grid_knobs(R, args.seed, source.knobs))
    _say(f"checkpoints: {root}")
    rows = [row for row, *_ in retrieval.TABLE_4_1]
    for level in args.level or ("coarse", "fine"):
        for row in args.variant or rows:
            _fresh(root, level, row, args)
            res = retrieval.run_variant(data, level, row, R, seed=args.seed, ckpt_root=root, device=device,
                                        progress=_progress())
            _say(f"{level:6s} {row:30s} t2i R@1 {res['t2i_r1']:5.1f}  rsum {res['rsum']:5.1f}")


def _fresh(root: Path, level: str, row: str, args: argparse.Namespace) -> None:
    """Without ``--resume``, a SCAN variant starts over: its old checkpoints are removed (by rank 0)."""
    from .recipes import retrieval  # lazy

    if args.resume:
        return
    direction, agg, bi = next((d, a, b) for r, d, a, b in retrieval.TABLE_4_1 if r == row)
    folder = Path(root) / f"{level}_{direction}_{agg}_{'bi' if bi else 'uni'}"
    if distributed.is_main_process():
        for p in list_checkpoints(folder).values():
            p.unlink(missing_ok=True)
    distributed.barrier()


def _query_agnostic(cfg, args: argparse.Namespace, device: torch.device) -> None:
    from .recipes import retrieval  # lazy

    data, source = _retrieval_inputs(cfg, args, device)
    R = cfg.retrieval
    root = run_dir("05_query_agnostic", retrieval.query_agnostic_knobs(R, args.seed, source.knobs))
    _say(f"checkpoints: {root}")
    for level in args.level or ("fine", "coarse"):
        if not args.resume and distributed.is_main_process():
            for p in list_checkpoints(root / level).values():
                p.unlink(missing_ok=True)
        distributed.barrier()
        res = retrieval.run_query_agnostic(data, R, text_level=level, seed=args.seed, ckpt_dir=root,
                                           device=device, progress=_progress())
        _say(f"query-agnostic ({level}) t2i R@1 {res['t2i_r1']:5.1f}  rsum {res['rsum']:5.1f}")


def _clip_finetune(cfg, args: argparse.Namespace, device: torch.device) -> None:
    from .clip.data import load_svt_data  # lazy
    from .clip.loading import load_clip  # lazy
    from .recipes.clip_finetune import (  # lazy
        best_checkpoint_path,
        finetune_and_select,
        finetune_knobs,
    )

    S = cfg.svt
    with distributed.main_process_first():  # a download or an unpacked archive: rank 0 first
        data = load_svt_data(S, allow_download=S.download_svt, verbose=distributed.is_main_process())
    bundle = load_clip(S.clip_kind, device=device, when_unavailable=cfg.runtime.weights_when_unavailable,
                       verbose=distributed.is_main_process())
    ckpt = run_dir(f"07_clip_svt_{cfg.name}", finetune_knobs(bundle, S, data.train))
    _say(f"checkpoints: {ckpt}")
    # notebook 07's steps: Algorithm 1, Table 2.6 for every kept checkpoint, the best by precision
    res = finetune_and_select(bundle, data.train, data.test, S, ckpt, seed=args.seed, resume=args.resume,
                              progress=_progress(), verbose=distributed.is_main_process())
    best = best_checkpoint_path(cfg.name)
    if distributed.is_main_process():  # where notebook 08 and the odits recipe start from
        best.parent.mkdir(parents=True, exist_ok=True)
        torch.save(bundle.model.state_dict(), best)
    _say(f"best checkpoint by precision: +{res.best['epoch']} (precision {res.zero_shot['precision']:.4f} -> "
         f"{res.best['precision']:.4f}); its weights: {best}")


def _odits(cfg, args: argparse.Namespace, device: torch.device) -> None:
    from .clip.data import load_svt_data  # lazy
    from .recipes.odits import (  # lazy
        MODEL_NAMES,
        TRAINED,
        load_start_clip,
        odits_knobs,
        profile_mask_source,
        row_settings,
        split_features,
        train_odits,
    )
    from .svt import word_spotting_vocabulary  # lazy

    S, OC = cfg.svt, Section({**cfg.odits, "seed": args.seed})
    main = distributed.is_main_process()
    with distributed.main_process_first():
        data = load_svt_data(S, allow_download=S.download_svt, verbose=main)
    words = word_spotting_vocabulary([data.train, data.test])
    bundle = load_start_clip(S.clip_kind, cfg.name, device=device,
                             when_unavailable=cfg.runtime.weights_when_unavailable)
    if not bundle.info.get("finetuned"):
        _say("notebook 07's checkpoint is missing: ODITS starts from the CLIP as loaded "
             "(run the clip-finetune recipe first to start from it)")
    text_emb = bundle.encode_texts(words)
    source, line = profile_mask_source(OC, device=device, when_unavailable=cfg.runtime.weights_when_unavailable)
    _say(f"objects: {line}")
    feats = split_features(bundle, {"train": data.train}, source, words, OC, progress=_progress())["train"]
    for key in TRAINED:  # the rows notebook 08 trains, under the same checkpoint names
        use, settings = row_settings(OC, key)
        ckpt = run_dir("08_odits", odits_knobs(bundle.model, feats, words, settings, use))
        _say(f"checkpoints: {ckpt}")
        train_odits(bundle.model, feats, words, text_emb, settings, use_objects=use, device=device,
                    progress=_progress(), ckpt_dir=ckpt, resume=args.resume, desc=MODEL_NAMES[key])


RECIPES: dict[str, Recipe] = {
    "detector": Recipe(_detector, "03", "the semantic detector (RPN + alignment, §3.6)",
                       ("shapes.*", "anchors.*", "rpn.*", "detector.epochs", "detector.batch_size",
                        "detector.optimizer", "detector.lr")),
    "scan": Recipe(_scan, "04", "the SCAN variants of Table 4.1 (--level, --variant pick some)",
                   ("retrieval.n_train", "retrieval.epochs", "retrieval.batch_size", "retrieval.lr",
                    "retrieval.embed_dim", "retrieval.real_data")),
    "query-agnostic": Recipe(_query_agnostic, "05", "the query-agnostic retriever (noun phrases, then captions)",
                             ("retrieval.qa_epochs", "retrieval.qa_lr", "retrieval.qa_heads", "retrieval.qa_layers",
                              "retrieval.qa_ffn_norm", "retrieval.qa_loss", "retrieval.batch_size",
                              "retrieval.real_data")),
    "clip-finetune": Recipe(_clip_finetune, "07", "CLIP fine-tuned on SVT (Algorithm 1), the best checkpoint kept",
                            ("svt.clip_kind", "svt.n_train", "svt.ft_epochs", "svt.ft_batch_size", "svt.ft_lr",
                             "svt.ft_checkpoints")),
    "odits": Recipe(_odits, "08", "ODITS and its no-object ablation, from notebook 07's CLIP",
                    ("odits.mask_source", "odits.epochs", "odits.batch_size", "odits.lr", "odits.freeze_clip")),
}


def _say(line: str) -> None:
    if distributed.is_main_process():
        print(line, flush=True)


def _progress() -> bool:
    return distributed.is_main_process() and sys.stderr.isatty()


def _knob_values(knob: str) -> str:
    """``section.key`` with its value in the cpu and full profiles, e.g. ``detector.epochs (cpu 18, full 20)``."""

    section, _, key = knob.partition(".")
    if key == "*":
        return knob
    values = [f"{p} {get_config(p)[section][key]}" for p in ("cpu", "full")]
    return f"{knob} ({', '.join(values)})"


def _epilog() -> str:
    lines = ["recipes (notebook: what it trains; profile knobs that size it, with their cpu and full values):"]
    for name, r in RECIPES.items():
        lines.append(f"  {name:15s} notebook {r.notebook}: {r.summary}")
        lines += textwrap.wrap("knobs: " + "; ".join(_knob_values(k) for k in r.knobs), 96,
                               initial_indent=" " * 18, subsequent_indent=" " * 25)
    lines += ["", "Several processes: torchrun --standalone --nproc_per_node=N -m course_utils.cli RECIPE ...",
              "(each global batch is split over the N processes; NCCL on GPUs, gloo on CPUs).",
              "COURSE_DIST_TIMEOUT (seconds, default 300) bounds every wait for another process."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (``--help`` lists the recipes)."""
    p = argparse.ArgumentParser(prog="python -m course_utils.cli", description=__doc__.split("\n")[0],
                                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=sorted(RECIPES), help="what to train")
    p.add_argument("--profile", default=os.environ.get("COURSE_PROFILE", "auto"),
                   help="smoke, cpu, full, fullpath or auto (default: $COURSE_PROFILE, else auto)")
    p.add_argument("--seed", type=int, default=0, help="the notebooks' SEED (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint (default: train from the start)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: a GPU if there is one)")
    p.add_argument("--track", metavar="DIR", default=None,
                   help="also log every training run to TensorBoard event files under DIR")
    p.add_argument("--level", action="append", choices=("coarse", "fine"), help="scan / query-agnostic: text level(s)")
    p.add_argument("--variant", action="append", metavar="ROW", help="scan: a row of Table 4.1, e.g. 't-i LSE'")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one recipe; returns the process's exit code (0 ok, 1 the recipe failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.variant:
        from .recipes.retrieval import TABLE_4_1  # lazy

        rows = [row for row, *_ in TABLE_4_1]
        if args.recipe != "scan" or set(args.variant) - set(rows):
            parser.error(f"--variant {args.variant}: only for scan, one of {rows}")
    os.environ["COURSE_PROFILE"] = args.profile  # every get_config() of this process sees it

    main_rank, ok = True, False
    try:
        cfg = get_config(args.profile)
        device = distributed.init_from_env(args.device)
        main_rank = distributed.is_main_process()
        if not main_rank:  # the recipes print as the notebooks do: once is enough (errors still show)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
        _say(f"{args.recipe}: profile {cfg.name}, {distributed.world_size()} process(es), device {device}")
        with distributed.peer_failures_named(args.recipe), tracking_to(args.track):
            RECIPES[args.recipe].run(cfg, args, device)
        ok = True
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one line per rank, then exit 1
        print(f"[rank {distributed.rank()}] {args.recipe} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.shutdown(wait_for_peers=ok)
    if main_rank:
        print(f"{args.recipe}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
