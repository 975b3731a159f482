"""Objects for ODITS (seed 004 Ch. 3): masks → object images → CLIP features, and how many there are.

* :func:`object_image` — the object ``M ∘ X`` as an image for CLIP.  Literally it is the object on
  a black frame of the full image size, so a small object fills a few pixels of CLIP's input; by
  default the background is the image's mean colour (black is a strong, unnatural signal for
  CLIP) and the result is cropped to the mask's box plus a margin, so the object fills the input
  as a word crop does for the course's small CLIP.  Both switches let a student try the literal
  version.
* :func:`extract_object_features` — every image of a split through a mask source
  (:mod:`course_utils.clip.masks`) and CLIP, padded into :class:`ObjectFeatures`.
* object counts (Fig. 3.4-3.6, Table 3.3): :func:`count_statistics`, :func:`plot_object_counts`,
  :func:`anderson_table`.
* the training-free baselines on those features: CLIP on the whole image
  (:func:`clip_probabilities`) and the best-matching object (:func:`object_max_probabilities`).
* the explanation figure: :func:`plot_object_words`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from PIL import Image
from scipy import stats
from scipy.stats import gaussian_kde
from tqdm.auto import tqdm

from ..devices import same_device
from .loading import ClipBundle
from .masks import MaskSource, ObjectMasks, check_masks, masks_to_boxes
from .wordspotting import positives_matrix, word_image_probabilities

__all__ = [
    "ObjectFeatureDataset",
    "ObjectFeatures",
    "AD_LEVELS",
    "AD_TABLES",
    "ad_critical_value",
    "ad_statistic",
    "anderson_table",
    "clip_probabilities",
    "count_statistics",
    "extract_object_features",
    "format_anderson_table",
    "object_image",
    "object_images",
    "object_max_probabilities",
    "plot_object_counts",
    "plot_object_words",
    "top_words_per_object",
]


def object_image(image: Image.Image, mask: torch.Tensor, background: str = "mean",
                 crop: bool = True, pad: float = 0.1) -> Image.Image:
    """The object ``M ∘ X`` as an RGB image ready for CLIP's preprocessing.

    Args:
        image: the RGB image ``X`` (``W x H``).
        mask: ``(H, W)`` bool mask ``M`` of one object.
        background: colour of the pixels outside the mask: ``"mean"`` (the image's mean colour,
            the default: neutral for CLIP) or ``"black"`` (the literal ``M ∘ X``).
        crop: cut the result to the mask's box grown by ``pad`` x its height on every side, so
            the object fills CLIP's input; ``False`` keeps the full frame.
        pad: margin of the crop (a little context helps text, as SVT's loose boxes do).

    Returns:
        an RGB PIL image (the full frame, or the crop).  An empty mask gives a 1x1 background image.
    """
    x = np.asarray(image.convert("RGB"), dtype=np.uint8)
    m = mask.cpu().numpy().astype(bool)
    if m.shape != x.shape[:2]:
        raise ValueError(f"object_image: mask is {m.shape} but the image is {x.shape[:2]} (H, W)")
    if background == "mean":
        fill = x.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    elif background == "black":
        fill = np.zeros(3, dtype=np.uint8)
    else:
        raise ValueError(f"object_image: background={background!r}, expected 'mean' or 'black'")
    out = np.where(m[..., None], x, fill[None, None, :])
    if not m.any():
        return Image.fromarray(np.broadcast_to(fill, (1, 1, 3)).copy())
    if crop:
        x1, y1, x2, y2 = masks_to_boxes(torch.from_numpy(m)[None])[0].tolist()
        margin = pad * (y2 - y1)
        H, W = m.shape
        box = (max(0, int(x1 - margin)), max(0, int(y1 - margin)),
               min(W, int(math.ceil(x2 + margin))), min(H, int(math.ceil(y2 + margin))))
        out = out[box[1]:box[3], box[0]:box[2]]
    return Image.fromarray(np.ascontiguousarray(out))


def object_images(image: Image.Image, objects: ObjectMasks, **kwargs: Any) -> list[Image.Image]:
    """:func:`object_image` for every mask of ``objects`` (``K`` images, possibly none)."""
    return [object_image(image, m, **kwargs) for m in objects.masks]


@dataclass
class ObjectFeatures:
    """CLIP embeddings and targets of one split, padded to the largest object count.

    Attributes:
        image_emb: ``(N, d)``; object_emb: ``(N, K_max, d)``; conf, valid: ``(N, K_max)``.
        targets: ``(N, n)`` bool, the words written in each image (its tags).
        lexicon: ``(N, n)`` bool, each image's lexicon (50 words in SVT).
        counts: ``(N,)`` int64 objects per image (before any cap).
        names: image names; object_labels: per image, a label per kept object (may be empty).
    """

    image_emb: torch.Tensor
    object_emb: torch.Tensor
    conf: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    lexicon: torch.Tensor
    counts: torch.Tensor
    names: list[str] = field(default_factory=list)
    object_labels: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.image_emb.shape[0])


class ObjectFeatureDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`ObjectFeatures`; item ``i`` is a dict of tensors."""

    def __init__(self, feats: ObjectFeatures) -> None:
        self.f = feats

    def __len__(self) -> int:
        return len(self.f)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        f = self.f
        return {"image_emb": f.image_emb[i], "object_emb": f.object_emb[i], "conf": f.conf[i],
                "valid": f.valid[i], "targets": f.targets[i]}


def extract_object_features(bundle: ClipBundle, records: Sequence[Any], mask_source: MaskSource,
                     vocabulary: Sequence[str], max_objects: int | None = None,
                     background: str = "mean", crop: bool = True, batch_size: int = 64,
                     progress: bool = False) -> ObjectFeatures:
    """Masks → objects → CLIP embeddings for every image of an SVT split.

    Args:
        bundle: the CLIP (its ``encode_images`` gives L2-normalised embeddings).
        records: :class:`course_utils.svt.SVTImage` records (``load()``, ``tags``, ``lexicon``).
        mask_source: e.g. :class:`course_utils.clip.masks.BoxMaskSource` or ``SamMaskSource``.
        vocabulary: the ``n`` words (columns of ``targets``/``lexicon``); must be non-empty.
        max_objects: keep at most this many objects per image (most confident first).
        background, crop: how objects become images (see :func:`object_image`).

    Returns:
        :class:`ObjectFeatures`, on the CPU (a dataset: :func:`course_utils.train.fit` and
        :func:`course_utils.clip.odits.predict` move its batches to the model's device); the
        images are encoded on ``bundle``'s device.
    """
    if not vocabulary:
        raise ValueError("extract_object_features: the vocabulary is empty")
    images, crops, owner, confs, counts, labels = [], [], [], [], [], []
    it = records
    if progress:
        it = tqdm(records, desc="objects")
    for i, rec in enumerate(it):
        image = rec.load()
        objs = mask_source(image, rec)
        # any source may be plugged in: check its masks against the image before using them
        where = f"image #{i} ({getattr(rec, 'image_name', '?')}) from {getattr(mask_source, 'name', 'mask source')}"
        labels_i = list(objs.labels)
        objs = check_masks(objs.masks, objs.confidence, image, where=where)
        objs.labels = labels_i
        counts.append(len(objs))
        keep = list(range(len(objs)))[: max_objects] if max_objects is not None else list(range(len(objs)))
        images.append(image)
        for j in keep:
            crops.append(object_image(image, objs.masks[j], background=background, crop=crop))
            owner.append(i)
        # a plugged-in source may hand back GPU tensors: the features are assembled on the CPU
        confs.append(objs.confidence[keep].cpu())
        labels.append([objs.labels[j] for j in keep] if objs.labels else [])
    e_x = bundle.encode_images(images, batch_size=batch_size)
    d = e_x.shape[1]
    e_crops = bundle.encode_images(crops, batch_size=batch_size) if crops else torch.zeros(0, d)
    N, K = len(records), max([len(c) for c in confs] + [0])
    object_emb, conf = torch.zeros(N, K, d), torch.zeros(N, K)
    valid = torch.zeros(N, K, dtype=torch.bool)
    slot = [0] * N
    for row, i in enumerate(owner):
        object_emb[i, slot[i]] = e_crops[row]
        valid[i, slot[i]] = True
        slot[i] += 1
    for i, c in enumerate(confs):
        conf[i, : len(c)] = c
    vocab = list(vocabulary)
    known = set(vocab)  # words outside the vocabulary cannot be scored: leave them out of Y
    targets = positives_matrix([[t for t in r.tags if t in known] for r in records], vocab)
    lexicon = positives_matrix([[w for w in r.lexicon if w in known] for r in records], vocab)
    return ObjectFeatures(e_x, object_emb, conf, valid, targets, lexicon, torch.tensor(counts),
                         [r.image_name for r in records], labels)


def count_statistics(counts: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Mean, median, mode, standard deviation (ddof=1), min, max and n of object counts.

    The mode is the smallest most frequent count.  ``std`` is NaN for fewer than two images.
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    if c.size == 0:
        raise ValueError("count_statistics: no counts (expected one object count per image)")
    values, freq = np.unique(c, return_counts=True)
    return {"n": int(c.size), "mean": float(c.mean()), "median": float(np.median(c)),
            "mode": float(values[np.argmax(freq)]), "std": float(c.std(ddof=1)) if c.size > 1 else float("nan"),
            "min": float(c.min()), "max": float(c.max())}


def plot_object_counts(counts: Sequence[int] | np.ndarray, density: bool = False,
                       ax: Axes | None = None, title: str | None = None) -> Axes:
    """Histogram of object counts with a KDE and the mean/median/mode/±std marked.

    ``density=False`` is the thesis's Fig. 3.4 (frequencies), ``True`` its Fig. 3.5 (density).
    The KDE (``scipy.stats.gaussian_kde``) is skipped when all counts are equal (it is then
    undefined).
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    stats = count_statistics(c)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.arange(c.min() - 0.5, c.max() + 1.5, 1.0)
    ax.hist(c, bins=bins, density=density, color="#8fb3d9", edgecolor="white", label="images")
    if c.size > 1 and np.ptp(c) > 0:
        xs = np.linspace(c.min() - 1, c.max() + 1, 200)
        kde = gaussian_kde(c)(xs)
        ax.plot(xs, kde if density else kde * c.size, color="#1f4e79", label="KDE")
    for key, style in (("mean", "-"), ("median", "--"), ("mode", ":")):
        ax.axvline(stats[key], color="#c0392b", linestyle=style, label=f"{key} = {stats[key]:.2f}")
    if not math.isnan(stats["std"]):
        ax.axvspan(stats["mean"] - stats["std"], stats["mean"] + stats["std"], color="#c0392b",
                   alpha=0.08, label=f"±std = {stats['std']:.2f}")
    ax.set_xlabel("objects per image")
    ax.set_ylabel("density" if density else "images")
    ax.set_title(title or ("Density distribution" if density else "Frequency distribution"))
    ax.legend(fontsize=7)
    return ax


#: Critical values of the Anderson-Darling statistic when the law's parameters are estimated from
#: the sample, at the significance levels :data:`AD_LEVELS`: ``A / correction(n)``.  Two published
#: tables are in use.  Stephens (1974), which SciPy tabulated before 1.17 and the thesis's Table 3.3
#: used (exponential, n = 100: 1.341 / 1.006 = 1.333); and the revised values SciPy tabulates since
#: 1.17 (normal: D'Agostino 1986; exponential at n = 100: 1.321 / 1.006 = 1.313).
AD_LEVELS: tuple[float, ...] = (0.15, 0.10, 0.05, 0.025, 0.01)
AD_TABLES: dict[str, dict[str, tuple[tuple[float, ...], Any]]] = {
    "stephens1974": {"norm": ((0.576, 0.656, 0.787, 0.918, 1.092), lambda n: 1 + 4 / n - 25 / n ** 2),
                     "expon": ((0.922, 1.078, 1.341, 1.606, 1.957), lambda n: 1 + 0.6 / n)},
    "scipy1.17": {"norm": ((0.561, 0.631, 0.752, 0.873, 1.035), lambda n: 1 + 0.75 / n + 2.25 / n ** 2),
                  "expon": ((0.916, 1.062, 1.321, 1.591, 1.959), lambda n: 1 + 0.6 / n)},
}


def ad_critical_value(dist: str, n: int, alpha: float = 0.05, table: str = "stephens1974") -> float:
    """The Anderson-Darling critical value of ``dist`` ("norm" / "expon") for a sample of ``n`` at
    level ``alpha`` from one of :data:`AD_TABLES`, rounded to 3 decimals as the tables print it."""
    if table not in AD_TABLES:
        raise ValueError(f"table={table!r}: expected one of {sorted(AD_TABLES)}")
    if dist not in AD_TABLES[table]:
        raise ValueError(f"dist={dist!r}: expected one of {sorted(AD_TABLES[table])}")
    k = next((i for i, a in enumerate(AD_LEVELS) if math.isclose(a, alpha)), None)
    if k is None:
        raise ValueError(f"alpha={alpha}: the tables give {list(AD_LEVELS)}")
    if n < 3:
        raise ValueError(f"n={n}: need at least 3 observations")
    values, correction = AD_TABLES[table][dist]
    return round(values[k] / correction(n), 3)


def ad_statistic(x: np.ndarray, dist: str) -> float:
    """SciPy's Anderson-Darling statistic of ``x`` against ``dist`` with fitted parameters.

    Only the statistic is taken from SciPy; from 1.17 on it is asked for through the p-value
    interface (``method="interpolate"``), because the critical-value one warns and goes in 1.19.
    """
    if "method" in inspect.signature(stats.anderson).parameters:
        return float(stats.anderson(x, dist=dist, method="interpolate").statistic)
    return float(stats.anderson(x, dist=dist).statistic)  # SciPy < 1.17: no warning, no method


def anderson_table(counts: Sequence[int] | np.ndarray, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Anderson–Darling tests of the object counts against a normal and an exponential law.

    The statistic estimates the law's parameters from the data (:func:`ad_statistic`); the
    thesis's rule (Eq. 3.3.1) rejects H0 when it exceeds the critical value at ``alpha``, taken
    from the thesis's table (Stephens 1974, :func:`ad_critical_value`).  The revised table that
    SciPy 1.17 tabulates is given beside it (``critical_value_scipy117``), so a reader can see that
    the two differ in the third digit and whether the decision depends on it.

    Returns:
        one row per hypothesis: ``{"distribution", "n", "statistic", "critical_value",
        "critical_value_scipy117", "alpha", "decision", "reject", "same_decision"}``;
        ``decision`` reads "reject H0" or "do not reject H0".
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    if c.size < 3:
        raise ValueError(f"anderson_table: need at least 3 counts, got {c.size}")
    if np.ptp(c) == 0:
        raise ValueError(f"anderson_table: all {c.size} counts equal {c[0]:g}; no law can be fitted "
                         "(the normal's standard deviation would be 0)")
    rows = []
    for dist in ("norm", "expon"):
        stat = ad_statistic(c, dist)
        crit = ad_critical_value(dist, c.size, alpha, "stephens1974")
        crit_new = ad_critical_value(dist, c.size, alpha, "scipy1.17")
        reject = stat > crit
        rows.append({"distribution": {"norm": "normal", "expon": "exponential"}[dist], "n": int(c.size),
                     "statistic": stat, "critical_value": crit, "critical_value_scipy117": crit_new,
                     "alpha": alpha, "reject": bool(reject), "same_decision": bool(reject == (stat > crit_new)),
                     "decision": "reject H0" if reject else "do not reject H0"})
    return rows


def format_anderson_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table 3.3 as text: one line per hypothesis, with both tables' critical values."""
    pct = f"{100 * rows[0]['alpha']:g} %" if rows else "5 %"
    lines = [f"{'H0: counts follow':<22}{'statistic':>11}{'crit. ' + pct:>13}{'SciPy 1.17':>12}  decision",
             f"{'':<22}{'':>11}{'(Stephens)':>13}{'table':>12}"]
    for r in rows:
        lines.append(f"{r['distribution'] + ' law':<22}{r['statistic']:>11.4f}"
                     f"{r['critical_value']:>13.3f}{r['critical_value_scipy117']:>12.3f}  {r['decision']}"
                     + ("" if r["same_decision"] else "  (the SciPy 1.17 table decides otherwise)"))
    return "\n".join(lines)


def clip_probabilities(feats: ObjectFeatures, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The CLIP baseline: ``softmax(s · E_X E_T^T)`` over the vocabulary, ``(N, n)``.

    ``text_emb`` ``(n, d)`` may be on another device than ``feats``; the result is on the
    accelerator when either is there (:func:`course_utils.clip.devices.common_device`).
    """
    return word_image_probabilities(feats.image_emb, text_emb, logit_scale)


def object_max_probabilities(feats: ObjectFeatures, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """A training-free object baseline: each word scores its best-matching object.

    ``logit_ik = s · max_j cos(E_M_j, E_T_k)`` over image ``i``'s objects (the image itself when
    it has none), then a softmax over the vocabulary.  It tells how much of ODITS's result the
    objects alone explain, without any learnt fusion.

    Args:
        feats: the split's features (``object_emb (N, K, d)``, ``valid (N, K)``, ``image_emb (N, d)``).
        text_emb: ``(n, d)`` L2-normalised word embeddings, on any device.
        logit_scale: ``s = 1/τ``.

    Returns:
        ``(N, n)`` probabilities, on the accelerator when ``feats`` or ``text_emb`` is there.
    """
    if not isinstance(text_emb, torch.Tensor) or text_emb.ndim != 2 or text_emb.shape[1] != feats.image_emb.shape[1]:
        raise ValueError(f"text_emb: expected (n, {feats.image_emb.shape[1]}), got "
                         f"{tuple(text_emb.shape) if isinstance(text_emb, torch.Tensor) else type(text_emb).__name__}")
    object_emb, valid, image_emb, text_emb = same_device(feats.object_emb, feats.valid, feats.image_emb, text_emb)
    cos_obj = torch.einsum("nkd,wd->nkw", F.normalize(object_emb, dim=-1), text_emb)
    cos_obj = cos_obj.masked_fill(~valid[:, :, None], float("-inf"))
    best = cos_obj.max(dim=1).values if cos_obj.shape[1] else torch.full(
        (len(feats), text_emb.shape[0]), float("-inf"), device=text_emb.device)
    img = image_emb @ text_emb.T
    none = ~valid.any(dim=1)
    best = torch.where(none[:, None], img, best)
    return (logit_scale * best).softmax(dim=-1)


def top_words_per_object(object_text: torch.Tensor, valid: torch.Tensor, vocabulary: Sequence[str],
                         k: int = 3) -> list[list[tuple[str, float]]]:
    """The ``k`` words each valid object of one image pulls toward (rows of ``P^(i)``).

    Args: ``object_text`` ``(K, n)``; ``valid`` ``(K,)`` bool (either on any device).  Returns one
    list per valid object.
    """
    rows = object_text[valid.bool().to(object_text.device)]
    vals, idx = rows.topk(min(k, rows.shape[1]), dim=1) if rows.numel() else (rows, rows.long())
    return [[(vocabulary[j], float(v)) for v, j in zip(vr, ir)] for vr, ir in zip(vals.tolist(), idx.tolist())]


def plot_object_words(image: Image.Image, objects: ObjectMasks, object_text: torch.Tensor,
                      vocabulary: Sequence[str], k: int = 3, truth: Sequence[str] = (),
                      ax: Axes | None = None) -> Axes:
    """The explanation figure: an image, its objects, and the words each object pulls toward.

    Each object's mask is tinted and boxed, numbered, and listed beside the image with its ``k``
    most probable words (its row of ``P^(i)``); words written in the image (``truth``) are
    marked with a ✓.

    Args:
        image: the RGB image.
        objects: its :class:`course_utils.clip.masks.ObjectMasks` (``K`` objects).
        object_text: ``(K', n)`` rows of ``P^(i)`` for the first ``K' <= K`` objects (padding rows
            beyond ``K`` are ignored).
        vocabulary: the ``n`` words.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    n_obj = min(len(objects), object_text.shape[0])
    colours = plt.get_cmap("tab10")
    for j in range(n_obj):
        m = objects.masks[j].cpu().numpy()
        x[m] = 0.6 * x[m] + 0.4 * np.asarray(colours(j % 10)[:3])
    ax.imshow(x)
    lines = []
    truth_set = set(truth)
    for j in range(n_obj):
        x1, y1, x2, y2 = objects.boxes[j].tolist()
        c = colours(j % 10)
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=1.5))
        ax.text(x1, y1, str(j + 1), color="white", fontsize=8, backgroundcolor=c, va="bottom")
        vals, idx = object_text[j].topk(min(k, object_text.shape[1]))
        words = ", ".join(f"{vocabulary[i]}{' ✓' if vocabulary[i] in truth_set else ''} {v:.2f}"
                          for v, i in zip(vals.tolist(), idx.tolist()))
        lines.append(f"{j + 1}: {words}")
    ax.set_axis_off()
    ax.text(1.02, 1.0, "\n".join(lines) if lines else "no objects: ODITS uses the image alone",
            transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    return ax
