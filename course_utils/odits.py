"""ODITS, the object-driven image–text similarity model of seed 004 Ch. 3 (notebook 08).

The thesis designs ODITS (§3.1, Fig. 3.1, Table 3.1) but never trains or measures it; this module
builds it on top of a CLIP, trains it with the course's loop and compares it with that CLIP.

Notation (Table 3.1), for image ``i`` with ``K_i`` objects and a vocabulary of ``n`` words::

    E_X ∈ R^d            CLIP_image(X)                       image embedding
    E_M ∈ R^{K_i x d}    CLIP_image(M_j ∘ X), j = 1..K_i     object embeddings
    c   ∈ [0,1]^{K_i}    object confidences (conf)
    E_T ∈ R^{n x d}      CLIP_text(W)                        vocabulary embeddings
    P   ∈ [0,1]^{K_i x n}  softmax_k(s · cos(E_M_j, E_T_k))   object–text similarity matrix
    E^S = P E_T ∈ R^{K_i x d}                                 similarity-weighted text embeddings

The forward pass (:class:`ODITS`):

1. **Self-attention 1** (objects): tokens are the objects; ``Q = K = E^S`` (what each object
   *says*), ``V = c ∘ E_M`` (what each object *looks like*, scaled by its confidence).  The
   outputs are summed over the objects into one vector (the thesis's ``Σ_j``); we divide the sum
   by ``K_i`` so its scale does not grow with the number of objects.  See
   :func:`object_self_attention`.  As in any transformer block the layer is residual: the
   confidence-weighted mean object is added back before a LayerNorm.
2. **Self-attention 2** (image + objects): the thesis writes ``Q = K`` = the previous output and
   ``V = E_X``.  Read literally (one query, one key) the attention weight is always 1 and the
   layer is a plain linear map; we therefore run a residual attention block over the two tokens
   ``[E_X, objects]`` and average them, so the layer learns how image and objects inform each
   other.
3. **Feature enhancer** (GroundingDINO style, :class:`FeatureEnhancerLayer`): image tokens
   ``[image, objects...]`` and the vocabulary attend to each other (image→text and text→image
   cross-attention), so every image gets its own, image-aware word embeddings.
4. **CLIP-style logits**: ``s · cos(image, word)`` with CLIP's learnt temperature ``s = 1/τ``;
   the softmax over the vocabulary is the thesis's word–image probability matrix.

**No objects.** An image with ``K_i = 0`` (SAM found nothing, no boxes) falls back to the image
alone: the object token is masked out of self-attention 2 and the enhancer sees only the image
token, so the output is exactly what the no-object ablation (``use_objects=False``) gives.

**Initialisation (§3.2).** The shared parts (both CLIP towers, the temperature) are copied from a
given CLIP (notebook 07's fine-tuned one); the new layers are initialised with Xavier or Kaiming
uniform from a seeded generator (:func:`init_new_layers_`), and :func:`set_deterministic` sets the
flags of §3.2.

**Objects as CLIP inputs (background choice).** ``M ∘ X`` literally is the object on a black
frame of the full image size; a small object then fills a few pixels of CLIP's input.  We fill
the background with the image's mean colour (black is a strong, unnatural signal for CLIP) and
crop to the mask's box (plus a small margin) so the object fills the input, as a word crop does
for the course's small CLIP.  :func:`object_image` has both switches to try the literal version.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .masks import MaskSource, ObjectMasks, check_masks, masks_to_boxes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .clip_svt import ClipBundle

__all__ = [
    "object_image",
    "object_images",
    "count_statistics",
    "plot_object_counts",
    "anderson_table",
    "format_anderson_table",
    "similarity_weighted_embeddings",
    "object_self_attention",
    "init_new_layers_",
    "set_deterministic",
    "load_clip_weights",
    "CrossAttention",
    "FeatureEnhancerLayer",
    "ODITS",
    "word_class_weights",
    "class_weighted_loss",
    "make_step_fn",
    "load_start_clip",
    "finetune_like_notebook07",
    "train_odits",
    "ODITSFeatures",
    "FeatureDataset",
    "extract_features",
    "predict",
    "clip_probabilities",
    "object_max_probabilities",
    "word_spotting_metrics",
    "top_words_per_object",
    "plot_object_words",
]


# =============================================================================================
# objects: CLIP_image(M ∘ X)
# =============================================================================================


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


# =============================================================================================
# object-count analysis (Fig. 3.4-3.6, Table 3.3)
# =============================================================================================


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
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

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


def anderson_table(counts: Sequence[int] | np.ndarray, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Anderson–Darling tests of the object counts against a normal and an exponential law.

    ``scipy.stats.anderson`` estimates the law's parameters from the data and compares the
    statistic with tabulated critical values; the thesis's rule (Eq. 3.3.1) rejects H0 when the
    statistic exceeds the critical value at ``alpha`` (Table 3.3).

    Returns:
        one row per hypothesis: ``{"distribution", "statistic", "critical_value", "alpha",
        "decision", "reject"}``; ``decision`` reads "reject H0" or "do not reject H0".
    """
    from scipy import stats

    c = np.asarray(counts, dtype=np.float64).ravel()
    if c.size < 3:
        raise ValueError(f"anderson_table: need at least 3 counts, got {c.size}")
    if np.ptp(c) == 0:
        raise ValueError(f"anderson_table: all {c.size} counts equal {c[0]:g}; no law can be fitted "
                         "(the normal's standard deviation would be 0)")
    rows = []
    for dist in ("norm", "expon"):
        with warnings.catch_warnings():
            # SciPy >= 1.17 warns that the critical-value form will go; we need exactly that form
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.anderson(c, dist=dist)
        levels = np.asarray(res.significance_level, dtype=np.float64) / 100.0
        k = int(np.argmin(np.abs(levels - alpha)))
        if not math.isclose(levels[k], alpha, abs_tol=1e-9):
            raise ValueError(f"anderson_table: scipy tabulates {sorted(levels.tolist())}, not alpha={alpha}")
        stat, crit = float(res.statistic), float(res.critical_values[k])
        reject = stat > crit
        rows.append({"distribution": {"norm": "normal", "expon": "exponential"}[dist],
                     "statistic": stat, "critical_value": crit, "alpha": alpha, "reject": bool(reject),
                     "decision": "reject H0" if reject else "do not reject H0"})
    return rows


