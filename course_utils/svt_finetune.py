"""Word spotting on SVT with CLIP: data, evaluation (Table 2.6) and fine-tuning (Algorithm 1).

Notebooks 06-07 (seed 004 §2.1-2.4).  This module glues together :mod:`course_utils.svt`
(the records), :mod:`course_utils.synthsvt` (the offline stand-in), :mod:`course_utils.clip_svt`
(models and metrics) and :func:`course_utils.train.fit` (the shared loop):

* :func:`load_svt_data` — real SVT when it is in the cache (or downloadable in ``full``),
  else SynthSVT, with one line saying which;
* :func:`load_model` — the profile's CLIP, or a randomly initialised small CLIP (said loudly)
  while ``data/small_clip/`` does not exist yet;
* :class:`EvalSet` / :func:`evaluate` — the word-image probability matrix ``P`` over the test
  vocabulary and the five columns of Table 2.6 plus lexicon-50 top-1 accuracy;
* :func:`pair_dataset`, :func:`training_step`, :func:`make_optimizer`, :func:`finetune` —
  Algorithm 1 with the Table 2.5 hyper-parameters and checkpoints kept at the thesis's epochs;
* :func:`evaluate_checkpoints`, :func:`best_by` — Table 2.6 for every kept checkpoint and the
  checkpoint chosen by precision.

What a "row" of ``P`` is.  The thesis feeds whole street images to ViT-B/32 (224 px); a row is
an image and its positives ``W_i^+`` are the image's 50-word lexicon.  The course's small CLIP
reads 32x128 word crops, on which a whole 480x360 scene is illegible, so with the small model a
row is one word crop and its positives are the lexicon of the image it was cut from.  The unit
follows the model (:func:`eval_unit`), never the profile.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import clip_svt as cs
from . import registry
from .svt import SVTSplit, load_svt
from .synthsvt import make_synthsvt_for_profile

__all__ = [
    "SVTData",
    "load_svt_data",
    "load_model",
    "eval_unit",
    "split_pairs",
    "EvalSet",
    "build_eval_set",
    "evaluate",
    "pair_dataset",
    "training_step",
    "make_optimizer",
    "checkpoint_epochs",
    "finetune",
    "evaluate_checkpoints",
    "best_by",
    "pretraining_overlap",
    "TABLE_2_6",
    "TABLE_COLUMNS",
    "run_dir",
    "best_checkpoint_path",
    "save_table",
    "embed",
]

#: Table 2.6 of seed 004: ViT-B/32 on real SVT, zero-shot (epoch 0) and after fine-tuning for
#: the given number of epochs.  "Uniformity" is the normalised similarity entropy (Eq. 2.3.15).
TABLE_2_6: dict[int, dict[str, float]] = {
    0: dict(accuracy=0.986354, precision=0.192545, recall=0.041989, f1=0.064774, entropy=0.335908),
    1: dict(accuracy=0.989814, precision=0.234369, recall=0.036764, f1=0.060481, entropy=0.250820),
    2: dict(accuracy=0.989699, precision=0.252353, recall=0.037998, f1=0.060288, entropy=0.240897),
    3: dict(accuracy=0.989755, precision=0.276059, recall=0.039749, f1=0.062460, entropy=0.250511),
    4: dict(accuracy=0.989400, precision=0.275336, recall=0.040184, f1=0.062257, entropy=0.264263),
    5: dict(accuracy=0.989430, precision=0.275841, recall=0.042163, f1=0.064984, entropy=0.283437),
    7: dict(accuracy=0.989304, precision=0.264843, recall=0.040815, f1=0.061682, entropy=0.270127),
    20: dict(accuracy=0.989431, precision=0.293133, recall=0.042821, f1=0.065624, entropy=0.291966),
    40: dict(accuracy=0.988204, precision=0.245166, recall=0.046244, f1=0.063810, entropy=0.322949),
}

#: the columns of our Table 2.6: the thesis's five plus lexicon-50 top-1 accuracy
TABLE_COLUMNS = ("accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass
class SVTData:
    """Both splits and a line saying where they came from.

    Attributes:
        train, test: the splits (cut to the profile's ``n_train`` / ``n_test`` images).
        root: the folder with ``train.xml``, ``test.xml`` and ``img/``.
        real: True for the real SVT, False for SynthSVT.
        source: one human-readable line (printed by :func:`load_svt_data`).
    """

    train: SVTSplit
    test: SVTSplit
    root: Path
    real: bool
    source: str


def _extract_svt(zip_path: Path) -> Path:
    """Unpack the real SVT archive next to itself once; return the folder holding ``train.xml``."""
    out = zip_path.parent / "svt"
    marker = out / ".extracted"
    if not marker.is_file():
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(out)
        marker.write_text(zip_path.name)
    hits = sorted(out.rglob("train.xml"))
    if not hits:
        raise FileNotFoundError(f"{zip_path}: no train.xml inside the archive (expected svt1/train.xml)")
    return hits[0].parent


def load_svt_data(svt_cfg: dict, *, allow_download: bool = False, verbose: bool = True) -> SVTData:
    """The SVT splits a notebook works on: real SVT if available, SynthSVT otherwise.

    Args:
        svt_cfg: the profile's ``svt`` section (``n_train``, ``n_test``, ``image_size``, ``seed``,
            ``lexicon_size``, ``max_words``).
        allow_download: try to download the real archive (``full`` on Colab); otherwise only a
            copy already in the course cache is used, so an offline machine never waits.
        verbose: print the source line and each split's counts.

    Returns:
        an :class:`SVTData`; the first ``n_train`` / ``n_test`` images of each split are kept.
    """
    entry = registry.get_entry("svt")
    zip_path: Path | None = None
    reason = ""
    if allow_download:
        try:
            zip_path = registry.fetch("svt")
        except registry.RegistryError as err:
            reason = err.reason
    else:
        cached = entry.cached_path()
        if cached.is_file():
            zip_path = cached
        else:
            reason = f"not in the cache at {cached}"
    if zip_path is not None:
        root, real = _extract_svt(zip_path), True
        source = f"data: real SVT from {zip_path}"
    else:
        root = registry.cache_dir() / "synthsvt" / (
            f"synthsvt_{svt_cfg['n_train']}_{svt_cfg['n_test']}_{svt_cfg['image_size'][0]}x"
            f"{svt_cfg['image_size'][1]}_seed{svt_cfg['seed']}")
        make_synthsvt_for_profile(root, svt_cfg)
        real = False
        source = (f"data: SynthSVT (real SVT unavailable: {reason}), {svt_cfg['n_train']} train / "
                  f"{svt_cfg['n_test']} test synthetic street images, seed {svt_cfg['seed']}, in {root}")
    train, test = load_svt(root, "train"), load_svt(root, "test")
    train.images = train.images[: svt_cfg["n_train"]]
    test.images = test.images[: svt_cfg["n_test"]]
    if verbose:
        print(source)
        train.summary()
        test.summary()
    return SVTData(train, test, root, real, source)


def load_model(kind: str, *, device: str | torch.device | None = None,
               weights_dir: str | Path | None = None) -> cs.ClipBundle:
    """:func:`course_utils.clip_svt.load_clip`, or a random small CLIP when no weights exist.

    A missing ``data/small_clip/small_clip.safetensors`` (before ``tools/pretrain_small_clip.py``
    has run) is not an error here: the course must still run end to end, so a randomly
    initialised small CLIP is used and its ``weights`` line says so in capitals.
    """
    try:
        return cs.load_clip(kind, device=device, weights_dir=weights_dir)
    except FileNotFoundError as err:
        model = cs.build_small_clip(seed=0, zero_token_embedding=False).to(torch.device(device or "cpu")).eval()
        line = ("weights: RANDOMLY INITIALISED small CLIP (no trained weights: "
                f"{str(err).split(':')[0]} is missing) - the numbers below mean nothing")
        print(line)
        return cs.ClipBundle(model, cs.small_clip_preprocess, cs._small_tokenizer(), "small", line,
                             {"random_init": True})


def eval_unit(bundle: cs.ClipBundle) -> str:
    """``"image"`` for ViT-B/32 (the thesis feeds whole images), ``"crop"`` for the small CLIP."""
    return "image" if bundle.kind == "full" else "crop"


def split_pairs(split: SVTSplit, unit: str) -> tuple[list[Image.Image], list[str], list[list[str]]]:
    """One row per word crop (``unit="crop"``) or per image (``unit="image"``).

    Returns:
        ``(images, words, lexicons)``: the PIL images, the tagged word of each row (for an image,
        its first tag) and the lexicon of each row's image.
    """
    if unit == "crop":
        crops = split.word_crops()
        return [c for c, _, _ in crops], [t for _, t, _ in crops], [r.lexicon for _, _, r in crops]
    if unit == "image":
        rows = [im for im in split if im.words]
        return [im.load() for im in rows], [im.words[0].tag for im in rows], [im.lexicon for im in rows]
    raise ValueError(f"unit={unit!r}, expected 'crop' or 'image'")


# ---------------------------------------------------------------------------------------------
# evaluation (§2.2-2.3, Table 2.6)
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """What evaluating one model on the test split needs, prepared once.

    Attributes:
        x: preprocessed rows, ``(n_rows, 3, H, W)``.
        words: the true word of each row (crop tag, or the image's first tag).
        lexicons: each row's 50-word lexicon.
        vocabulary: the columns of ``P``: the union of the split's lexicons (the thesis's
            ``n = 4282`` evaluation words).
        tokens: tokenised ``vocabulary``, ``(n_words, context_length)``.
        Y: ``(n_rows, n_words)`` bool, ``Y[i, j]`` = word ``j`` is in row ``i``'s lexicon
            (the thesis's ``W_i^+``).
        unit: ``"crop"`` or ``"image"``.
    """

    x: torch.Tensor
    words: list[str]
    lexicons: list[list[str]]
    vocabulary: list[str]
    tokens: torch.Tensor
    Y: torch.Tensor
    unit: str
    target_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __post_init__(self) -> None:
        index = {w: j for j, w in enumerate(self.vocabulary)}
        self.target_index = torch.tensor([index[w] for w in self.words], dtype=torch.long)


def build_eval_set(split: SVTSplit, bundle: cs.ClipBundle, unit: str | None = None) -> EvalSet:
    """Preprocess ``split`` for :func:`evaluate` (rows as :func:`split_pairs`, columns its vocabulary)."""
    unit = unit or eval_unit(bundle)
    images, words, lexicons = split_pairs(split, unit)
    if not images:
        raise ValueError(f"SVT split {split.name!r}: no tagged words to evaluate on")
    vocabulary = split.vocabulary()
    x = torch.stack([bundle.preprocess(im) for im in images])
    return EvalSet(x, words, lexicons, vocabulary, bundle.tokenizer(vocabulary),
                   cs.positives_matrix(lexicons, vocabulary), unit)


@torch.no_grad()
def embed(model: torch.nn.Module, ev: EvalSet, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image_emb (n_rows, d), text_emb (n_words, d))`` of ``model`` on ``ev``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    img = torch.cat([torch.nn.functional.normalize(model.encode_image(ev.x[s:s + batch_size].to(device)).float(), dim=-1).cpu()
                     for s in range(0, len(ev.x), batch_size)])
    txt = torch.cat([torch.nn.functional.normalize(model.encode_text(ev.tokens[s:s + 4 * batch_size].to(device)).float(), dim=-1).cpu()
                     for s in range(0, len(ev.tokens), 4 * batch_size)])
    model.train(was_training)
    return img, txt


def evaluate(model: torch.nn.Module, ev: EvalSet, *, batch_size: int = 128,
             return_matrices: bool = False, reference_scale: float | None = None) -> dict[str, Any]:
    """The five columns of Table 2.6 plus lexicon-50 top-1 accuracy for ``model`` on ``ev``.

    ``P`` is the softmax over the whole test vocabulary per row, at the model's own temperature
    (§2.2.1); accuracy, precision, recall and F1 use approach 2 (the soft counts of
    Eq. 2.3.10-2.3.13, the reading under which the thesis's Table 2.6 is consistent: precision
    0.19 with recall 0.04 and accuracy 0.986), averaged over rows; ``entropy`` is Eq. 2.3.15
    averaged over rows (the thesis's "Uniformity"); ``lexicon50_top1`` is the share of rows whose
    most similar lexicon word is their true word.

    ``reference_scale`` (the zero-shot model's ``1/τ``) adds ``"precision_at_reference_scale"``:
    the precision of these embeddings at that temperature.  Approach-2 precision grows as the
    softmax sharpens, so a fine-tuned model's gain splits into what its embeddings learnt (this
    number against zero-shot) and what its learnt temperature adds (the rest).

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1", "logit_scale",
        "eval_s"}`` (floats), plus ``"P"``, ``"image_emb"``, ``"text_emb"`` when ``return_matrices``.
    """
    t0 = time.perf_counter()
    img, txt = embed(model, ev, batch_size)
    # the model's own temperature, within CLIP's cap (a fine-tuned scale may sit a hair above it)
    scale = min(float(model.logit_scale.exp().item()), cs.MAX_LOGIT_SCALE)
    P = cs.word_image_probabilities(img, txt, scale)
    out: dict[str, Any] = cs.classification_metrics(cs.soft_confusion(P, ev.Y))
    out["entropy"] = float(torch.nanmean(cs.normalised_similarity_entropy(P, ev.Y)))
    sims = (img @ txt.T).masked_fill(~ev.Y, float("-inf"))
    out["lexicon50_top1"] = float((sims.argmax(1) == ev.target_index).double().mean())
    out["logit_scale"] = scale
    if reference_scale is not None:
        P_ref = cs.word_image_probabilities(img, txt, float(reference_scale))
        out["precision_at_reference_scale"] = cs.classification_metrics(cs.soft_confusion(P_ref, ev.Y))["precision"]
    out["eval_s"] = time.perf_counter() - t0
    if return_matrices:
        out.update(P=P, image_emb=img, text_emb=txt)
    return out


# ---------------------------------------------------------------------------------------------
# fine-tuning (§2.4.2, Algorithm 1, Table 2.5)
# ---------------------------------------------------------------------------------------------


def pair_dataset(split: SVTSplit, bundle: cs.ClipBundle, unit: str | None = None,
                 pads: Sequence[float] = (0.0,)) -> cs.WordCropDataset:
    """``(image (3, H, W), tokens (context_length,))`` pairs of Algorithm 1 from ``split``.

    One pair per tagged word: the word crop (small CLIP) or the whole image (ViT-B/32) with the
    word as its text.  With the small CLIP, ``pads`` cuts every word once per entry, its box grown
    by that fraction of the box size on each side (the profile's ``ft_crop_pads``): a word
    rectangle drawn by a person or a detector is never exact, and 195 crops seen 20 times each
    teach the model those 195 pictures more than the words in them.  Whole images (``unit="image"``)
    ignore ``pads``.
    """
    unit = unit or eval_unit(bundle)
    if unit == "crop":
        crops = [c for pad in pads for c in split.word_crops(pad=float(pad))]
        images, texts = [c for c, _, _ in crops], [t for _, t, _ in crops]
    else:
        images, texts = [], []
        for im in split:
            if im.words:
                picture = im.load()
                images += [picture] * len(im.words)
                texts += im.tags
    if not images:
        raise ValueError(f"SVT split {split.name!r}: no tagged words to fine-tune on")
    return cs.WordCropDataset(images, texts, bundle)


def training_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                  optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One iteration of Algorithm 1's loop, steps (b)-(i): forward, loss, backward, update.

    Args:
        batch: ``(images (B, 3, H, W), tokens (B, context_length))``, pair ``b`` matching.

    Returns:
        ``{"loss", "loss_image", "loss_text"}`` as Python floats (before the update).
    """
    model.train()
    out = cs.contrastive_step(model, batch)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in out.items()}


def make_optimizer(model: torch.nn.Module, svt_cfg: dict) -> torch.optim.Adam:
    """Adam with the Table 2.5 hyper-parameters of the profile (``ft_lr``, ``ft_betas``, ``ft_eps``,
    ``ft_weight_decay``).  ``torch.optim.Adam``'s ``weight_decay`` adds ``λθ`` to the gradient,
    the L2 penalty the thesis writes (``L + λ Σ θ²``), not AdamW's decoupled decay.

    The temperature (``model.logit_scale``, CLIP's learnt ``log(1/τ)``) is a parameter group of
    its own: no weight decay (it is not a weight; open_clip exempts it too) and its own learning
    rate ``ft_logit_scale_lr``.  Adam moves a parameter by about ``lr`` per step whatever its
    gradient, so at 5e-5 a temperature that starts far from CLIP's cap of 100 (the small CLIP's
    is 41) would need thousands of steps to move; ViT-B/32's already sits at the cap.
    """
    named = list(model.named_parameters())
    scale = [p for n, p in named if n == "logit_scale"]
    groups: list[dict] = [{"params": [p for n, p in named if n != "logit_scale"]}]
    if scale:
        groups.append({"params": scale, "weight_decay": 0.0,
                       "lr": float(svt_cfg.get("ft_logit_scale_lr", svt_cfg["ft_lr"]))})
    return torch.optim.Adam(groups, lr=svt_cfg["ft_lr"], betas=tuple(svt_cfg["ft_betas"]),
                            eps=svt_cfg["ft_eps"], weight_decay=svt_cfg["ft_weight_decay"])


def checkpoint_epochs(svt_cfg: dict) -> list[int]:
    """The thesis's checkpoints (+1 ... +40) that this profile reaches: ``ft_checkpoints`` clipped
    to ``ft_epochs``, sorted."""
    return sorted({int(e) for e in svt_cfg["ft_checkpoints"] if 1 <= int(e) <= int(svt_cfg["ft_epochs"])})


def finetune(model: torch.nn.Module, train_set: torch.utils.data.Dataset, svt_cfg: dict,
             ckpt_dir: str | Path, *, step_fn=cs.contrastive_step, resume: bool = True, seed: int = 0,
             max_steps: int | None = None, progress: bool = True) -> Any:
    """Fine-tune ``model`` with Algorithm 1 through :func:`course_utils.train.fit`.

    Checkpoints are written every epoch; only :func:`checkpoint_epochs` (and the latest) are kept.
    A second call with the same ``ckpt_dir`` resumes (or, when finished, just returns the history).

    Returns:
        the run's :class:`course_utils.train.History` (``loss``, ``loss_image``, ``loss_text``).
    """
    from .train import fit

    optimizer = make_optimizer(model, svt_cfg)
    return fit(model, step_fn, train_set, epochs=int(svt_cfg["ft_epochs"]),
               batch_size=int(svt_cfg["ft_batch_size"]), optimizer=optimizer, ckpt_dir=ckpt_dir,
               resume=resume, seed=seed, keep_epochs=checkpoint_epochs(svt_cfg), max_steps=max_steps,
               progress=progress, desc="fine-tune CLIP")


def evaluate_checkpoints(model: torch.nn.Module, ev: EvalSet, ckpt_dir: str | Path,
                         epochs: Sequence[int], *, zero_shot: dict[str, Any] | None = None,
                         verbose: bool = True) -> list[dict[str, Any]]:
    """Table 2.6: one row per kept checkpoint (``epoch`` 0 = ``zero_shot``, evaluated beforehand).

    ``model`` is overwritten with each checkpoint's weights in turn (and left at the last one).

    Returns:
        rows ``{"epoch", "accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1",
        "logit_scale"}``, and ``"precision_at_zero_shot_scale"`` when ``zero_shot`` is given (the
        checkpoint's embeddings at the zero-shot temperature: see :func:`evaluate`).
    """
    from .train import checkpoint_path, load_checkpoint

    rows = []
    ref = None
    if zero_shot is not None:
        ref = zero_shot.get("logit_scale")
        rows.append({"epoch": 0, **{k: zero_shot[k] for k in TABLE_COLUMNS}, "logit_scale": ref,
                     "precision_at_zero_shot_scale": zero_shot["precision"]})
    for e in epochs:
        path = checkpoint_path(ckpt_dir, e)
        load_checkpoint(path, model=model)
        m = evaluate(model, ev, reference_scale=ref)
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


def pretraining_overlap(bundle: cs.ClipBundle) -> str:
    """One line: how many SynthSVT test words the small CLIP's pretraining stream contained."""
    manifest = bundle.info.get("manifest") or {}
    ov = manifest.get("pretraining_overlap")
    if bundle.kind == "full":
        return "pretraining overlap: ViT-B/32 was pretrained by its authors on web data (unknown overlap)"
    if not ov:
        return ("pretraining overlap: unknown (no data/small_clip/manifest.json yet: the small CLIP "
                "has not been pretrained)")
    return (f"pretraining overlap: the small CLIP's stream ({manifest.get('samples_seen', '?')} rendered crops, "
            f"{ov['distinct_texts_in_stream']} distinct texts) contained {ov['test_tags_in_stream']} of the "
            f"{ov['test_tags_total']} SynthSVT test tags and {ov['test_lexicon_words_in_stream']} of its "
            f"{ov['test_lexicon_words_total']} test lexicon words, as words; the test images were never seen "
            f"({manifest.get('eval_split', '')})")


def save_table(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write Table 2.6 rows as JSON (the benchmark and notebook 08 read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2))
    return path


def run_dir(profile: str, bundle: cs.ClipBundle, svt_cfg: dict | None = None) -> Path:
    """Checkpoint folder of notebook 07's fine-tuning run, under the course cache.

    The folder name carries the starting weights (sha256 prefix, or ``random``) and, given
    ``svt_cfg``, a hash of its fine-tuning knobs (``ft_*``), so a run never resumes from
    checkpoints that grew out of other weights or other settings.
    """
    import hashlib

    from .shapes import cache_root

    start = "random" if bundle.info.get("random_init") else (
        bundle.info.get("sha256", "")[:12] or str(bundle.info.get("pretrained", "openai")))
    name = f"07_clip_svt_{profile}_{bundle.kind}_{start}"
    if svt_cfg is not None:
        knobs = {k: v for k, v in sorted(dict(svt_cfg).items()) if k.startswith("ft_")}
        name += "_" + hashlib.sha256(json.dumps(knobs, default=str).encode()).hexdigest()[:8]
    return cache_root() / "runs" / name


def best_checkpoint_path(profile: str) -> Path:
    """Where notebook 07 saves the chosen (best-precision) fine-tuned CLIP's ``state_dict``;
    notebook 08 starts from it (:func:`course_utils.odits.load_clip_weights` reads it)."""
    from .shapes import cache_root

    return cache_root() / "clip_svt" / f"finetuned_best_{profile}.pt"
