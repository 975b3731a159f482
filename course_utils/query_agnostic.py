"""Query-agnostic retrieval with an object prior (seed 001; notebook 05).

SCAN (notebook 04) scores a caption against an image with cross attention *between the two*:
every new query must run through every gallery image again.  The poster's model embeds each
image once, independently of any query:

* regions are kept only when they are big enough, ``Area(obj_i) / Area(image) > alpha``
  (:func:`keep_regions`);
* a cross-attention decoder block lets the whole-image embedding ``I`` (the query of the
  attention) read the kept region embeddings ``X`` (keys and values)::

      q = LN(I),  k = v = LN(X),  Y = I + MHSA(q, k, v),  Y_hat = Y + FFN(Y)

  (:class:`DecoderBlock`), with ``FFN(Y) = W2 GELU(W1 Y)`` as the poster writes it.  A
  transformer's usual pre-norm FFN(LN(Y)) is the ablation ``ffn_norm=True`` (notebook 05);
  ``layers`` blocks can be stacked, each one's output the next one's query;
* a caption is one vector: each word of its noun phrases is read together with its neighbours by
  one convolution over the word embeddings (:class:`ConvCaptionEncoder`, so that "red" and
  "circle" become one feature), and the word features are averaged; SCAN's bi-GRU
  (``text_tower="bigru"``) is notebook 05's ablation row.  Training is contrastive
  (:func:`contrastive_loss`).

Retrieval then is one matrix product between the gallery matrix (encoded once) and the query
matrix (:func:`score_all`), which is why it is so much faster than SCAN.  Training it, and racing
it against SCAN, are recipes: :func:`course_utils.recipes.retrieval.run_query_agnostic` and
:mod:`course_utils.recipes.speed_race`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .devices import module_device
from .scan import CaptionEncoder, check_lengths, l2norm

# the caption towers QueryAgnostic can have: a word convolution (the course's) or SCAN's bi-GRU
TEXT_TOWERS = ("conv", "bigru")

__all__ = ["TEXT_TOWERS", "ConvCaptionEncoder", "DecoderBlock", "QueryAgnostic", "contrastive_loss", "decoder_block", "encode_gallery",
           "encode_queries", "keep_regions", "mean_words", "score_all"]


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
    """:func:`decoder_block` with its layers: ``(B, d), (B, k, d), (B, k) -> (B, d)``.

    ``ffn`` is ``Linear(d, m d) -> GELU -> Linear(m d, d)``: the poster's ``Y_hat = Y + FFN(Y)``.
    ``ffn_norm=True`` puts a LayerNorm first (``Y + FFN(LN(Y))``, a pre-norm transformer's
    layout), kept as an ablation of notebook 05.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, ffn_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"DecoderBlock: dim={dim} is not divisible by heads={heads}")
        self.ln_q, self.ln_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        ffn = [nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim)]
        self.ffn = nn.Sequential(*([nn.LayerNorm(dim)] if ffn_norm else []), *ffn)

    def forward(self, image: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return decoder_block(image, regions, keep, self.ln_q, self.ln_kv, self.attn, self.ffn)


class ConvCaptionEncoder(nn.Module):
    """Token ids ``(B, L)`` + lengths ``(B,)`` -> caption vectors ``(B, embed_dim)``.

    Each word's feature is a ``width``-word convolution over the word embeddings centred on it
    (ReLU, then l2-normalised), so an attribute and the noun beside it are read together; the
    caption is the mean of its real words' features.  Every word is computed at once, where a
    GRU steps through the caption word by word: on 5000 captions this tower is several times
    cheaper than SCAN's bi-GRU (notebook 05 times both).  Padding neither enters a real word's
    window (padded embeddings are zeroed) nor the mean, so a caption's vector does not depend on
    how long the batch's longest caption is.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, width: int = 3):
        super().__init__()
        if width < 1 or width % 2 == 0:
            raise ValueError(f"ConvCaptionEncoder: width must be odd and >= 1 (centred on the word), got {width}")
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.conv = nn.Conv1d(word_dim, embed_dim, width, padding=width // 2)
        self.embed_dim = embed_dim

    def word_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, L)``, ``(B,)`` -> l2-normalised word features ``(B, L, embed_dim)``, zero at padding."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape (B, L), got {tuple(tokens.shape)}")
        check_lengths(lengths, tokens.shape[0], tokens.shape[1])
        real = (torch.arange(tokens.shape[1], device=tokens.device)[None, :]
                < lengths.to(tokens.device)[:, None])[..., None]
        x = self.embed(tokens) * real
        words = F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return l2norm(words) * real

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        words = self.word_features(tokens, lengths)
        return words.sum(dim=1) / lengths.to(words.device)[:, None].to(words.dtype)


class QueryAgnostic(nn.Module):
    """Image tower (global + kept regions -> decoder block(s)) and caption tower (``text_tower``).

    ``encode_image(global (B, F), regions (B, k, F), keep (B, k)) -> (B, d)`` and
    ``encode_text(tokens (B, L), lengths (B,)) -> (B, d)``, both l2-normalised.
    ``layers`` decoder blocks are applied in turn (the first one's query is the image embedding);
    ``ffn_norm`` as in :class:`DecoderBlock`.  ``text_tower`` is one of :data:`TEXT_TOWERS`:
    ``"conv"`` (:class:`ConvCaptionEncoder`) or ``"bigru"`` (SCAN's :class:`~course_utils.scan.CaptionEncoder`,
    its word features averaged by :func:`mean_words`).
    """

    def __init__(self, feat_dim: int, vocab_size: int, word_dim: int, embed_dim: int, heads: int,
                 temperature: float = 0.05, layers: int = 1, ffn_norm: bool = False, text_tower: str = "conv"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"QueryAgnostic: layers must be >= 1, got {layers}")
        if text_tower not in TEXT_TOWERS:
            raise ValueError(f"QueryAgnostic: text_tower={text_tower!r}, expected one of {TEXT_TOWERS}")
        self.global_proj = nn.Linear(feat_dim, embed_dim)
        self.region_proj = nn.Linear(feat_dim, embed_dim)
        self.blocks = nn.ModuleList(DecoderBlock(embed_dim, heads, ffn_norm=ffn_norm) for _ in range(layers))
        self.text_tower = text_tower
        self.txt = (ConvCaptionEncoder(vocab_size, word_dim, embed_dim) if text_tower == "conv"
                    else CaptionEncoder(vocab_size, word_dim, embed_dim, bidirectional=True))
        self.temperature = temperature

    def encode_image(self, global_feat: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if regions.ndim != 3 or global_feat.ndim != 2:
            raise ValueError(f"expected global (B, F) and regions (B, k, F), got {tuple(global_feat.shape)} "
                             f"and {tuple(regions.shape)}")
        y, x = self.global_proj(global_feat), self.region_proj(regions)
        for block in self.blocks:
            y = block(y, x, keep)
        return l2norm(y)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.text_tower == "conv":
            return l2norm(self.txt(tokens, lengths))
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


@torch.no_grad()
def encode_gallery(model: QueryAgnostic, global_feat: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor,
                   batch_size: int = 500) -> torch.Tensor:
    """Encode every gallery image once: ``-> (I, d)`` on the model's device (inputs may be on the CPU)."""
    model.eval()
    dev = module_device(model)
    return torch.cat([model.encode_image(global_feat[a:a + batch_size].to(dev), regions[a:a + batch_size].to(dev),
                                         keep[a:a + batch_size].to(dev)) for a in range(0, len(regions), batch_size)])


@torch.no_grad()
def encode_queries(model: QueryAgnostic, tokens: torch.Tensor, lengths: torch.Tensor,
                   batch_size: int = 1000) -> torch.Tensor:
    """Encode captions: ``-> (C, d)`` on the model's device (inputs may be on the CPU)."""
    model.eval()
    dev = module_device(model)
    return torch.cat([model.encode_text(tokens[a:a + batch_size].to(dev), lengths[a:a + batch_size].to(dev))
                      for a in range(0, len(tokens), batch_size)])


def score_all(gallery: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Every image against every caption with one matrix product: ``(I, d), (C, d) -> (I, C)``."""
    return gallery @ queries.T
