"""Word spotting with CLIP (seed 004 §2.2-2.3): the word-image probability matrix and its metrics.

Everything here works on a probability matrix ``P`` of shape ``(n_rows, n_words)`` (softmax over
the vocabulary, one row per image or word crop) and a boolean matrix of the same shape
(``positives[i, j]``: word ``j`` belongs to row ``i``, the thesis's ``W_i^+``).  The operands may
sit on different devices (embeddings on the GPU, masks built on the CPU): each function brings
them to one device first (:func:`course_utils.clip.devices.same_device`), and the metrics come
back as Python floats.

* the matrix itself (:func:`word_image_probabilities`, §2.2.1) and its lexicon-restricted form;
* approach 1 — per-word thresholds maximising Youden's J (:func:`youden_thresholds`,
  :func:`threshold_confusion`), and Eq. 2.3.5 read literally (:func:`eq_2_3_5_thresholds`);
* approach 2 — the soft TP/TN/FP/FN of Eq. 2.3.10-2.3.13 (:func:`soft_confusion`);
* accuracy, precision, recall, F1 (Eq. 2.3.1-2.3.4, :func:`classification_metrics`);
* the normalised similarity entropy of Eq. 2.3.15 (:func:`normalised_similarity_entropy`, the
  thesis's "Uniformity" column);
* lexicon-50 top-1 word-spotting accuracy (:func:`lexicon_top1_accuracy`);
* :func:`table_2_6_metrics` — **the** Table 2.6 evaluator, used by notebooks 06, 07 and 08 and
  their benchmarks alike, so a number means the same thing wherever it is printed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_curve

from ..devices import same_device

__all__ = [
    "TABLE_2_6",
    "TABLE_COLUMNS",
    "classification_metrics",
    "eq_2_3_5_thresholds",
    "lexicon_probabilities",
    "lexicon_top1_accuracy",
    "normalised_similarity_entropy",
    "positives_matrix",
    "soft_confusion",
    "table_2_6_metrics",
    "threshold_confusion",
    "top_k_words",
    "word_image_probabilities",
    "youden_thresholds",
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


def word_image_probabilities(image_emb: torch.Tensor, text_emb: torch.Tensor,
                             logit_scale: float = 100.0) -> torch.Tensor:
    """The thesis's matrix ``P``: softmax over the whole vocabulary, one row per image.

    Args:
        image_emb: ``(n_images, d)`` L2-normalised image embeddings.
        text_emb: ``(n_words, d)`` L2-normalised word embeddings.
        logit_scale: ``1/τ``, the model's temperature (CLIP's is 100).

    Returns:
        ``P`` of shape ``(n_images, n_words)`` on the embeddings' device (the GPU when either
        is there); every row sums to 1.
    """
    _check_emb(image_emb, text_emb)
    image_emb, text_emb = same_device(image_emb, text_emb)
    return (logit_scale * image_emb @ text_emb.T).softmax(dim=-1)


def lexicon_probabilities(image_emb: torch.Tensor, text_emb: torch.Tensor, lexicon_mask: torch.Tensor,
                          logit_scale: float = 100.0) -> torch.Tensor:
    """``P`` restricted to each image's lexicon: softmax over the words where ``lexicon_mask`` is True.

    Args:
        image_emb: ``(n_images, d)``; text_emb: ``(n_words, d)``.
        lexicon_mask: ``(n_images, n_words)`` bool, True for the words of image ``i``'s lexicon
            (see :func:`positives_matrix`).

    Returns:
        ``(n_images, n_words)``: zero outside each lexicon, each row sums to 1 over its lexicon.
    """
    _check_emb(image_emb, text_emb)
    if not isinstance(lexicon_mask, torch.Tensor):
        raise ValueError(f"lexicon_mask: expected a bool tensor, got {type(lexicon_mask).__name__}")
    image_emb, text_emb, lexicon_mask = same_device(image_emb, text_emb, lexicon_mask)
    if lexicon_mask.shape != (image_emb.shape[0], text_emb.shape[0]) or lexicon_mask.dtype != torch.bool:
        raise ValueError(f"lexicon_mask: expected a bool tensor of shape "
                         f"({image_emb.shape[0]}, {text_emb.shape[0]}), got {lexicon_mask.dtype} {tuple(lexicon_mask.shape)}")
    if not lexicon_mask.any(dim=1).all():
        bad = int((~lexicon_mask.any(dim=1)).nonzero()[0])
        raise ValueError(f"lexicon_mask: image {bad} has an empty lexicon")
    logits = (logit_scale * image_emb @ text_emb.T).masked_fill(~lexicon_mask, float("-inf"))
    return logits.softmax(dim=-1)


def _check_emb(image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    if not isinstance(image_emb, torch.Tensor) or not isinstance(text_emb, torch.Tensor):
        raise ValueError(f"embeddings: expected two tensors, got image_emb {type(image_emb).__name__} "
                         f"and text_emb {type(text_emb).__name__}")
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings: expected (n_images, d) and (n_words, d) with the same d, got "
                         f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)}")


def positives_matrix(words_per_image: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> torch.Tensor:
    """Bool matrix ``Y`` of shape ``(n_images, len(vocabulary))``: ``Y[i, j]`` = word ``j`` ∈ image ``i``.

    Pass each image's lexicon for the thesis's ``W_i^+``, or its tags for the words really
    written in it.  Words missing from ``vocabulary`` raise a ``KeyError`` naming them.
    """
    index = {w: j for j, w in enumerate(vocabulary)}
    Y = torch.zeros(len(words_per_image), len(vocabulary), dtype=torch.bool)
    for i, words in enumerate(words_per_image):
        missing = [w for w in words if w not in index]
        if missing:
            raise KeyError(f"image {i}: words {missing[:5]} are not in the vocabulary")
        Y[i, [index[w] for w in words]] = True
    return Y


def top_k_words(P: torch.Tensor, vocabulary: Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable words of every row of ``P`` (Fig. 2.7): ``[[(word, p), ...], ...]``."""
    values, idx = P.topk(min(k, P.shape[1]), dim=1)
    return [[(vocabulary[j], float(v)) for v, j in zip(vr, ir)] for vr, ir in zip(values.tolist(), idx.tolist())]


