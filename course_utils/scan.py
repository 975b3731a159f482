"""SCAN: stacked cross attention for image-text matching (seed 003 Ch. 3-4; Lee et al. 2018).

The pieces, in the order notebook 04 builds them:

* **Image side** (``Backbone``, :func:`region_boxes`, :func:`extract_features`): as SCAN does with
  bottom-up attention, a CNN is trained *once* (here: a small conv net, on attribute
  classification of object boxes), and ``torchvision.ops.roi_align`` pools one feature vector per
  region.  Fine-grained = ``k`` regions per image (the objects' boxes plus jittered and random
  extra boxes), coarse = ``k = 1`` (the whole image).  :class:`ImageEncoder` projects them to the
  joint space.
* **Text side** (:class:`TextEncoder`): word embeddings -> GRU, bidirectional with the two
  directions averaged (or one-directional for the ablation of Table 4.1), l2-normalised.
* **Stacked cross attention** (:func:`scan_scores`): text-image (t-i: each word attends to the
  regions) or image-text (i-t: each region attends to the words), with clipped l2-normalisation,
  inverse temperature ``lambda_softmax`` and LogSumExp (``lambda_lse``) or AVG pooling.
* **Loss** (:func:`hardest_negative_triplet_loss`): hinge triplet loss with the hardest negative
  in the batch (margin 0.2).
* **Evaluation** (:func:`scan_similarity`, :func:`recall_at_k`): every image against every caption
  in shards, R@1/5/10 both ways and rsum.  :func:`scan_similarity_loop` is the same score written
  as a plain loop over (caption, image) pairs straight from the equations; the tests check that
  both agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torchvision.ops import roi_align

from .captions import COLORS, SIZES, CaptionedSplit, Vocabulary
from .shapes import SHAPES, cache_root

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


def train_backbone(split: CaptionedSplit, channels: int, pool: int, epochs: int, seed: int = 0,
                   batch_size: int = 64, lr: float = 2e-3, progress: bool = False) -> tuple[Backbone, dict]:
    """Train :class:`Backbone` + :class:`AttributeHead` to classify the objects' attributes.

    Returns the backbone (eval mode) and ``{"loss": last epoch mean, "acc_color"...: train accuracy}``.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images = split.images()
    boxes = [split.boxes(i) for i in range(len(split))]
    labels = [split.labels(i) for i in range(len(split))]
    net = Backbone(channels)
    head = AttributeHead(net.out_channels * pool * pool)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=lr)
    stats: dict = {}
    for _ in range(epochs):
        perm = torch.randperm(len(split), generator=g)
        tot, correct, n = 0.0, {k: 0 for k in ("color", "shape", "size")}, 0
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size].tolist()
            keep = [i for i in idx if len(boxes[i])]
            feats = pool_regions(net(images[keep]), [boxes[i] for i in keep], pool, net.stride)
            logits = head(feats)
            loss = 0.0
            for k in correct:
                y = torch.cat([labels[i][k] for i in keep])
                loss = loss + F.cross_entropy(logits[k], y)
                correct[k] += int((logits[k].argmax(1) == y).sum())
            n += feats.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(keep)
        stats = {"loss": tot / len(perm), **{f"acc_{k}": v / max(n, 1) for k, v in correct.items()}}
        if progress:
            print("backbone epoch:", {k: round(v, 3) for k, v in stats.items()})
    return net.eval(), stats


