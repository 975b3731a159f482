"""SCAN: stacked cross attention for image-text matching (seed 003 Ch. 3-4; Lee et al. 2018).

The model pieces, in the order notebook 04 builds them (the pipelines around them -- training the
backbone, pooling and caching region features, the Table 4.1 grid -- are recipes, in
:mod:`course_utils.recipes.retrieval`):

* **Image side** (:class:`Backbone`, :func:`pool_regions`, :class:`AttributeHead`): as SCAN does
  with bottom-up attention, a CNN is trained *once* (here: a small conv net, on attribute
  classification of object boxes), and ``torchvision.ops.roi_align`` pools one feature vector per
  region.  Fine-grained = ``k`` regions per image, coarse = ``k = 1`` (the whole image).
  :class:`ImageEncoder` projects them to the joint space.
* **Text side** (:class:`CaptionEncoder`): word embeddings -> GRU, bidirectional with the two
  directions averaged (or one-directional for the ablation of Table 4.1), l2-normalised.
* **Stacked cross attention** (:func:`scan_scores`): text-image (t-i: each word attends to the
  regions) or image-text (i-t: each region attends to the words), with clipped l2-normalisation,
  inverse temperature ``lambda_softmax`` and LogSumExp (``lambda_lse``) or AVG pooling.
* **Loss** (:func:`hardest_negative_triplet_loss`, :func:`scan_step_fn`): hinge triplet loss with
  the hardest negative in the batch (margin 0.2), after a warm-up on the sum of violations.
* **Evaluation** (:func:`scan_similarity`, :func:`recall_at_k`): every image against every caption
  in shards, R@1/5/10 both ways and rsum.  :func:`scan_similarity_loop` is the same score written
  as a plain loop over (caption, image) pairs straight from the equations; the tests check that
  both agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torchvision.ops import roi_align

from .captions import COLORS, SIZES
from .devices import module_device
from .shapes import SHAPES

EPS = 1e-8

# ----------------------------------------------------------------------------------------------
# Image side: a small CNN trained once, regions pooled with roi_align


class Backbone(nn.Module):
    """A three-layer conv net: ``(B, 3, H, W) -> (B, 2C, H/2, W/2)``.

    Small on purpose: on two CPU cores it trains in well under a minute, and like the bottom-up
    attention features of SCAN it is then frozen and run once per image.
    """

    def __init__(self, channels: int = 16):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.out_channels = 2 * c
        self.stride = 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def pool_regions(fmap: torch.Tensor, boxes: Sequence[torch.Tensor], pool: int, stride: int) -> torch.Tensor:
    """ROI-align ``boxes`` (per image ``(k_i, 4)`` in pixels) from ``fmap`` ``(B, C, h, w)``.

    Returns ``(sum k_i, C * pool * pool)``.
    """
    for i, b in enumerate(boxes):
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"boxes[{i}]: expected shape (k, 4), got {tuple(b.shape)}")
    out = roi_align(fmap, [b.float() for b in boxes], output_size=pool, spatial_scale=1.0 / stride,
                    sampling_ratio=2, aligned=True)
    return out.flatten(1)


class AttributeHead(nn.Module):
    """Predicts colour, shape and size of a pooled region (the backbone's training task)."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.fc = nn.Linear(feat_dim, len(COLORS) + len(SHAPES) + len(SIZES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.fc(x)
        a, b = len(COLORS), len(COLORS) + len(SHAPES)
        return {"color": out[:, :a], "shape": out[:, a:b], "size": out[:, b:]}


# ----------------------------------------------------------------------------------------------
# Encoders


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """``x / (||x|| + eps)`` along ``dim`` (SCAN's l2norm: a zero vector stays zero)."""
    return x / (x.norm(dim=dim, keepdim=True) + eps)


class ImageEncoder(nn.Module):
    """Region features ``(B, k, feat_dim)`` -> l2-normalised ``(B, k, embed_dim)``."""

    def __init__(self, feat_dim: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(feat_dim, embed_dim)
        # Xavier as in SCAN: keeps the initial cosine similarities spread out.
        r = math.sqrt(6.0) / math.sqrt(feat_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 3:
            raise ValueError(f"region features: expected shape (B, k, feat_dim), got {tuple(feats.shape)}")
        if feats.shape[1] == 0:
            raise ValueError(f"region features of shape {tuple(feats.shape)}: an image with zero "
                             "regions cannot be matched; give at least the whole-image box (k = 1)")
        return l2norm(self.fc(feats))


class CaptionEncoder(nn.Module):
    """Token ids ``(B, L)`` + lengths ``(B,)`` -> l2-normalised word features ``(B, L, embed_dim)``.

    Bidirectional: the forward and backward GRU states of each word are *averaged* (SCAN), so the
    word feature has ``embed_dim`` entries either way.  Padded positions are zero.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, bidirectional: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True, bidirectional=bidirectional)
        self.bidirectional = bidirectional
        self.embed_dim = embed_dim

    def packed_words(self, tokens: torch.Tensor, lengths: torch.Tensor) -> PackedSequence:
        """The l2-normalised word features of every real word, as a ``PackedSequence``.

        ``.data`` is ``(sum(lengths), embed_dim)``: time step ``t`` holds the ``batch_sizes[t]``
        longest captions (in ``sorted_indices`` order).  No padding is ever computed on, which is
        what a model that only pools the words (notebook 05) needs.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape (B, L), got {tuple(tokens.shape)}")
        check_lengths(lengths, tokens.shape[0])
        # Packing makes the backward direction start at each caption's last real word, not at padding.
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out = self.gru(packed)[0].data
        if self.bidirectional:
            out = (out[:, :self.embed_dim] + out[:, self.embed_dim:]) / 2
        return packed._replace(data=l2norm(out))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = pad_packed_sequence(self.packed_words(tokens, lengths), batch_first=True,
                                     total_length=tokens.shape[1])
        return out


def check_lengths(lengths: torch.Tensor, n_captions: int, max_len: int | None = None,
                  where: str = "lengths") -> None:
    """``lengths`` must be ``(n_captions,)`` with every entry in ``[1, max_len]``.

    An empty caption has no word to attend to or pool over: its score would be NaN (a softmax
    over nothing), so it is refused here, naming the caption.
    """
    if not isinstance(lengths, torch.Tensor) or lengths.ndim != 1 or lengths.shape[0] != n_captions:
        got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"{where}: expected shape ({n_captions},), one length per caption, got {got}")
    if n_captions == 0:
        return
    if bool((lengths < 1).any()):
        j = int((lengths < 1).nonzero()[0])
        raise ValueError(f"{where}: caption {j} is empty (length {int(lengths[j])}); every caption needs a word")
    if max_len is not None and bool((lengths > max_len).any()):
        j = int((lengths > max_len).nonzero()[0])
        raise ValueError(f"{where}: caption {j} has length {int(lengths[j])} but the word "
                         f"embeddings hold only {max_len} positions")


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B, max_len)`` bool, True at real words."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------------------------
# Stacked cross attention: the pieces a student writes


def clipped_l2norm(s: torch.Tensor, dim: int, mask: torch.Tensor | None = None,
                   negative_slope: float = 0.1) -> torch.Tensor:
    """SCAN's normalisation of the similarities before the softmax.

    ``[s]_+ / sqrt(sum [s]_+^2)`` along ``dim`` (the *query* axis).  The clip is a leaky ReLU
    (slope 0.1, as SCAN's code) so that negative similarities still pass a little gradient.
    ``mask`` (broadcastable to ``s``) zeroes padded entries first.
    """
    s = F.leaky_relu(s, negative_slope)
    if mask is not None:
        s = s.masked_fill(~mask, 0.0)
    return s / (s.norm(dim=dim, keepdim=True) + EPS)


def attend(query: torch.Tensor, context: torch.Tensor, lambda_softmax: float,
           context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One attention step of SCAN for one (image, caption) pair.

    Args:
        query: ``(q, d)`` l2-normalised (regions for i-t, words for t-i).
        context: ``(c, d)`` l2-normalised (words for i-t, regions for t-i).
        lambda_softmax: inverse temperature lambda_1 of the softmax.
        context_mask: ``(c,)`` bool, False at padding (never attended).

    Returns:
        ``(q, d)``: ``a_i = sum_j alpha_ij context_j`` with
        ``alpha_ij = softmax_j(lambda_1 * sbar_ij)`` and ``sbar`` the clipped l2-normalised
        cosine similarities, normalised over the queries.
    """
    s = query @ context.T                                    # (q, c) cosines
    sbar = clipped_l2norm(s, dim=0, mask=None if context_mask is None else context_mask[None, :])
    logits = lambda_softmax * sbar
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[None, :], float("-inf"))
    alpha = logits.softmax(dim=1)
    return alpha @ context


def pool_lse(r: torch.Tensor, lambda_lse: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LogSumExp pooling over the last axis: ``(1/lambda) log sum exp(lambda r)``; masked entries skipped."""
    x = lambda_lse * r
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(x, dim=-1) / lambda_lse


def pool_avg(r: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average over the last axis; masked entries skipped."""
    if mask is None:
        return r.mean(dim=-1)
    m = mask.to(r.dtype)
    return (r * m).sum(-1) / m.sum(-1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# Vectorised scores


@dataclass
class ScanConfig:
    """Which SCAN variant: ``direction`` ``"t2i"`` or ``"i2t"``, ``agg`` ``"lse"`` or ``"avg"``."""

    direction: str = "i2t"
    agg: str = "avg"
    lambda_softmax: float = 4.0
    lambda_lse: float = 6.0

    def __post_init__(self) -> None:
        if self.direction not in ("t2i", "i2t"):
            raise ValueError(f"direction must be 't2i' or 'i2t', got {self.direction!r}")
        if self.agg not in ("lse", "avg"):
            raise ValueError(f"agg must be 'lse' or 'avg', got {self.agg!r}")


def scan_scores(img: torch.Tensor, cap: torch.Tensor, lengths: torch.Tensor, cfg: ScanConfig) -> torch.Tensor:
    """SCAN similarity of every image with every caption, in one batched computation.

    Args:
        img: ``(I, k, d)`` l2-normalised region embeddings.
        cap: ``(C, n, d)`` l2-normalised word embeddings (zero at padding).
        lengths: ``(C,)`` number of real words of each caption, each in ``[1, n]``.
        cfg: the variant.

    Returns:
        ``(I, C)`` scores ``S(image, caption)``.

    Raises:
        ValueError: wrong ranks, different ``d`` of ``img`` and ``cap``, zero regions, or a
            caption of length 0 (named by index).

    Why it never forms the attended vectors: the attended vector of a query is a convex
    combination of context vectors, so its dot product with the query is ``sum alpha * s`` and its
    squared norm is ``alpha^T G alpha`` with ``G`` the context's Gram matrix (``n x n`` or
    ``k x k``).  That replaces an ``I x C x q x d`` tensor by ``I x C x q x c`` ones (d >> c).
    """
    if img.ndim != 3:
        raise ValueError(f"scan_scores: img must be (N_img, R, D) region embeddings, got shape "
                         f"{tuple(img.shape)}")
    if cap.ndim != 3:
        raise ValueError(f"scan_scores: cap must be (N_cap, L, D) word embeddings, got shape "
                         f"{tuple(cap.shape)}")
    if img.shape[1] == 0:
        raise ValueError("img has zero regions per image (shape "
                         f"{tuple(img.shape)}); SCAN needs k >= 1")
    if img.shape[2] != cap.shape[2]:
        raise ValueError(f"scan_scores: img has embedding dim D={img.shape[2]} but cap has "
                         f"D={cap.shape[2]} (shapes {tuple(img.shape)}, {tuple(cap.shape)})")
    n = cap.shape[1]
    check_lengths(lengths, cap.shape[0], n, where="scan_scores: lengths")
    wmask = length_mask(lengths, n)                          # (C, n)
    s = torch.einsum("ikd,cnd->ickn", img, cap)              # (I, C, k, n) cosines
    if cfg.direction == "i2t":
        # Queries are regions: normalise over regions, softmax over the words of each caption.
        sbar = clipped_l2norm(s, dim=2, mask=wmask[None, :, None, :])
        logits = (cfg.lambda_softmax * sbar).masked_fill(~wmask[None, :, None, :], float("-inf"))
        alpha = logits.softmax(dim=3)                        # (I, C, k, n)
        num = (alpha * s).sum(3)                             # v_i . a_i
        gram = cap @ cap.transpose(1, 2)                     # (C, n, n)
        sq = (torch.einsum("ickn,cnm->ickm", alpha, gram) * alpha).sum(3)
        r = num / (sq.clamp(min=0).sqrt() * img.norm(dim=-1)[:, None, :]).clamp(min=EPS)
        return pool_lse(r, cfg.lambda_lse) if cfg.agg == "lse" else pool_avg(r)
    # t2i: queries are words: normalise over the words, softmax over the regions.
    sbar = clipped_l2norm(s, dim=3, mask=wmask[None, :, None, :])
    alpha = (cfg.lambda_softmax * sbar).softmax(dim=2)       # (I, C, k, n), sums to 1 over k
    num = (alpha * s).sum(2)                                 # (I, C, n)
    gram = img @ img.transpose(1, 2)                         # (I, k, k)
    sq = (torch.einsum("ickn,ikl->icln", alpha, gram) * alpha).sum(2)
    r = num / (sq.clamp(min=0).sqrt() * cap.norm(dim=-1)[None]).clamp(min=EPS)
    m = wmask[None].expand_as(r)
    return pool_lse(r, cfg.lambda_lse, m) if cfg.agg == "lse" else pool_avg(r, m)


@torch.no_grad()
def scan_similarity(img: torch.Tensor, cap: torch.Tensor, lengths: torch.Tensor, cfg: ScanConfig,
                    shard: tuple[int, int] = (100, 1000)) -> torch.Tensor:
    """:func:`scan_scores` over all pairs in ``shard = (images, captions)`` blocks: ``-> (I, C)``.

    Shards bound the memory: a block holds a few ``si x sc x k x n`` tensors.  Captions are
    visited sorted by length so that each block is cut to its own longest caption (less padding).
    """
    si, sc = shard
    order = torch.argsort(lengths.cpu(), stable=True)
    lengths = lengths.to(cap.device)
    out = torch.empty(img.shape[0], cap.shape[0], dtype=img.dtype)
    for b in range(0, cap.shape[0], sc):
        idx = order[b:b + sc].to(cap.device)
        ln = lengths[idx]
        block = cap[idx, :int(ln.max())]
        for a in range(0, img.shape[0], si):
            out[a:a + si, idx.cpu()] = scan_scores(img[a:a + si], block, ln, cfg).cpu()
    return out


@torch.no_grad()
def scan_similarity_loop(img: torch.Tensor, cap: torch.Tensor, lengths: torch.Tensor,
                         cfg: ScanConfig) -> torch.Tensor:
    """The reference: a plain loop over captions and images, straight from the equations.

    For each caption ``T`` and image ``I``: ``a = attend(query, context)``,
    ``R_i = cos(query_i, a_i)``, then ``S = LSE_i`` or ``AVG_i`` of ``R``.  ``-> (I, C)``.
    """
    out = torch.empty(img.shape[0], cap.shape[0], dtype=img.dtype)
    for c in range(cap.shape[0]):
        words = cap[c, :int(lengths[c])]                      # (n_c, d)
        for i in range(img.shape[0]):
            regions = img[i]                                  # (k, d)
            query, context = (regions, words) if cfg.direction == "i2t" else (words, regions)
            attended = attend(query, context, cfg.lambda_softmax)
            r = F.cosine_similarity(query, attended, dim=1, eps=EPS)
            out[i, c] = pool_lse(r, cfg.lambda_lse) if cfg.agg == "lse" else r.mean()
    return out


# ----------------------------------------------------------------------------------------------
# Loss and metrics


def hardest_negative_triplet_loss(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                                  img_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge triplet loss of SCAN / VSE++ on a batch of matching pairs.

    Args:
        scores: ``(B, B)``, ``scores[i, j] = S(image i, caption j)``; pair ``(i, i)`` matches.
        margin: alpha.
        max_violation: True -> only the hardest negative caption and image of each pair;
            False -> the sum over all negatives.
        img_ids: ``(B,)`` image of each pair; pairs sharing an image are never negatives of each
            other (a batch can hold two captions of one image).

    Returns:
        Scalar: mean over the batch of
        ``[margin - S(I,T) + S(I,T_h)]_+ + [margin - S(I,T) + S(I_h,T)]_+``.
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square (B, B) matrix, got {tuple(scores.shape)}")
    pos = scores.diag()
    b = scores.shape[0]
    same = torch.eye(b, dtype=torch.bool, device=scores.device)
    if img_ids is not None:
        same = same | (img_ids[:, None] == img_ids[None, :])
    cost_cap = (margin + scores - pos[:, None]).clamp(min=0).masked_fill(same, 0.0)  # row i: captions for image i
    cost_img = (margin + scores - pos[None, :]).clamp(min=0).masked_fill(same, 0.0)  # col j: images for caption j
    if max_violation:
        return (cost_cap.max(dim=1).values + cost_img.max(dim=0).values).mean()
    return (cost_cap.sum(dim=1) + cost_img.sum(dim=0)).mean()


def recall_at_k(sims: torch.Tensor, cap_to_img: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent, both directions, and rsum.

    Args:
        sims: ``(I, C)`` image-caption scores.
        cap_to_img: ``(C,)`` index of each caption's image.

    Returns:
        ``{"i2t_r1", ..., "t2i_r1", ..., "rsum"}``.  Image annotation (i2t) counts a hit when *any*
        of the image's captions is within the top K; image retrieval (t2i) when the caption's image
        is.  Ties count against the query (a constant score gets no credit).
    """
    if sims.ndim != 2 or sims.shape[1] != cap_to_img.shape[0]:
        raise ValueError(f"sims {tuple(sims.shape)} and cap_to_img {tuple(cap_to_img.shape)}: "
                         "expected sims (I, C) with C = len(cap_to_img)")
    n_img, n_cap = sims.shape
    if cap_to_img.ndim != 1 or cap_to_img.dtype.is_floating_point or cap_to_img.dtype == torch.bool:
        raise ValueError(f"recall_at_k: cap_to_img must be a 1-D integer tensor, got dtype {cap_to_img.dtype}")
    # A negative index would silently wrap around to the last images; a large one fails deep inside.
    bad = (cap_to_img < 0) | (cap_to_img >= n_img)
    if n_cap and bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise ValueError(f"recall_at_k: cap_to_img[{j}] = {int(cap_to_img[j])} is not an image index "
                         f"(sims has {n_img} images: expected 0..{n_img - 1})")
    pos = torch.zeros(n_img, n_cap, dtype=torch.bool)
    pos[cap_to_img, torch.arange(n_cap)] = True
    # t2i: rank of the right image = number of other images scoring at least as high.
    gt = sims[cap_to_img, torch.arange(n_cap)]                       # (C,)
    t2i_rank = (sims >= gt[None, :]).sum(0) - 1
    # i2t: the best-scored right caption; rank = wrong captions scoring at least as high.
    best = sims.masked_fill(~pos, float("-inf")).max(dim=1).values   # (I,)
    i2t_rank = ((sims >= best[:, None]) & ~pos).sum(1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["rsum"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# The model, its training step and evaluation


class SCAN(nn.Module):
    """Image encoder + text encoder + stacked cross attention of one variant."""

    def __init__(self, feat_dim: int, vocab_size: int, word_dim: int, embed_dim: int, cfg: ScanConfig,
                 bidirectional: bool = True):
        super().__init__()
        self.img_enc = ImageEncoder(feat_dim, embed_dim)
        self.txt_enc = CaptionEncoder(vocab_size, word_dim, embed_dim, bidirectional)
        self.cfg = cfg

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, k, F)``, ``(B', L)``, ``(B',)`` -> scores ``(B, B')``."""
        L = int(lengths.max())
        return scan_scores(self.img_enc(feats), self.txt_enc(tokens[:, :L], lengths), lengths, self.cfg)


def scan_step_fn(margin: float, warmup_steps: int = 0, optimizer: torch.optim.Optimizer | None = None
                 ) -> Callable[[SCAN, tuple], dict[str, torch.Tensor]]:
    """``step_fn`` for :func:`course_utils.train.fit`: sum-of-violations for ``warmup_steps`` steps,
    then hardest negatives (VSE++'s advice: hardest negatives from a random start can collapse).

    The batch is ``(feats (B, k, F), tokens (B, L), lengths (B,), img_ids (B,))``; the step returns
    ``{"loss": scalar}``.

    The step count is read from ``optimizer``'s state (Adam's ``step``), which a checkpoint
    restores, so a resumed run switches to hardest negatives exactly where an unbroken one would.
    """
    state = {"step": 0}

    def steps_done() -> int:
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    st = optimizer.state.get(p, {})
                    if "step" in st:
                        return int(st["step"])
            return 0
        return state["step"]

    def step_fn(model: SCAN, batch) -> dict[str, torch.Tensor]:
        feats, tokens, lengths, img_ids = batch
        scores = model(feats, tokens, lengths)
        hard = steps_done() >= warmup_steps if model.training else True
        if model.training:
            state["step"] += 1
        loss = hardest_negative_triplet_loss(scores, margin, max_violation=hard, img_ids=img_ids)
        return {"loss": loss}

    return step_fn


@torch.no_grad()
def encode(model: SCAN, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
           batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed all images ``-> (I, k, d)`` and captions ``-> (C, L, d)`` once, on the model's device.

    The inputs may sit on the CPU (a cached feature file): each batch is moved as it is encoded.
    """
    model.eval()
    dev = module_device(model)
    img = torch.cat([model.img_enc(feats[a:a + batch_size].to(dev)) for a in range(0, len(feats), batch_size)])
    cap = torch.cat([model.txt_enc(tokens[a:a + batch_size].to(dev), lengths[a:a + batch_size].to(dev))
                     for a in range(0, len(tokens), batch_size)])
    return img, cap


def evaluate_retrieval(model: SCAN, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                       cap_to_img: torch.Tensor, shard: tuple[int, int] = (100, 1000)) -> tuple[dict[str, float], torch.Tensor]:
    """Encode once, score every pair in shards, return ``(R@K dict, sims (I, C) on the CPU)``."""
    img, cap = encode(model, feats, tokens, lengths)
    sims = scan_similarity(img, cap, lengths, model.cfg, shard)
    return recall_at_k(sims, cap_to_img), sims
