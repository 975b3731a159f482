"""Query-agnostic retrieval with an object prior (seed 001; notebook 05).

SCAN (notebook 04) scores a caption against an image with cross attention *between the two*:
every new query must run through every gallery image again.  The poster's model embeds each
image once, independently of any query:

* regions are kept only when they are big enough, ``Area(obj_i) / Area(image) > alpha``
  (:func:`keep_regions`);
* a cross-attention decoder block lets the whole-image embedding ``I`` (the query of the
  attention) read the kept region embeddings ``X`` (keys and values)::

      q = LN(I),  k = v = LN(X),  Y = I + MHSA(q, k, v),  Y_hat = Y + FFN(Y)

  (:class:`DecoderBlock`);
* a caption is one vector (the bi-GRU's word features of its noun phrases, averaged), and training is contrastive
  (:func:`contrastive_loss`).

Retrieval then is one matrix product between the gallery matrix (encoded once) and the query
matrix (:func:`score_all`), which is why it is so much faster than SCAN.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .scan import PairSet, TextEncoder, l2norm

__all__ = ["TEXT_LEVELS", "DecoderBlock", "QueryAgnostic", "contrastive_loss", "decoder_block", "encode_gallery",
           "encode_queries", "keep_regions", "mean_words", "query_agnostic_seconds", "score_all",
           "speed_by_gallery_size", "speed_table", "train_query_agnostic"]


def keep_regions(boxes: torch.Tensor, image_size: float | torch.Tensor, alpha: float) -> torch.Tensor:
    """Which regions the object prior keeps.

    Args:
        boxes: ``(..., k, 4)`` boxes ``(x1, y1, x2, y2)`` in pixels.
        image_size: side of the (square) image, or ``(..., 2)`` tensor ``(H, W)`` per image.
        alpha: keep a region when ``area / image area > alpha``.

    Returns:
        ``(..., k)`` bool.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected last dimension 4, got shape {tuple(boxes.shape)}")
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    if isinstance(image_size, torch.Tensor):
        img_area = (image_size[..., 0] * image_size[..., 1]).unsqueeze(-1)
    else:
        img_area = float(image_size) ** 2
    return area / img_area > alpha


def decoder_block(image: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor, ln_q: nn.LayerNorm,
                  ln_kv: nn.LayerNorm, attn: nn.MultiheadAttention, ffn: nn.Module) -> torch.Tensor:
    """The cross-attention decoder block of seed 001, written out.

    Args:
        image: ``(B, d)`` whole-image embeddings ``I``.
        regions: ``(B, k, d)`` region embeddings ``X``.
        keep: ``(B, k)`` bool, the regions the object prior kept.
        ln_q, ln_kv, attn (``batch_first=True``), ffn: the block's layers.

    Returns:
        ``(B, d)``: ``Y_hat = Y + FFN(Y)`` with ``Y = I + MHSA(LN(I), LN(X), LN(X))``.  An image
        with no kept region gets no attention term (``Y = I``) instead of a NaN.
    """
    q = ln_q(image).unsqueeze(1)                          # (B, 1, d): one query per image
    kv = ln_kv(regions)
    empty = ~keep.any(dim=1)                              # (B,)
    # MultiheadAttention returns NaN when every key is masked; unmask those rows and zero them below.
    pad = ~keep & ~empty[:, None]
    att, _ = attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
    att = att.squeeze(1).masked_fill(empty[:, None], 0.0)
    y = image + att
    return y + ffn(y)