def region_boxes(split: CaptionedSplit, i: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """``k`` boxes for image ``i``: its objects first, then jittered objects and random boxes.

    The extra boxes stand in for the overlapping proposals of a bottom-up detector: jittered copies
    cover parts of objects, random boxes cover background and clusters.  ``-> (k, 4)`` float32.
    """
    size = split.scenes[i].size
    obj = split.boxes(i)[:k]
    extra = []
    for j in range(k - len(obj)):
        if len(obj) and j % 2 == 0:
            x1, y1, x2, y2 = obj[int(rng.integers(len(obj)))].tolist()
            w, h = x2 - x1, y2 - y1
            dx, dy, sw, sh = rng.uniform(-0.3, 0.3, size=4)
            cx, cy = (x1 + x2) / 2 + dx * w, (y1 + y2) / 2 + dy * h
            w, h = w * (1 + sw), h * (1 + sh)
            b = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            s = rng.uniform(0.08, 0.5, size=2) * size
            x, y = rng.uniform(0, 1, size=2) * (size - s)
            b = [x, y, x + s[0], y + s[1]]
        extra.append(np.clip(b, 0, size))
    out = torch.cat([obj, torch.tensor(np.array(extra), dtype=torch.float32).reshape(-1, 4)])
    return out


@torch.no_grad()
def extract_features(backbone: Backbone, split: CaptionedSplit, k: int, pool: int, seed: int = 0,
                     batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Pool region features for every image of ``split``.

    Returns ``{"fine": (N, k, D), "coarse": (N, 1, D), "boxes": (N, k, 4), "fmap": None}`` with
    ``D = C * pool * pool``; the coarse feature is the whole image pooled the same way.
    """
    rng = np.random.default_rng([seed, 11])
    boxes = torch.stack([region_boxes(split, i, k, rng) for i in range(len(split))])
    size = split.scenes[0].size if len(split) else 1
    whole = torch.tensor([[0.0, 0.0, size, size]])
    fine, coarse = [], []
    for s in range(0, len(split), batch_size):
        imgs = torch.from_numpy(np.stack([split.image(i) for i in range(s, min(s + batch_size, len(split)))]))
        fmap = backbone(imgs.permute(0, 3, 1, 2).float() / 255.0)
        b = boxes[s:s + len(imgs)]
        fine.append(pool_regions(fmap, list(b), pool, backbone.stride).view(len(imgs), k, -1))
        coarse.append(pool_regions(fmap, [whole] * len(imgs), pool, backbone.stride).view(len(imgs), 1, -1))
    return {"fine": torch.cat(fine), "coarse": torch.cat(coarse), "boxes": boxes}


def _features_key(cfg: dict, seed: int) -> str:
    keys = ("image_size", "n_train", "n_val", "n_test", "min_objects", "max_objects", "small_size",
            "large_size", "k_fine", "backbone_channels", "backbone_epochs", "feat_pool")
    # The vocabulary is part of the key: changing the generator must not reuse stale features.
    blob = json.dumps([[cfg[k] if not isinstance(cfg[k], tuple) else list(cfg[k]) for k in keys], seed, 1,
                       list(COLORS)])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_features(splits: dict[str, CaptionedSplit], cfg: dict, seed: int = 0, cache: bool = True,
                   progress: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], Backbone, dict]:
    """Train the backbone once and pool features for every split, cached under ``$COURSE_CACHE``.

    Returns ``(features[split] = {"fine", "coarse", "boxes"}, backbone, backbone_stats)``.
    """
    root = cache_root() / "retrieval" / _features_key(cfg, seed)
    path = root / "features.pt"
    backbone = Backbone(int(cfg["backbone_channels"]))
    if cache and path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            backbone.load_state_dict(blob["backbone"])
            if progress:
                print(f"region features loaded from cache {path}")
            return blob["features"], backbone.eval(), blob["stats"]
        except Exception as e:  # a truncated file from an interrupted run: rebuild it
            print(f"cache {path} unreadable ({type(e).__name__}); rebuilding")
    backbone, stats = train_backbone(splits["train"], int(cfg["backbone_channels"]), int(cfg["feat_pool"]),
                                     int(cfg["backbone_epochs"]), seed=seed, progress=progress)
    feats = {name: extract_features(backbone, sp, int(cfg["k_fine"]), int(cfg["feat_pool"]), seed=seed + j)
             for j, (name, sp) in enumerate(splits.items())}
    if cache:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".features.pt.tmp-{os.getpid()}"  # per process: notebooks may build this at once
        torch.save({"features": feats, "backbone": backbone.state_dict(), "stats": stats}, tmp)
        tmp.replace(path)
    return feats, backbone, stats


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


class TextEncoder(nn.Module):
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
        if (lengths < 1).any():
            j = int((lengths < 1).nonzero()[0])
            raise ValueError(f"caption {j} is empty (length 0); every caption needs a word")
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
        lengths: ``(C,)`` number of real words of each caption.
        cfg: the variant.

    Returns:
        ``(I, C)`` scores ``S(image, caption)``.

    Why it never forms the attended vectors: the attended vector of a query is a convex
    combination of context vectors, so its dot product with the query is ``sum alpha * s`` and its
    squared norm is ``alpha^T G alpha`` with ``G`` the context's Gram matrix (``n x n`` or
    ``k x k``).  That replaces an ``I x C x q x d`` tensor by ``I x C x q x c`` ones (d >> c).
    """
    if img.shape[1] == 0:
        raise ValueError("img has zero regions per image (shape "
                         f"{tuple(img.shape)}); SCAN needs k >= 1")
    n = cap.shape[1]
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
# The model, training and evaluation


class SCAN(nn.Module):
    """Image encoder + text encoder + stacked cross attention of one variant."""

    def __init__(self, feat_dim: int, vocab_size: int, word_dim: int, embed_dim: int, cfg: ScanConfig,
                 bidirectional: bool = True):
        super().__init__()
        self.img_enc = ImageEncoder(feat_dim, embed_dim)
        self.txt_enc = TextEncoder(vocab_size, word_dim, embed_dim, bidirectional)
        self.cfg = cfg

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, k, F)``, ``(B', L)``, ``(B',)`` -> scores ``(B, B')``."""
        L = int(lengths.max())
        return scan_scores(self.img_enc(feats), self.txt_enc(tokens[:, :L], lengths), lengths, self.cfg)


class PairSet(torch.utils.data.Dataset):
    """``(features of the caption's image, tokens, length, image index)`` for each caption."""

    def __init__(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, cap_to_img: torch.Tensor):
        self.feats, self.tokens, self.lengths, self.cap_to_img = feats, tokens, lengths, cap_to_img

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, c: int):
        i = self.cap_to_img[c]
        return self.feats[i], self.tokens[c], self.lengths[c], i


def make_step_fn(margin: float, warmup_steps: int = 0, optimizer: torch.optim.Optimizer | None = None):
    """``step_fn`` for :func:`course_utils.train.fit`: sum-of-violations for ``warmup_steps`` steps,
    then hardest negatives (VSE++'s advice: hardest negatives from a random start can collapse).

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
    """Embed all images ``-> (I, k, d)`` and captions ``-> (C, L, d)`` once."""
    model.eval()
    img = torch.cat([model.img_enc(feats[a:a + batch_size]) for a in range(0, len(feats), batch_size)])
    cap = torch.cat([model.txt_enc(tokens[a:a + batch_size], lengths[a:a + batch_size])
                     for a in range(0, len(tokens), batch_size)])
    return img, cap


def evaluate_retrieval(model: SCAN, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                       cap_to_img: torch.Tensor, shard: tuple[int, int] = (100, 1000)) -> tuple[dict[str, float], torch.Tensor]:
    """Encode once, score every pair in shards, return ``(R@K dict, sims (I, C))``."""
    img, cap = encode(model, feats, tokens, lengths)
    sims = scan_similarity(img, cap, lengths, model.cfg, shard)
    return recall_at_k(sims, cap_to_img), sims


def tokenize_split(vocab: Vocabulary, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``-> tokens (C, L), lengths (C,)`` (a thin name for :meth:`Vocabulary.batch`)."""
    return vocab.batch(texts)


def train_scan(model: SCAN, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
               cap_to_img: torch.Tensor, *, epochs: int, batch_size: int, lr: float, margin: float = 0.2,
               warmup_epochs: int = 1, seed: int = 0, ckpt_dir: str | None = None, progress: bool = True,
               desc: str = "scan"):
    """Train one SCAN variant on precomputed features with the course's :func:`~course_utils.train.fit`.

    Args:
        feats: ``(N, k, F)`` region features of the training images.
        tokens, lengths: ``(C, L)``, ``(C,)`` training captions; ``cap_to_img``: ``(C,)``.

    Returns the :class:`~course_utils.train.History`.
    """
    from .train import fit

    data = PairSet(feats, tokens, lengths, cap_to_img)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Decay the learning rate over the last third: the hardest-negative loss is noisy at the end.
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, (2 * epochs) // 3)], gamma=0.1)
    return fit(model, make_step_fn(margin, warmup_epochs * steps_per_epoch, opt), data, epochs=epochs,
               batch_size=batch_size, optimizer=opt, scheduler=sched, ckpt_dir=ckpt_dir, seed=seed,
               grad_clip=2.0, progress=progress, desc=desc)


# ----------------------------------------------------------------------------------------------
# The grid of Table 4.1


#: The rows of seed 003's Table 4.1: (row label, direction, pooling, bidirectional GRU).
TABLE_4_1 = [("t-i LSE", "t2i", "lse", True), ("t-i AVG", "t2i", "avg", True),
             ("i-t LSE", "i2t", "lse", True), ("i-t AVG", "i2t", "avg", True),
             ("One-directional GRU + i-t AVG", "i2t", "avg", False)]
#: Seed 003 Table 4.1, Chinese artwork dataset (fine-grained): row -> (i2t R@1/5/10, t2i R@1/5/10).
PAPER_TABLE_4_1 = {"t-i LSE": (8.7, 14.1, 20.3, 5.7, 9.2, 15.6), "t-i AVG": (7.9, 14.4, 20.6, 6.2, 9.6, 16.2),
                   "i-t LSE": (12.8, 20.7, 28.7, 9.3, 15.7, 22.4), "i-t AVG": (12.6, 20.3, 28.9, 9.1, 15.9, 23.2),
                   "One-directional GRU + i-t AVG": (15.5, 18.5, 24.8, 7.5, 14.7, 19.8)}


@dataclass
class RetrievalData:
    """Everything a variant needs: features per level and tokenised texts per level and split."""

    feats: dict[str, dict[str, torch.Tensor]]       # split -> {"fine", "coarse", "boxes"}
    texts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # split -> level -> (tokens, lengths)
    cap_to_img: dict[str, torch.Tensor]
    vocab: Vocabulary

    @classmethod
    def build(cls, splits: dict[str, CaptionedSplit], feats: dict[str, dict[str, torch.Tensor]],
              vocab: Vocabulary | None = None) -> RetrievalData:
        """Coarse text = the whole caption; fine-grained text = its noun phrases (seed 003 §4.1)."""
        vocab = vocab or Vocabulary()
        texts = {name: {"coarse": vocab.batch(sp.texts), "fine": vocab.batch(sp.phrase_texts)}
                 for name, sp in splits.items()}
        return cls(feats, texts, {n: sp.cap_to_img for n, sp in splits.items()}, vocab)


def variant_config(direction: str, agg: str, cfg: dict) -> ScanConfig:
    """The :class:`ScanConfig` of a variant with the profile's lambdas."""
    lam = cfg["lambda_softmax_i2t"] if direction == "i2t" else cfg["lambda_softmax_t2i"]
    return ScanConfig(direction, agg, float(lam), float(cfg["lambda_lse"]))


def run_variant(data: RetrievalData, level: str, row: str, cfg: dict, *, seed: int = 0,
                ckpt_root=None, split: str = "test", progress: bool = True) -> dict:
    """Train (or resume from ``ckpt_root``) one row of Table 4.1 at ``level`` and evaluate it.

    Returns ``{"row", "level", **R@K, "train_s", "eval_s", "model", "sims"}``.
    """
    import time

    _, direction, agg, bi = next(r for r in TABLE_4_1 if r[0] == row)
    feats = data.feats["train"][level]
    torch.manual_seed(seed)
    model = SCAN(feats.shape[-1], len(data.vocab), int(cfg["word_dim"]), int(cfg["embed_dim"]),
                 variant_config(direction, agg, cfg), bidirectional=bi)
    tok, ln = data.texts["train"][level]
    ckpt = None
    if ckpt_root is not None:
        ckpt = str(ckpt_root / f"{level}_{direction}_{agg}_{'bi' if bi else 'uni'}")
    t = time.perf_counter()
    hist = train_scan(model, feats, tok, ln, data.cap_to_img["train"], epochs=int(cfg["epochs"]),
                      batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]), margin=float(cfg["margin"]),
                      warmup_epochs=int(cfg["warmup_epochs"]), seed=seed, ckpt_dir=ckpt, progress=progress,
                      desc=f"{level} {row}")
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    tok_e, ln_e = data.texts[split][level]
    metrics, sims = evaluate_retrieval(model, data.feats[split][level], tok_e, ln_e, data.cap_to_img[split],
                                       tuple(cfg["eval_shard"]))
    return {"row": row, "level": level, **metrics, "train_s": train_s, "eval_s": time.perf_counter() - t,
            "model": model, "sims": sims, "history": hist}


def checkpoint_root(cfg: dict, seed: int = 0):
    """Where the grid's checkpoints live (per data/feature key and training knobs)."""
    keys = ("word_dim", "embed_dim", "batch_size", "epochs", "lr", "margin", "lambda_softmax_t2i",
            "lambda_softmax_i2t", "lambda_lse", "warmup_epochs")
    train_key = hashlib.sha256(json.dumps([cfg[k] for k in keys]).encode()).hexdigest()[:8]
    return cache_root() / "retrieval" / _features_key(cfg, seed) / f"scan_{train_key}"