def lexicon_top1_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, vocabulary: Sequence[str],
                          lexicons: Sequence[Sequence[str]], targets: Sequence[str]) -> float:
    """Word-spotting accuracy: share of crops whose most similar lexicon word is the right one.

    Args:
        image_emb: ``(n_crops, d)`` embeddings of word crops.
        text_emb: ``(n_words, d)`` embeddings of ``vocabulary``.
        lexicons: the lexicon (e.g. 50 words) of each crop's image.
        targets: the true word of each crop (must be in its lexicon).
    """
    _check_emb(image_emb, text_emb)
    if not (len(lexicons) == len(targets) == image_emb.shape[0]):
        raise ValueError(f"lexicon_top1_accuracy: {image_emb.shape[0]} crops, {len(lexicons)} lexicons, "
                         f"{len(targets)} targets (expected the same number)")
    # the mask and the answers are built on the CPU; the embeddings may be on the GPU
    image_emb, text_emb, mask = same_device(image_emb, text_emb, positives_matrix(lexicons, vocabulary))
    pred = (image_emb @ text_emb.T).masked_fill(~mask, float("-inf")).argmax(dim=1)
    index = {w: j for j, w in enumerate(vocabulary)}
    truth = torch.tensor([index[t] for t in targets], device=pred.device)
    return float((pred == truth).float().mean()) if len(targets) else float("nan")