class DecoderBlock(nn.Module):
    """:func:`decoder_block` with its layers: ``(B, d), (B, k, d), (B, k) -> (B, d)``."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4):
        super().__init__()
        self.ln_q, self.ln_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn_mult * dim), nn.GELU(),
                                 nn.Linear(ffn_mult * dim, dim))

    def forward(self, image: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return decoder_block(image, regions, keep, self.ln_q, self.ln_kv, self.attn, self.ffn)


class QueryAgnostic(nn.Module):
    """Image tower (global + kept regions -> decoder block) and caption tower (bi-GRU, mean).

    ``encode_image(global (B, F), regions (B, k, F), keep (B, k)) -> (B, d)`` and
    ``encode_text(tokens (B, L), lengths (B,)) -> (B, d)``, both l2-normalised.
    """

    def __init__(self, feat_dim: int, vocab_size: int, word_dim: int, embed_dim: int, heads: int,
                 temperature: float = 0.05):
        super().__init__()
        self.global_proj = nn.Linear(feat_dim, embed_dim)
        self.region_proj = nn.Linear(feat_dim, embed_dim)
        self.block = DecoderBlock(embed_dim, heads)
        self.txt = TextEncoder(vocab_size, word_dim, embed_dim, bidirectional=True)
        self.temperature = temperature

    def encode_image(self, global_feat: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if regions.ndim != 3 or global_feat.ndim != 2:
            raise ValueError(f"expected global (B, F) and regions (B, k, F), got {tuple(global_feat.shape)} "
                             f"and {tuple(regions.shape)}")
        return l2norm(self.block(self.global_proj(global_feat), self.region_proj(regions), keep))

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return l2norm(mean_words(self.txt.packed_words(tokens, lengths)))


def mean_words(words: PackedSequence) -> torch.Tensor:
    """Mean of each caption's word features, straight from the packed words: ``-> (B, d)``.

    Row ``r`` of time step ``t`` in ``words.data`` belongs to the ``r``-th longest caption, so the
    sums are one ``index_add_``; the padded ``(B, L, d)`` tensor SCAN needs is never built (on
    5000 captions that padding, masking and re-sorting was about 12 % of the encoding time).
    """
    steps = words.batch_sizes
    owner = torch.arange(len(words.data)) - torch.repeat_interleave(torch.cumsum(steps, 0) - steps, steps)
    owner = owner.to(words.data.device)
    sums = words.data.new_zeros(int(steps[0]), words.data.shape[1]).index_add_(0, owner, words.data)
    counts = torch.bincount(owner, minlength=int(steps[0])).to(sums.dtype)[:, None]
    means = sums / counts
    return means if words.unsorted_indices is None else means[words.unsorted_indices]


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, temperature: float,
                     img_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs ``img (B, d)``, ``txt (B, d)`` -> scalar.

    Pairs that share an image (``img_ids``) are removed from each other's negatives.
    """
    logits = img @ txt.T / temperature
    if img_ids is not None:
        same = (img_ids[:, None] == img_ids[None, :]) & ~torch.eye(len(img_ids), dtype=torch.bool,
                                                                     device=img.device)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class _QASet(torch.utils.data.Dataset):
    def __init__(self, glob, regions, keep, pairs: PairSet):
        self.glob, self.regions, self.keep, self.pairs = glob, regions, keep, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, c: int):
        _, tok, ln, i = self.pairs[c]
        return self.glob[i], self.regions[i], self.keep[i], tok, ln, i


def train_query_agnostic(model: QueryAgnostic, global_feat: torch.Tensor, regions: torch.Tensor,
                         keep: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                         cap_to_img: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                         seed: int = 0, ckpt_dir: str | None = None, progress: bool = True):
    """Contrastive training with the course's ``fit``; features ``(N, F)``, ``(N, k, F)``, ``(N, k)``."""
    from .train import fit

    data = _QASet(global_feat, regions, keep, PairSet(regions, tokens, lengths, cap_to_img))

    def step_fn(m: QueryAgnostic, batch) -> dict[str, torch.Tensor]:
        g, r, kp, tok, ln, ids = batch
        L = int(ln.max())
        loss = contrastive_loss(m.encode_image(g, r, kp), m.encode_text(tok[:, :L], ln), m.temperature, ids)
        return {"loss": loss}

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, (2 * epochs) // 3)], gamma=0.1)
    del steps
    return fit(model, step_fn, data, epochs=epochs, batch_size=batch_size, optimizer=opt, scheduler=sched,
               ckpt_dir=ckpt_dir, seed=seed, grad_clip=2.0, progress=progress, desc="query-agnostic")


@torch.no_grad()
def encode_gallery(model: QueryAgnostic, global_feat: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor,
                   batch_size: int = 500) -> torch.Tensor:
    """Encode every gallery image once: ``-> (I, d)``."""
    model.eval()
    return torch.cat([model.encode_image(global_feat[a:a + batch_size], regions[a:a + batch_size],
                                         keep[a:a + batch_size]) for a in range(0, len(regions), batch_size)])


@torch.no_grad()
def encode_queries(model: QueryAgnostic, tokens: torch.Tensor, lengths: torch.Tensor,
                   batch_size: int = 1000) -> torch.Tensor:
    """Encode captions: ``-> (C, d)``."""
    model.eval()
    return torch.cat([model.encode_text(tokens[a:a + batch_size], lengths[a:a + batch_size])
                      for a in range(0, len(tokens), batch_size)])


