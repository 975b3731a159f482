"""Evaluating a CLIP on an SVT split: rows, vocabulary and Table 2.6 (notebooks 06-07).

What a "row" of ``P`` is.  The thesis feeds whole street images to ViT-B/32 (224 px); a row is
an image and its positives ``W_i^+`` are the image's 50-word lexicon.  The course's small CLIP
reads 32x128 word crops, on which a whole 480x360 scene is illegible, so with the small model a
row is one word crop and its positives are the lexicon of the image it was cut from.  The unit
follows the model (:func:`eval_unit`), never the profile.

:class:`EvalSet` prepares a split once (preprocessed rows, tokenised vocabulary, ``W_i^+``);
:func:`evaluate_word_spotting` embeds it with a model and scores it with
:func:`course_utils.clip.wordspotting.table_2_6_metrics`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..svt import SVTSplit
from .finetune import MAX_LOGIT_SCALE
from .loading import ClipBundle, eval_unit
from .wordspotting import positives_matrix, table_2_6_metrics, word_image_probabilities

__all__ = ["EvalSet", "build_eval_set", "embed", "evaluate_word_spotting", "split_pairs"]




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


def build_eval_set(split: SVTSplit, bundle: ClipBundle, unit: str | None = None) -> EvalSet:
    """Preprocess ``split`` for :func:`evaluate_word_spotting` (rows as :func:`split_pairs`, columns its vocabulary)."""
    unit = unit or eval_unit(bundle)
    images, words, lexicons = split_pairs(split, unit)
    if not images:
        raise ValueError(f"SVT split {split.name!r}: no tagged words to evaluate on")
    vocabulary = split.vocabulary()
    x = torch.stack([bundle.preprocess(im) for im in images])
    return EvalSet(x, words, lexicons, vocabulary, bundle.tokenizer(vocabulary),
                   positives_matrix(lexicons, vocabulary), unit)


@torch.no_grad()
def embed(model: torch.nn.Module, ev: EvalSet, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image_emb (n_rows, d), text_emb (n_words, d))`` of ``model`` on ``ev``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    img = torch.cat([F.normalize(model.encode_image(ev.x[s:s + batch_size].to(device)).float(), dim=-1).cpu()
                     for s in range(0, len(ev.x), batch_size)])
    txt = torch.cat([F.normalize(model.encode_text(ev.tokens[s:s + 4 * batch_size].to(device)).float(), dim=-1).cpu()
                     for s in range(0, len(ev.tokens), 4 * batch_size)])
    model.train(was_training)
    return img, txt


def evaluate_word_spotting(model: torch.nn.Module, ev: EvalSet, *, batch_size: int = 128,
                           return_matrices: bool = False, reference_scale: float | None = None) -> dict[str, Any]:
    """The five columns of Table 2.6 plus lexicon-50 top-1 accuracy for ``model`` on ``ev``.

    ``P`` is the softmax over the whole test vocabulary per row, at the model's own temperature
    (§2.2.1), scored by :func:`course_utils.clip.wordspotting.table_2_6_metrics` with the rows'
    lexicons as positives: accuracy, precision, recall and F1 use approach 2 (the soft counts of
    Eq. 2.3.10-2.3.13, the reading under which the thesis's Table 2.6 is consistent: precision
    0.19 with recall 0.04 and accuracy 0.986), averaged over rows; ``entropy`` is Eq. 2.3.15
    averaged over rows (the thesis's "Uniformity"); ``lexicon50_top1`` is the share of rows whose
    most similar lexicon word (by cosine) is their true word.

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
    scale = min(float(model.logit_scale.exp().item()), MAX_LOGIT_SCALE)
    P = word_image_probabilities(img, txt, scale)
    truth = torch.zeros_like(ev.Y)
    truth[torch.arange(len(ev.target_index)), ev.target_index] = True
    out: dict[str, Any] = table_2_6_metrics(P, ev.Y, lexicon=ev.Y, truth=truth, ranking=img @ txt.T)
    out["logit_scale"] = scale
    if reference_scale is not None:
        P_ref = word_image_probabilities(img, txt, float(reference_scale))
        out["precision_at_reference_scale"] = table_2_6_metrics(P_ref, ev.Y)["precision"]
    out["eval_s"] = time.perf_counter() - t0
    if return_matrices:
        out.update(P=P, image_emb=img, text_emb=txt)
    return out