def _check_PY(P: torch.Tensor, Y: torch.Tensor) -> None:
    if not isinstance(P, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise ValueError(f"P and Y: expected two tensors, got {type(P).__name__} and {type(Y).__name__}")
    if P.ndim != 2 or P.shape != Y.shape:
        raise ValueError(f"P and Y: expected two (n_images, n_words) matrices, got {tuple(P.shape)} and {tuple(Y.shape)}")
    if Y.dtype != torch.bool:
        raise ValueError(f"Y: expected a bool tensor, got {Y.dtype}")


def youden_thresholds(P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Approach 1: one threshold per word, maximising Youden's J = TPR - FPR (Eq. 2.3.8-2.3.9).

    Uses ``sklearn.metrics.roc_curve`` on column ``j`` of ``P`` against column ``j`` of ``Y``.
    A word that is positive for no image gets ``+inf`` (never predicted: any prediction would be
    a false positive); a word positive for every image gets ``-inf`` (always predicted).

    Returns:
        ``(n_words,)`` float64 thresholds; word ``j`` is predicted for image ``i`` when
        ``P[i, j] >= thresholds[j]``.
    """
    _check_PY(P, Y)
    Pn, Yn = P.detach().double().cpu().numpy(), Y.cpu().numpy()
    out = np.empty(P.shape[1])
    for j in range(P.shape[1]):
        pos = Yn[:, j].sum()
        if pos == 0:
            out[j] = np.inf
        elif pos == len(Yn):
            out[j] = -np.inf
        else:
            fpr, tpr, thr = roc_curve(Yn[:, j], Pn[:, j])
            out[j] = thr[int(np.argmax(tpr - fpr))]  # first maximum: the highest such threshold
    return torch.from_numpy(out)


def eq_2_3_5_thresholds(P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Eq. 2.3.5 read literally: ``threshold[i, j] = 1 / |W_i^+| - eps_j`` with ``eps_j = theta*_j``.

    The thesis writes "theta*_j represents our eps_j" after Eq. 2.3.9, so ``eps_j`` is the Youden
    threshold of word ``j`` (:func:`youden_thresholds`), and ``|W_i^+|`` the number of words that
    truly belong to row ``i``.  The course predicts with ``theta*_j`` itself (notebook 06 says why);
    this is the other reading, for comparison.  A row with no positive word gets ``+inf``.

    Returns:
        ``(n_images, n_words)`` float64 thresholds for :func:`threshold_confusion`.
    """
    _check_PY(P, Y)
    theta = youden_thresholds(P, Y)
    n_pos = Y.sum(1).double().cpu()
    out = (1.0 / n_pos.clamp_min(1))[:, None] - theta[None, :]
    # a row without positives is given no word (also where theta_j = +inf would make inf - inf)
    return out.masked_fill((n_pos == 0)[:, None], float("inf"))


def threshold_confusion(P: torch.Tensor, Y: torch.Tensor, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image TP, TN, FP, FN counts after thresholding ``P``: word ``j`` is predicted for
    row ``i`` when ``P[i, j] >= thresholds[j]`` (one threshold per word, ``(n_words,)``) or
    ``>= thresholds[i, j]`` (one per entry, ``(n_images, n_words)``, e.g. :func:`eq_2_3_5_thresholds`).

    Returns:
        ``{"tp", "tn", "fp", "fn"}``, each a float64 tensor of shape ``(n_images,)``.
    """
    _check_PY(P, Y)
    if thresholds.shape not in ((P.shape[1],), tuple(P.shape)):
        raise ValueError(f"thresholds: expected shape ({P.shape[1]},) or {tuple(P.shape)}, "
                         f"got {tuple(thresholds.shape)}")
    P, Y, thresholds = same_device(P, Y, thresholds)
    pred = P.double() >= (thresholds.double() if thresholds.ndim == 2 else thresholds.double()[None, :])
    return {
        "tp": (pred & Y).sum(1).double(), "tn": (~pred & ~Y).sum(1).double(),
        "fp": (pred & ~Y).sum(1).double(), "fn": (~pred & Y).sum(1).double(),
    }


def soft_confusion(P: torch.Tensor, Y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Approach 2: the soft counts of Eq. 2.3.10-2.3.13, per image.

    Each probability is divided by the largest probability of its group (positives ``W_i^+``
    or negatives ``W_i^-`` of image ``i``)::

        TP_i = Σ_{j∈W+} p/max(p+)        FN_i = Σ_{j∈W+} (1 - p/max(p+))
        FP_i = Σ_{j∈W-} p/max(p-)        TN_i = Σ_{j∈W-} (1 - p/max(p-))

    A group that is empty contributes zero; a group whose largest probability is 0 counts all
    its words as predicted absent (ratio 0).

    Returns:
        ``{"tp", "tn", "fp", "fn"}``, float64 tensors of shape ``(n_images,)``;
        ``tp + fn = |W_i^+|`` and ``fp + tn = |W_i^-|``.
    """
    _check_PY(P, Y)
    P, Y = same_device(P, Y)
    P = P.double()

    def ratios(mask: torch.Tensor) -> torch.Tensor:
        vals = P.masked_fill(~mask, 0.0)
        peak = vals.max(dim=1, keepdim=True).values
        return torch.where(peak > 0, vals / peak.clamp_min(torch.finfo(P.dtype).tiny), torch.zeros_like(vals))

    pos, neg = ratios(Y), ratios(~Y)
    n_pos, n_neg = Y.sum(1).double(), (~Y).sum(1).double()
    tp, fp = pos.sum(1), neg.sum(1)
    return {"tp": tp, "fn": n_pos - tp, "fp": fp, "tn": n_neg - fp}


def classification_metrics(counts: dict[str, torch.Tensor], average: str = "macro") -> dict[str, float]:
    """Accuracy, precision, recall and F1 (Eq. 2.3.1-2.3.4) from per-image counts.

    Args:
        counts: ``{"tp", "tn", "fp", "fn"}`` of shape ``(n_images,)`` (from
            :func:`soft_confusion` or :func:`threshold_confusion`).
        average: ``"macro"`` computes the four metrics per image and averages them over images
            (each image weighs the same); ``"micro"`` sums the counts over images first.
            A 0/0 ratio counts as 0 (sklearn's ``zero_division=0``).

    Returns:
        ``{"accuracy", "precision", "recall", "f1"}`` as floats.
    """
    missing = [k for k in ("tp", "tn", "fp", "fn") if k not in counts]
    if missing:
        raise ValueError(f"counts: missing {missing}; expected the dict of soft_confusion or threshold_confusion")
    tp, tn, fp, fn = same_device(*(counts[k].double() for k in ("tp", "tn", "fp", "fn")))
    if average == "micro":
        tp, tn, fp, fn = tp.sum(), tn.sum(), fp.sum(), fn.sum()
    elif average != "macro":
        raise ValueError(f"average={average!r}, expected 'macro' or 'micro'")

    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(b > 0, a / b.clamp_min(1e-300), torch.zeros_like(a))

    acc = div(tp + tn, tp + tn + fp + fn)
    prec, rec = div(tp, tp + fp), div(tp, tp + fn)
    f1 = div(2 * prec * rec, prec + rec)
    return {k: float(v.mean()) for k, v in (("accuracy", acc), ("precision", prec), ("recall", rec), ("f1", f1))}


def normalised_similarity_entropy(P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Eq. 2.3.15: entropy of the positives' renormalised probabilities, log base ``|W_i^+|``.

    1 means the model spreads its probability evenly over an image's words (the thesis's
    assumed truth), 0 means it puts all of it on one of them.

    Returns:
        ``(n_images,)`` float64; NaN for an image with fewer than two positive words (the base
        ``|W_i^+|`` must exceed 1).  Average with ``torch.nanmean``.
    """
    _check_PY(P, Y)
    P, Y = same_device(P, Y)
    P = P.double()
    n_pos = Y.sum(1)
    pos = P.masked_fill(~Y, 0.0)
    q = pos / pos.sum(1, keepdim=True).clamp_min(1e-300)
    # 0 log 0 = 0
    plogp = torch.where(q > 0, q * torch.log(q.clamp_min(1e-300)), torch.zeros_like(q))
    ent = -plogp.sum(1) / torch.log(n_pos.double().clamp_min(2))
    return torch.where(n_pos >= 2, ent, torch.full_like(ent, float("nan")))


def table_2_6_metrics(P: torch.Tensor, positives: torch.Tensor, *, lexicon: torch.Tensor | None = None,
                      truth: torch.Tensor | None = None, ranking: torch.Tensor | None = None,
                      approach1: bool = False) -> dict[str, float]:
    """Table 2.6's columns for one probability matrix: the one evaluator of notebooks 06-08.

    Args:
        P: ``(n_rows, n_words)`` word probabilities (rows sum to 1).
        positives: ``(n_rows, n_words)`` bool, the thesis's ``W_i^+`` (an image's lexicon in
            06-07, the words written in it in 08).
        lexicon: ``(n_rows, n_words)`` bool, each row's lexicon; adds ``lexicon50_top1``.
        truth: ``(n_rows, n_words)`` bool, the right answers of the lexicon pick (default
            ``positives``): a row scores when its best lexicon word is one of them.
        ranking: ``(n_rows, n_words)`` scores that pick the best lexicon word (default ``P``).
            Pass the cosines when ``P`` is very sharp: where probabilities underflow to 0 the
            softmax would tie words that the cosines still tell apart.
        approach1: add the same four metrics with Youden thresholds (``*_youden``).

    Returns:
        ``accuracy, precision, recall, f1`` (approach 2, soft counts, macro over rows);
        ``entropy`` (Eq. 2.3.15 averaged over the rows with at least two positives, NaN when no
        row has two); ``lexicon50_top1`` and ``*_youden`` when asked for.  Plain floats.
    """
    _check_PY(P, positives)
    out = classification_metrics(soft_confusion(P, positives))
    out["entropy"] = float(torch.nanmean(normalised_similarity_entropy(P, positives)))
    if approach1:
        counts = threshold_confusion(P, positives, youden_thresholds(P, positives))
        out.update({f"{k}_youden": v for k, v in classification_metrics(counts).items()})
    if lexicon is not None:
        truth = positives if truth is None else truth
        ranking = P if ranking is None else ranking
        for name, m in (("lexicon", lexicon), ("truth", truth), ("ranking", ranking)):
            if m.shape != P.shape:
                raise ValueError(f"table_2_6_metrics: {name} has shape {tuple(m.shape)}, expected {tuple(P.shape)}")
        lexicon, truth, ranking = same_device(lexicon, truth, ranking)
        pick = ranking.masked_fill(~lexicon, float("-inf")).argmax(dim=1)
        out["lexicon50_top1"] = float(truth.gather(1, pick[:, None]).double().mean())
    return {k: float(v) for k, v in out.items()}