def score_all(gallery: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Every image against every caption with one matrix product: ``(I, d), (C, d) -> (I, C)``."""
    return gallery @ queries.T


def qa_inputs(feats: dict[str, torch.Tensor], image_size: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(global (N, F), regions (N, k, F), keep (N, k))`` from one split's cached features."""
    return feats["coarse"][:, 0], feats["fine"], keep_regions(feats["boxes"], image_size, alpha)


#: What the caption tower reads.  ``"fine"``: the caption's noun phrases, the same tokens as SCAN's
#: fine-grained level, so the speed race compares the two models on identical queries;
#: ``"coarse"``: the whole sentence.  Measured on the ``cpu`` test split: rsum 318.2 with noun
#: phrases vs 311.7 with sentences, and 20 % fewer words to encode (notebook 05, section 4).
TEXT_LEVELS = {"fine": "noun phrases", "coarse": "whole caption"}


def run_query_agnostic(data, cfg: dict, *, text_level: str = "fine", seed: int = 0, ckpt_dir=None,
                       split: str = "test", progress: bool = True) -> dict:
    """Train (or resume) the query-agnostic model on ``data`` (a :class:`~course_utils.scan.RetrievalData`)
    and evaluate R@K on ``split``; returns ``{**R@K, "train_s", "eval_s", "model", "sims", "kept",
    "text_level"}``.

    ``text_level`` is a key of :data:`TEXT_LEVELS`; checkpoints go to ``ckpt_dir / text_level``.
    """
    from pathlib import Path

    from .scan import recall_at_k

    if text_level not in TEXT_LEVELS:
        raise ValueError(f"text_level={text_level!r}: expected one of {sorted(TEXT_LEVELS)}")
    size, alpha = int(cfg["image_size"]), float(cfg["qa_alpha"])
    g, r, keep = qa_inputs(data.feats["train"], size, alpha)
    tok, ln = data.texts["train"][text_level]
    torch.manual_seed(seed)
    model = QueryAgnostic(g.shape[-1], len(data.vocab), int(cfg["word_dim"]), int(cfg["embed_dim"]),
                          int(cfg["qa_heads"]))
    t = time.perf_counter()
    hist = train_query_agnostic(model, g, r, keep, tok, ln, data.cap_to_img["train"], epochs=int(cfg["qa_epochs"]),
                                batch_size=int(cfg["batch_size"]), lr=float(cfg["qa_lr"]), seed=seed,
                                ckpt_dir=None if ckpt_dir is None else str(Path(ckpt_dir) / text_level),
                                progress=progress)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    gt, rt, kt = qa_inputs(data.feats[split], size, alpha)
    tok_e, ln_e = data.texts[split][text_level]
    sims = score_all(encode_gallery(model, gt, rt, kt), encode_queries(model, tok_e, ln_e))
    return {**recall_at_k(sims, data.cap_to_img[split]), "train_s": train_s, "eval_s": time.perf_counter() - t,
            "model": model, "sims": sims, "history": hist, "kept": float(kt.float().sum(1).mean()),
            "text_level": text_level}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _race_inputs(data, cfg: dict, split: str, scan_level: str, qa_level: str,
                 n_images: int | None = None) -> dict:
    """What both models read: SCAN's regions and ``scan_level`` texts, the query-agnostic inputs and
    ``qa_level`` texts.  ``n_images`` above the split's size tiles its images (timing does not
    depend on what the features say, only on how many there are)."""
    feats = data.feats[split]
    n = len(feats["fine"]) if n_images is None else int(n_images)
    idx = torch.arange(n) % len(feats["fine"])
    gq, rq, kq = qa_inputs(feats, int(cfg["image_size"]), float(cfg["qa_alpha"]))
    return {"scan_feats": feats[scan_level][idx], "scan_text": data.texts[split][scan_level],
            "qa_image": (gq[idx], rq[idx], kq[idx]), "qa_text": data.texts[split][qa_level],
            "shard": tuple(cfg["eval_shard"])}


def _qa_end_to_end(qa_model: QueryAgnostic, x: dict) -> torch.Tensor:
    """Encode the gallery and the captions, score every pair: ``-> (I, C)``."""
    tok, ln = x["qa_text"]
    return score_all(encode_gallery(qa_model, *x["qa_image"]), encode_queries(qa_model, tok, ln))


@torch.no_grad()
def _race_round(scan_model, qa_model: QueryAgnostic, x: dict) -> dict[str, float]:
    """One timed round: the query-agnostic model end to end, then SCAN, then the parts."""
    from .scan import encode, scan_similarity

    (tok_s, ln_s), (tok_q, ln_q) = x["scan_text"], x["qa_text"]
    t: dict[str, float] = {}

    def clock(key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        t[key] = time.perf_counter() - t0
        return out

    clock("qa", lambda: _qa_end_to_end(qa_model, x))
    img, cap = clock("scan_encode", lambda: encode(scan_model, x["scan_feats"], tok_s, ln_s))
    clock("scan_scoring", lambda: scan_similarity(img, cap, ln_s, scan_model.cfg, x["shard"]))
    t["scan"] = t["scan_encode"] + t["scan_scoring"]
    gallery = clock("qa_gallery", lambda: encode_gallery(qa_model, *x["qa_image"]))
    queries = clock("qa_queries", lambda: encode_queries(qa_model, tok_q, ln_q))
    clock("qa_product", lambda: score_all(gallery, queries))
    return t


@torch.no_grad()
def _warm_up(scan_model, qa_model: QueryAgnostic, x: dict) -> None:
    """First calls pay for allocations and the thread pool, for either model: pay them untimed."""
    from .scan import encode, scan_similarity

    tok_s, ln_s = x["scan_text"]
    _qa_end_to_end(qa_model, x)
    si, sc = x["shard"]
    img, cap = encode(scan_model, x["scan_feats"][:si], tok_s[:sc], ln_s[:sc])
    scan_similarity(img, cap, ln_s[:sc], scan_model.cfg, x["shard"])


def speed_table(scan_model, qa_model: QueryAgnostic, data, cfg: dict, split: str = "test",
                scan_level: str = "fine", qa_level: str = "fine", repeats: int = 3) -> dict:
    """Time every-image-against-every-caption retrieval on ``split`` for both models, in one run.

    Two comparisons, both measured here:

    * **end to end** (``scan_s`` vs ``query_agnostic_s``): encode the images, encode the captions,
      score every pair.  SCAN must run its cross attention for every (image, caption) pair; the
      query-agnostic model scores all queries with one matrix product.
    * **scoring only** (``scan_scoring_s`` vs ``qa_matrix_product_s``): both sides already encoded
      (the gallery offline, the captions once per query) -- the query-dependent part alone.

    Both models get the same protocol: one warm-up call each, then ``repeats`` rounds that time the
    query-agnostic model and SCAN one after the other (so a change in the machine's load hits
    both); every time reported is the median over the rounds.  ``ratio_rounds`` keeps
    each round's end-to-end ratio, so the spread is visible.  Returns seconds and both ratios
    (``ratio`` = end to end, ``scoring_ratio``).
    """
    x = _race_inputs(data, cfg, split, scan_level, qa_level)
    _warm_up(scan_model, qa_model, x)
    rounds = [_race_round(scan_model, qa_model, x) for _ in range(repeats)]
    med = {k: _median([r[k] for r in rounds]) for k in rounds[0]}
    out: dict = {"n_images": len(x["scan_feats"]), "n_captions": len(x["qa_text"][0]), "repeats": repeats,
                 "threads": torch.get_num_threads(),
                 "query_agnostic_s": med["qa"], "qa_gallery_encode_s": med["qa_gallery"],
                 "qa_query_encode_s": med["qa_queries"], "qa_matrix_product_s": med["qa_product"],
                 "scan_s": med["scan"], "scan_encode_s": med["scan_encode"],
                 "scan_scoring_s": med["scan_scoring"]}
    out["ratio"] = out["scan_s"] / out["query_agnostic_s"]
    out["scoring_ratio"] = out["scan_scoring_s"] / out["qa_matrix_product_s"]
    out["ratio_rounds"] = [r["scan"] / r["qa"] for r in rounds]
    return out


def speed_by_gallery_size(scan_model, qa_model: QueryAgnostic, data, cfg: dict,
                          sizes: tuple[int, ...] = (250, 500, 1000, 2000, 5000), split: str = "test",
                          scan_level: str = "fine", qa_level: str = "fine") -> list[dict]:
    """End-to-end seconds of both models against all of ``split``'s captions, for galleries of
    ``sizes`` images (one round each; sizes above the split tile its images).

    SCAN's cost grows with images x captions, the query-agnostic model's with images + captions,
    so their ratio grows with the gallery.  Returns one ``{"n_images", "scan_s", "query_agnostic_s",
    "ratio"}`` per size.
    """
    rows = []
    for n in sizes:
        x = _race_inputs(data, cfg, split, scan_level, qa_level, n_images=n)
        _warm_up(scan_model, qa_model, x)
        r = _race_round(scan_model, qa_model, x)
        rows.append({"n_images": n, "n_captions": len(x["qa_text"][0]), "scan_s": r["scan"],
                     "query_agnostic_s": r["qa"], "ratio": r["scan"] / r["qa"]})
    return rows


@torch.no_grad()
def query_agnostic_seconds(qa_model: QueryAgnostic, data, cfg: dict, text_level: str, split: str = "test",
                           repeats: int = 3) -> float:
    """Median end-to-end seconds of the query-agnostic model alone (gallery + ``text_level`` captions +
    product) on ``split``, after one warm-up call: to set another caption tower beside
    :func:`speed_table`'s SCAN time."""
    x = _race_inputs(data, cfg, split, "fine", text_level)
    _qa_end_to_end(qa_model, x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _qa_end_to_end(qa_model, x)
        times.append(time.perf_counter() - t)
    return _median(times)