def format_anderson_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table 3.3 as text: one line per hypothesis."""
    lines = [f"{'H0: counts follow':<22}{'statistic':>11}{'crit. (5 %)':>13}  decision"]
    for r in rows:
        lines.append(f"{r['distribution'] + ' law':<22}{r['statistic']:>11.4f}"
                     f"{r['critical_value']:>13.3f}  {r['decision']}")
    return "\n".join(lines)


# =============================================================================================
# building blocks (the notebook's exercises)
# =============================================================================================


def similarity_weighted_embeddings(object_emb: torch.Tensor, text_emb: torch.Tensor,
                                   logit_scale: float | torch.Tensor = 100.0
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The object–text similarity matrix ``P`` and the similarity-weighted embeddings ``E^S``.

    ``P_jk = softmax_k(s · cos(E_M_j, E_T_k))`` and ``E^S_j = Σ_k P_jk E_T_k`` (§3.1).

    Args:
        object_emb: ``(..., K, d)`` object embeddings (any leading batch dimensions).
        text_emb: ``(n, d)`` vocabulary embeddings, ``n >= 1``.
        logit_scale: ``s = 1/τ``.

    Returns:
        ``(P, E_S)`` of shapes ``(..., K, n)`` and ``(..., K, d)``; every row of ``P`` sums to 1.
        ``E^S`` mixes the *given* text embeddings (not re-normalised).
    """
    if text_emb.ndim != 2 or text_emb.shape[0] == 0:
        raise ValueError(f"text_emb: expected a non-empty (n, d) vocabulary, got {tuple(text_emb.shape)}")
    if object_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"object_emb (..., K, {object_emb.shape[-1]}) and text_emb (n, {text_emb.shape[-1]}) "
                         "must have the same embedding size d")
    cos = F.normalize(object_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    P = (logit_scale * cos).softmax(dim=-1)
    return P, P @ text_emb


def object_self_attention(es: torch.Tensor, em: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor,
                          w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """Self-attention 1 of ODITS: objects attend to objects, summed into one vector per image.

    ``Q = E^S W_q^T``, ``K = E^S W_k^T`` (the words each object pulls toward decide who attends to
    whom), ``V = (c ∘ E_M) W_v^T`` (confidence-weighted object appearance);
    ``A = softmax(Q K^T / sqrt(d)) V`` over the image's valid objects only, and the output is
    ``(1/K_i) Σ_j A_j`` over its valid objects.

    Args:
        es: ``(B, K, d)`` similarity-weighted text embeddings ``E^S`` (padded).
        em: ``(B, K, d)`` object embeddings ``E_M`` (padded).
        conf: ``(B, K)`` confidences ``c_j``.
        valid: ``(B, K)`` bool, False for padding.
        w_q, w_k, w_v: ``(d, d)`` projection matrices (as ``nn.Linear.weight``: ``y = x W^T``).

    Returns:
        ``(B, d)``; all zeros for an image without valid objects (nothing to attend to).
    """
    d = w_q.shape[0]
    q, k = es @ w_q.T, es @ w_k.T
    v = (conf.unsqueeze(-1) * em) @ w_v.T
    scores = q @ k.transpose(1, 2) / math.sqrt(d)  # (B, K, K)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    # rows of an image without objects are all -inf: softmax would give NaN, so zero them
    attn = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
    out = (attn @ v) * valid.unsqueeze(-1)  # (B, K, d), padding rows zeroed
    n = valid.sum(dim=1, keepdim=True).clamp_min(1).to(out.dtype)
    return out.sum(dim=1) / n


def init_new_layers_(modules: Sequence[nn.Module] | nn.Module, scheme: str = "xavier",
                     generator: torch.Generator | None = None) -> None:
    """Initialise ODITS's new layers in place (§3.2), drawing only from ``generator``.

    Every ``nn.Linear`` weight and every ``nn.MultiheadAttention`` input projection gets
    Xavier uniform, ``U(±sqrt(6/(n_in+n_out)))``, or Kaiming uniform, ``U(±sqrt(6/n_in))``;
    biases are set to zero and ``nn.LayerNorm`` to weight 1, bias 0.  Modules are visited in
    ``named_modules`` order, so the same generator state gives the same weights.

    Args:
        modules: the new layers (never the shared CLIP parts: those come from the checkpoint).
        scheme: ``"xavier"`` or ``"kaiming"``.
        generator: a seeded ``torch.Generator``; the global RNG is left untouched.
    """
    if scheme not in ("xavier", "kaiming"):
        raise ValueError(f"init_new_layers_: scheme={scheme!r}, expected 'xavier' or 'kaiming'")
    if isinstance(modules, nn.Module):
        modules = [modules]

    def fill(w: torch.Tensor) -> None:
        if scheme == "xavier":
            nn.init.xavier_uniform_(w, generator=generator)
        else:  # gain sqrt(2) (a=0, ReLU) makes the bound exactly sqrt(6 / n_in)
            nn.init.kaiming_uniform_(w, a=0.0, nonlinearity="relu", generator=generator)

    with torch.no_grad():
        for root in modules:
            for _, m in root.named_modules():
                if isinstance(m, nn.Linear):
                    fill(m.weight)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.MultiheadAttention):
                    if m.in_proj_weight is not None:
                        fill(m.in_proj_weight)
                    else:
                        for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight):
                            fill(w)
                    if m.in_proj_bias is not None:
                        m.in_proj_bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    if m.weight is not None:
                        m.weight.fill_(1.0)
                    if m.bias is not None:
                        m.bias.zero_()


def set_deterministic(seed: int = 0) -> dict[str, bool]:
    """Seed everything and set §3.2's flags; return them so a notebook can print them.

    ``torch.use_deterministic_algorithms(True)`` (``warn_only`` so an op without a deterministic
    kernel warns rather than stops the notebook), ``cudnn.benchmark = False`` and
    ``cudnn.deterministic = True``.
    """
    from .env import seed_everything

    seed_everything(seed, deterministic=True)
    return {"use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.deterministic": torch.backends.cudnn.deterministic}


def load_clip_weights(clip: nn.Module, path: str | Path) -> nn.Module:
    """Load a fine-tuned CLIP (notebook 07) into ``clip`` in place and return it.

    Accepts a checkpoint of :func:`course_utils.train.fit` (``epoch_XXX.pt``), a plain
    ``state_dict`` saved with ``torch.save`` or a small-CLIP ``.safetensors`` file; ``.pt`` files
    are read with ``weights_only=True``.  Keys must match ``clip``'s exactly (the message of
    ``load_state_dict`` names the ones that do not).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from .clip_svt import load_small_clip_state

        state = load_small_clip_state(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "format_version" in state and "model" in state:
            state = state["model"]  # a course_utils.train checkpoint
    clip.load_state_dict(state)
    return clip


# =============================================================================================
# the layers
# =============================================================================================


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` tokens over ``context`` tokens (no residual, no norm).

    Either side may be shared by the whole batch (2-D ``(L, d)``): its projection is then
    computed once.  When the queries far outnumber the keys (a vocabulary of thousands of words
    attending to a few image tokens) the output projection is applied to the values before the
    attention sum, which is the same linear map but costs ``B·L_k·d²`` instead of ``B·L_q·d²``.
    """

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttention: dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads = dim, heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` or ``(L, d)`` → ``(B|1, h, L, d/h)``."""
        if x.ndim == 2:
            x = x.unsqueeze(0)
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor,
                context_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ``query`` ``(B, L_q, d)`` or ``(L_q, d)``; ``context`` ``(B, L_k, d)`` or ``(L_k, d)``;
        ``context_valid`` ``(B, L_k)`` bool (False = padding).  Returns ``(B, L_q, d)``."""
        q, k = self._split(self.q(query)), self._split(self.k(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dim // self.heads)  # (B, h, L_q, L_k)
        if context_valid is not None:
            scores = scores.masked_fill(~context_valid[:, None, None, :], float("-inf"))
        attn = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
        v = self._split(self.v(context))  # (B|1, h, L_k, d/h)
        L_q, L_k = attn.shape[-2], attn.shape[-1]
        if L_q > 4 * L_k:
            # fold W_o into the values: o(concat_h A_h V_h) = Σ_h A_h (V_h W_o,h^T), and do the
            # sum over heads and keys as one matmul so no (B, h, L_q, d) tensor is ever made
            w_o = self.o.weight.view(self.dim, self.heads, self.dim // self.heads).permute(1, 2, 0)
            vo = (v @ w_o).expand(attn.shape[0], -1, -1, -1)  # (B, h, L_k, d)
            B, h = attn.shape[:2]
            out = attn.permute(0, 2, 1, 3).reshape(B, L_q, h * L_k) @ vo.reshape(B, h * L_k, self.dim)
            out = out + self.o.bias  # (B, L_q, d)
        else:
            out = attn @ v  # (B, h, L_q, d/h)
            out = self.o(out.transpose(1, 2).reshape(out.shape[0], L_q, self.dim))
        return out


class FeatureEnhancerLayer(nn.Module):
    """One GroundingDINO-style feature-enhancer layer: image tokens ↔ vocabulary.

    Image tokens first attend to each other (GroundingDINO uses deformable attention over a
    feature map; ODITS has a handful of tokens, so plain self-attention), then both directions of
    cross-attention run on the same inputs: image→text updates the image tokens, text→image gives
    every image its own copy of the vocabulary, followed by an FFN on the image tokens.  Text
    self-attention and the text FFN of GroundingDINO are left out: the vocabulary is a set of
    independent words (no sentence to contextualise), and an FFN on ``B x n`` word tokens would
    dominate the cost for thousands of words.
    """

    def __init__(self, dim: int, heads: int = 4, ff_mult: int = 2) -> None:
        super().__init__()
        self.self_attn = CrossAttention(dim, heads)
        self.image_to_text = CrossAttention(dim, heads)
        self.text_to_image = CrossAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.norm_self, self.norm_img, self.norm_ffn, self.norm_txt = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, image_tokens: torch.Tensor, image_valid: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``image_tokens`` ``(B, L, d)``, ``image_valid`` ``(B, L)`` bool, ``text`` ``(n, d)``.

        Returns:
            ``(image_tokens (B, L, d), text (B, n, d))``, both updated.
        """
        x = self.norm_self(image_tokens + self.self_attn(image_tokens, image_tokens, image_valid))
        img = self.norm_img(x + self.image_to_text(x, text))
        txt = self.norm_txt(text.unsqueeze(0) + self.text_to_image(text, x, image_valid))
        img = self.norm_ffn(img + self.ffn(img))
        return img, txt


class ODITS(nn.Module):
    """Object-Driven Image and Text Similarity (seed 004 §3.1, Fig. 3.1).

    Args:
        clip: the CLIP to build on (open_clip ``CLIP``; notebook 07's fine-tuned one).  Its two
            towers and its temperature are the *shared* parts; pass a copy if the original must
            stay untouched by training.
        heads: attention heads of self-attention 2 and the enhancer (self-attention 1 is the
            single-head layer of :func:`object_self_attention`).
        ff_mult: hidden width of the enhancer's FFN, in multiples of ``d``.
        init: ``"xavier"`` or ``"kaiming"`` for the new layers.
        seed: seeds the new layers' initialisation (same seed, same weights).
        use_objects: ``False`` is the ablation without objects (image + vocabulary only).
        freeze_clip: keep the shared parts fixed (no gradients): the ``cpu`` profile trains only
            the new layers, on embeddings computed once.
        similarity_fn, attention_fn, init_fn: replacements for :func:`similarity_weighted_embeddings`,
            :func:`object_self_attention` and :func:`init_new_layers_` with the same signatures
            (notebook 08 passes the student's, once checked).

    Attributes:
        embed_dim: ``d``.
    """

    def __init__(self, clip: nn.Module, *, heads: int = 4, ff_mult: int = 2, init: str = "xavier",
                 seed: int = 0, use_objects: bool = True, freeze_clip: bool = True,
                 similarity_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                 attention_fn: Callable[..., torch.Tensor] | None = None,
                 init_fn: Callable[..., None] | None = None) -> None:
        super().__init__()
        self.clip = clip
        # the notebook plugs in the student's versions (checked against these defaults first)
        self.similarity_fn = similarity_fn or similarity_weighted_embeddings
        self.attention_fn = attention_fn or object_self_attention
        d = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else int(clip.embed_dim)
        self.embed_dim = d
        self.use_objects = use_objects
        self.freeze_clip = freeze_clip
        # the temperature is shared with CLIP: start from its value, learn it further
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone().float())
        # P^(i) is "computed using CLIP" (§3.1): CLIP's temperature, fixed
        self.register_buffer("object_logit_scale", clip.logit_scale.detach().exp().float().clone())
        with torch.random.fork_rng():  # module constructors draw from the global RNG: keep it clean
            torch.manual_seed(seed)
            self.sa1_q, self.sa1_k, self.sa1_v = (nn.Linear(d, d, bias=False) for _ in range(3))
            self.sa1_out = nn.Linear(d, d)
            self.norm_sa1 = nn.LayerNorm(d)
            self.sa2 = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm_sa2 = nn.LayerNorm(d)
            self.enhancer = FeatureEnhancerLayer(d, heads, ff_mult)
        self.init_scheme = init
        (init_fn or init_new_layers_)(self.new_modules(), init, torch.Generator().manual_seed(seed))
        if freeze_clip:
            for p in self.clip.parameters():
                p.requires_grad_(False)
        self.register_buffer("text_emb", torch.zeros(0, d), persistent=False)
        self.vocabulary: list[str] = []

    # ---------------------------------------------------------------- parts and vocabulary
    def new_modules(self) -> list[nn.Module]:
        """The layers ODITS adds to CLIP (initialised by :func:`init_new_layers_`)."""
        return [self.sa1_q, self.sa1_k, self.sa1_v, self.sa1_out, self.norm_sa1, self.sa2, self.norm_sa2,
                self.enhancer]

    def shared_parameter_names(self) -> list[str]:
        """Names of the parameters copied from CLIP (``clip.*`` and ``logit_scale``)."""
        return [n for n, _ in self.named_parameters() if n.startswith("clip.") or n == "logit_scale"]

    def set_vocabulary(self, words: Sequence[str], text_emb: torch.Tensor | None = None,
                       tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None) -> None:
        """Fix the vocabulary ``W`` and its embeddings ``E_T`` ``(n, d)``.

        Pass ``text_emb`` (precomputed, L2-normalised) or a ``tokenizer`` (encoded here with the
        shared text tower).

        Raises:
            ValueError: an empty vocabulary, or embeddings that do not match it.
        """
        words = list(words)
        if not words:
            raise ValueError("ODITS.set_vocabulary: the vocabulary is empty; ODITS scores images "
                             "against words, so it needs at least one word")
        if text_emb is None:
            if tokenizer is None:
                raise ValueError("ODITS.set_vocabulary: pass text_emb=(n, d) or a tokenizer")
            with torch.no_grad():
                dev = self.logit_scale.device
                text_emb = F.normalize(self.clip.encode_text(tokenizer(words).to(dev)).float(), dim=-1)
        if text_emb.shape != (len(words), self.embed_dim):
            raise ValueError(f"ODITS.set_vocabulary: text_emb has shape {tuple(text_emb.shape)}, "
                             f"expected ({len(words)}, {self.embed_dim})")
        self.vocabulary = words
        self.text_emb = text_emb.detach().float().to(self.logit_scale.device)

    # ---------------------------------------------------------------- forward
    def forward(self, image_emb: torch.Tensor, object_emb: torch.Tensor, conf: torch.Tensor,
                valid: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Word logits for a batch of images.

        Args:
            image_emb: ``(B, d)`` ``E_X``.
            object_emb: ``(B, K, d)`` ``E_M``, zero-padded to the batch's largest ``K`` (``K`` may be 0).
            conf: ``(B, K)`` confidences; valid: ``(B, K)`` bool, False for padding.
            text_emb: ``(n, d)`` ``E_T``; default the vocabulary of :meth:`set_vocabulary`.

        Returns:
            ``{"logits": (B, n), "object_text": (B, K, n) P^(i), "image": (B, d) fused image
            embedding (L2-normalised), "has_objects": (B,) bool}``.
        """
        E_T = self.text_emb if text_emb is None else text_emb
        if E_T.ndim != 2 or E_T.shape[0] == 0:
            raise ValueError("ODITS: the vocabulary is empty (call set_vocabulary with at least one word)")
        B, d = image_emb.shape
        if object_emb.shape[0] != B or object_emb.shape[-1] != d or object_emb.ndim != 3:
            raise ValueError(f"ODITS: object_emb must be (B={B}, K, d={d}), got {tuple(object_emb.shape)}")
        if conf.shape != object_emb.shape[:2] or valid.shape != object_emb.shape[:2]:
            raise ValueError(f"ODITS: conf {tuple(conf.shape)} and valid {tuple(valid.shape)} must both be "
                             f"(B, K) = {tuple(object_emb.shape[:2])}")
        valid = valid.bool() if self.use_objects else torch.zeros_like(valid, dtype=torch.bool)
        has_obj = valid.any(dim=1)
        # CLIP's unit-norm embeddings have components of size ~1/sqrt(d), the LayerNorm'd outputs
        # of the new layers ~1: rescale the inputs by sqrt(d) so residual sums mix comparable
        # sizes (otherwise the first residual branch drowns the word identities).  Cosine logits
        # and P^(i) do not depend on this scale.
        s = math.sqrt(d)
        image_emb, object_emb, E_T = s * image_emb, s * object_emb, s * E_T

        # object-text similarity and self-attention 1 (objects → one vector)
        P, E_S = self.similarity_fn(object_emb, E_T, self.object_logit_scale)
        pooled = self.attention_fn(E_S, object_emb, conf, valid, self.sa1_q.weight,
                                   self.sa1_k.weight, self.sa1_v.weight)
        # residual, as in any transformer block: the pooled values' input (the confidence-
        # weighted mean object) plus what attention adds.  Without it the objects would reach the
        # output only through freshly initialised projections, which 100 training images cannot
        # align with CLIP's word space for words never seen in training.
        n_obj = valid.sum(dim=1, keepdim=True).clamp_min(1).to(object_emb.dtype)
        mean_obj = (conf.unsqueeze(-1) * object_emb * valid.unsqueeze(-1)).sum(dim=1) / n_obj
        objects = self.norm_sa1(mean_obj + self.sa1_out(pooled)) * has_obj[:, None]

        # self-attention 2: a transformer block over the tokens [image, objects] (the object
        # token is masked out when there is none); the fused image is the mean of its tokens
        tokens = torch.stack([image_emb, objects], dim=1)  # (B, 2, d)
        pad = torch.stack([torch.zeros_like(has_obj), ~has_obj], dim=1)  # True = ignore
        mixed, _ = self.sa2(tokens, tokens, tokens, key_padding_mask=pad, need_weights=False)
        z2 = self.norm_sa2(tokens + mixed)
        fused = torch.where(has_obj[:, None], z2.mean(dim=1), z2[:, 0])

        # feature enhancer: [fused image, objects...] ↔ vocabulary
        img_tokens = torch.cat([fused.unsqueeze(1), object_emb], dim=1)
        img_valid = torch.cat([torch.ones_like(has_obj).unsqueeze(1), valid], dim=1)
        img, txt = self.enhancer(img_tokens, img_valid, E_T)

        z = F.normalize(img[:, 0], dim=-1)
        t = F.normalize(txt, dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        logits = scale * torch.einsum("bd,bnd->bn", z, t)
        return {"logits": logits, "object_text": P, "image": z, "has_objects": has_obj}

    def embed(self, images: torch.Tensor, objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels → embeddings with the shared image tower (end-to-end training in ``full``).

        Args: ``images`` ``(B, 3, H, W)``; ``objects`` ``(B, K, 3, H, W)`` preprocessed crops.
        Returns: ``(E_X (B, d), E_M (B, K, d))``, L2-normalised.
        """
        B, K = objects.shape[:2]
        e_x = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        if K == 0:
            return e_x, e_x.new_zeros(B, 0, self.embed_dim)
        e_m = F.normalize(self.clip.encode_image(objects.flatten(0, 1)).float(), dim=-1)
        return e_x, e_m.view(B, K, -1)


# =============================================================================================
# loss and training step
# =============================================================================================


def word_class_weights(train_targets: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """Class weights for the imbalanced vocabulary: ``w_k ∝ (1 + count_k)^(-power)``.

    Args:
        train_targets: ``(N, n)`` bool, word ``k`` is written in training image ``i``.
        power: 0 gives equal weights, 1 inverse frequency; 0.5 (default) damps the long tail's
            noise while still lifting rare words.

    Returns:
        ``(n,)`` float32 weights, mean 1 over the words that occur in training.
    """
    counts = train_targets.float().sum(dim=0)
    w = (1.0 + counts) ** (-power)
    seen = counts > 0
    if seen.any():
        w = w / w[seen].mean()
    return w


def class_weighted_loss(logits: torch.Tensor, targets: torch.Tensor,
                        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy of the word softmax against an image's words.

    The target of image ``i`` spreads its mass uniformly over its words (the thesis's assumption
    that every written word is equally likely, §2.3.2); each word's term is scaled by its class
    weight and the result is normalised by the image's total weight::

        L_i = - Σ_k w_k y_ik log p_ik / Σ_k w_k y_ik,   p_i = softmax(logits_i)

    Images without any target word are left out of the mean.

    Args:
        logits: ``(B, n)``; targets: ``(B, n)`` bool or 0/1; class_weights: ``(n,)`` (default 1).

    Returns:
        a scalar tensor (0 with a gradient when no image has a target).
    """
    y = targets.float()
    w = y if class_weights is None else y * class_weights.to(y)[None, :]
    logp = logits.log_softmax(dim=-1)
    norm = w.sum(dim=1)
    keep = norm > 0
    per_image = -(w * logp).sum(dim=1) / norm.clamp_min(1e-12)
    if not keep.any():
        return logits.sum() * 0.0
    return per_image[keep].mean()


def make_step_fn(class_weights: torch.Tensor | None = None
                 ) -> Callable[[ODITS, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A ``step_fn`` for :func:`course_utils.train.fit` on batches of :class:`FeatureDataset`.

    The batch is a dict with ``image_emb (B, d)``, ``object_emb (B, K, d)``, ``conf (B, K)``,
    ``valid (B, K)`` and ``targets (B, n)``; or ``images``/``objects`` pixels instead of the two
    embeddings (end-to-end, the shared towers unfrozen).  Returns the loss and the batch's top-1
    hit rate (share of images whose most probable word is one of theirs).
    """

    def step_fn(model: ODITS, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "images" in batch:
            e_x, e_m = model.embed(batch["images"], batch["objects"])
        else:
            e_x, e_m = batch["image_emb"], batch["object_emb"]
        out = model(e_x, e_m, batch["conf"], batch["valid"])
        targets = batch["targets"]
        loss = class_weighted_loss(out["logits"], targets, class_weights)
        with torch.no_grad():
            top = out["logits"].argmax(dim=1)
            hit = targets.gather(1, top[:, None]).float().mean()
        return {"loss": loss, "top1_hit": hit}

    return step_fn


# =============================================================================================
# the CLIP ODITS starts from, and training (shared by notebook 08 and benchmarks/odits.py)
# =============================================================================================


def load_start_clip(kind: str, profile: str, checkpoint: str | Path | None = None,
                    device: str | torch.device = "cpu") -> ClipBundle:
    """The CLIP ODITS is initialised from (§3.2): the profile's CLIP, then notebook 07's weights.

    Notebook 07's weights are ``checkpoint`` when given, else the best-precision checkpoint that
    notebook 07 saved for ``profile`` (:func:`course_utils.svt_finetune.best_checkpoint_path`),
    if it exists and is newer than the shipped small-CLIP weights (an older file was fine-tuned
    from something else).  ``bundle.info["finetuned"]`` says whether they were loaded.

    Raises:
        FileNotFoundError: ``checkpoint`` was given and does not exist.
    """
    from . import svt_finetune as sf

    bundle = sf.load_model(kind, device=device)
    path = Path(checkpoint) if checkpoint else sf.best_checkpoint_path(profile)
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


def finetune_like_notebook07(bundle: ClipBundle, train: Any, test: Any, svt_cfg: Mapping[str, Any],
                             progress: bool = False) -> str:
    """Notebook 07's recipe, for when its checkpoint is missing; changes ``bundle.model`` in place.

    Fine-tunes with Algorithm 1 and the profile's Table 2.5 settings (``svt_cfg``), keeps the
    checkpoint with the best test precision, as the thesis and notebook 07 do, and returns a line
    saying what was done (appended to ``bundle.weights``).
    """
    import tempfile

    from . import svt_finetune as sf
    from .train import checkpoint_path, load_checkpoint

    ev = sf.build_eval_set(test, bundle)
    zero = sf.evaluate(bundle.model, ev)
    ckpt_dir = Path(tempfile.mkdtemp(prefix="odits_ft_"))
    pairs = sf.pair_dataset(train, bundle, pads=svt_cfg["ft_crop_pads"])
    sf.finetune(bundle.model, pairs, svt_cfg, ckpt_dir, resume=False, seed=svt_cfg["seed"], progress=progress)
    rows = sf.evaluate_checkpoints(bundle.model, ev, ckpt_dir, sf.checkpoint_epochs(svt_cfg),
                                   zero_shot=zero, verbose=False)
    best = sf.best_by(rows, "precision")
    load_checkpoint(checkpoint_path(ckpt_dir, best["epoch"]), model=bundle.model)
    bundle.model.eval()
    line = (f" + fine-tuned here with notebook 07's recipe (checkpoint +{best['epoch']} of "
            f"{svt_cfg['ft_epochs']}, chosen by precision: {zero['precision']:.4f} -> {best['precision']:.4f} "
            f"on {ev.unit}s)")
    bundle.weights += line
    bundle.info["finetuned"] = True
    return line


def train_odits(clip: nn.Module, feats: ODITSFeatures, words: Sequence[str], text_emb: torch.Tensor,
                cfg: Mapping[str, Any], *, use_objects: bool = True, device: str | torch.device = "cpu",
                progress: bool = False, **model_kwargs: Any) -> tuple[ODITS, Any, dict[str, Any]]:
    """Build ODITS on a deep copy of ``clip`` and train its new layers with the shared loop.

    Args:
        clip: the starting CLIP (left untouched).
        feats: the training split's :class:`ODITSFeatures`; words, text_emb: the vocabulary ``(n, d)``.
        cfg: the profile's ``odits`` section (heads, ff_mult, init, seed, freeze_clip, epochs,
            batch_size, lr, weight_decay, class_weight_power, grad_clip).
        use_objects: False trains the ablation without objects.
        model_kwargs: passed to :class:`ODITS` (e.g. the notebook's ``similarity_fn``).

    Returns:
        ``(model, history, info)``; ``info`` has ``train_s``, ``final_loss``, ``trainable_params``.
    """
    import copy
    import time

    from .train import fit

    set_deterministic(cfg["seed"])
    model = ODITS(copy.deepcopy(clip), heads=cfg["heads"], ff_mult=cfg["ff_mult"], init=cfg["init"],
                  seed=cfg["seed"], use_objects=use_objects, freeze_clip=cfg["freeze_clip"], **model_kwargs)
    model.set_vocabulary(words, text_emb)
    weights = word_class_weights(feats.targets, cfg["class_weight_power"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    t0 = time.perf_counter()
    hist = fit(model, make_step_fn(weights), FeatureDataset(feats), epochs=cfg["epochs"],
               batch_size=cfg["batch_size"], optimizer=opt, seed=cfg["seed"], grad_clip=cfg["grad_clip"],
               progress=progress, desc="ODITS" if use_objects else "ODITS without objects", device=device)
    info = {"train_s": time.perf_counter() - t0, "final_loss": hist.train["loss"][-1],
            "trainable_params": sum(p.numel() for p in params)}
    return model, hist, info


# =============================================================================================
# features of a split
# =============================================================================================


@dataclass
class ODITSFeatures:
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


class FeatureDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`ODITSFeatures`; item ``i`` is a dict of tensors."""

    def __init__(self, feats: ODITSFeatures) -> None:
        self.f = feats

    def __len__(self) -> int:
        return len(self.f)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        f = self.f
        return {"image_emb": f.image_emb[i], "object_emb": f.object_emb[i], "conf": f.conf[i],
                "valid": f.valid[i], "targets": f.targets[i]}


def extract_features(bundle: ClipBundle, records: Sequence[Any], mask_source: MaskSource,
                     vocabulary: Sequence[str], max_objects: int | None = None,
                     background: str = "mean", crop: bool = True, batch_size: int = 64,
                     progress: bool = False) -> ODITSFeatures:
    """Masks → objects → CLIP embeddings for every image of an SVT split.

    Args:
        bundle: the CLIP (its ``encode_images`` gives L2-normalised embeddings).
        records: :class:`course_utils.svt.SVTImage` records (``load()``, ``tags``, ``lexicon``).
        mask_source: e.g. :class:`course_utils.masks.BoxMaskSource` or ``SamMaskSource``.
        vocabulary: the ``n`` words (columns of ``targets``/``lexicon``); must be non-empty.
        max_objects: keep at most this many objects per image (most confident first).
        background, crop: how objects become images (see :func:`object_image`).

    Returns:
        :class:`ODITSFeatures`.
    """
    from .clip_svt import positives_matrix

    if not vocabulary:
        raise ValueError("extract_features: the vocabulary is empty")
    images, crops, owner, confs, counts, labels = [], [], [], [], [], []
    it = records
    if progress:
        from tqdm.auto import tqdm
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
        confs.append(objs.confidence[keep])
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
    return ODITSFeatures(e_x, object_emb, conf, valid, targets, lexicon, torch.tensor(counts),
                         [r.image_name for r in records], labels)


# =============================================================================================
# evaluation
# =============================================================================================


@torch.no_grad()
def predict(model: ODITS, feats: ODITSFeatures, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """ODITS's word probabilities ``P`` ``(N, n)`` (softmax over the vocabulary) and ``P^(i)``.

    Returns ``{"P": (N, n), "object_text": (N, K_max, n)}``.
    """
    was = model.training
    model.eval()
    dev = model.logit_scale.device
    Ps, Os = [], []
    for s in range(0, len(feats), batch_size):
        sl = slice(s, s + batch_size)
        out = model(feats.image_emb[sl].to(dev), feats.object_emb[sl].to(dev), feats.conf[sl].to(dev),
                    feats.valid[sl].to(dev))
        Ps.append(out["logits"].softmax(dim=-1).cpu())
        Os.append(out["object_text"].cpu())
    model.train(was)
    return {"P": torch.cat(Ps), "object_text": torch.cat(Os)}


def clip_probabilities(feats: ODITSFeatures, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The CLIP baseline: ``softmax(s · E_X E_T^T)`` over the vocabulary, ``(N, n)``."""
    from .clip_svt import word_image_probabilities

    return word_image_probabilities(feats.image_emb, text_emb, logit_scale)


def object_max_probabilities(feats: ODITSFeatures, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """A training-free object baseline: each word scores its best-matching object.

    ``logit_ik = s · max_j cos(E_M_j, E_T_k)`` over image ``i``'s objects (the image itself when
    it has none), then a softmax over the vocabulary.  It tells how much of ODITS's result the
    objects alone explain, without any learnt fusion.  Returns ``(N, n)``.
    """
    cos_obj = torch.einsum("nkd,wd->nkw", F.normalize(feats.object_emb, dim=-1), text_emb)
    cos_obj = cos_obj.masked_fill(~feats.valid[:, :, None], float("-inf"))
    best = cos_obj.max(dim=1).values if cos_obj.shape[1] else torch.full(
        (len(feats), text_emb.shape[0]), float("-inf"))
    img = feats.image_emb @ text_emb.T
    none = ~feats.valid.any(dim=1)
    best = torch.where(none[:, None], img, best)
    return (logit_scale * best).softmax(dim=-1)


def word_spotting_metrics(P: torch.Tensor, targets: torch.Tensor, lexicon: torch.Tensor) -> dict[str, float]:
    """Table 2.6's five columns (approach 2) plus approach 1 and lexicon-50 top-1, per image.

    Args:
        P: ``(N, n)`` word probabilities (rows sum to 1).
        targets: ``(N, n)`` bool, the thesis's ``W_i^+`` (the words written in image ``i``).
        lexicon: ``(N, n)`` bool, each image's lexicon.

    Returns:
        ``accuracy, precision, recall, f1`` (soft counts, Eq. 2.3.10-2.3.13, macro over images),
        ``uniformity`` (mean normalised similarity entropy over images with ≥ 2 words, NaN-free:
        0 when no image qualifies), the same four with Youden thresholds (``*_youden``), and
        ``lexicon50_top1``: share of images whose most probable lexicon word is one of theirs.
    """
    from .clip_svt import (
        classification_metrics,
        normalised_similarity_entropy,
        soft_confusion,
        threshold_confusion,
        youden_thresholds,
    )

    out = classification_metrics(soft_confusion(P, targets))
    ent = normalised_similarity_entropy(P, targets)
    out["uniformity"] = float(torch.nanmean(ent)) if (~torch.isnan(ent)).any() else 0.0
    y1 = classification_metrics(threshold_confusion(P, targets, youden_thresholds(P, targets)))
    out.update({f"{k}_youden": v for k, v in y1.items()})
    pick = P.masked_fill(~lexicon, -1.0).argmax(dim=1)
    out["lexicon50_top1"] = float(targets.gather(1, pick[:, None]).float().mean())
    return {k: float(v) for k, v in out.items()}


def top_words_per_object(object_text: torch.Tensor, valid: torch.Tensor, vocabulary: Sequence[str],
                         k: int = 3) -> list[list[tuple[str, float]]]:
    """The ``k`` words each valid object of one image pulls toward (rows of ``P^(i)``).

    Args: ``object_text`` ``(K, n)``; ``valid`` ``(K,)`` bool.  Returns one list per valid object.
    """
    rows = object_text[valid.bool()]
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
        objects: its :class:`course_utils.masks.ObjectMasks` (``K`` objects).
        object_text: ``(K', n)`` rows of ``P^(i)`` for the first ``K' <= K`` objects (padding rows
            beyond ``K`` are ignored).
        vocabulary: the ``n`` words.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    n_obj = min(len(objects), object_text.shape[0])
    colours = plt.get_cmap("tab10")
    for j in range(n_obj):
        m = objects.masks[j].numpy()
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
