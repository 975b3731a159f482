"""Matchmaps (seed 002, after Harwath et al. 2018): every word against every cell of a conv map.

Instead of pooling the image into one vector, keep the last conv map ``(d, H, W)`` and compare each
word feature with each cell: the *matchmap* ``M[t, h, w] = <word_t, cell_hw>`` (:func:`matchmap`).
Three ways to turn it into one image-caption score (:func:`matchmap_score`):

* ``SISA`` (sum image, sum audio/text): the mean of all entries;
* ``MISA`` (max image, sum text): each word finds its best cell, averaged over words;
* ``SIMA`` (sum image, max text): each cell finds its best word, averaged over cells.

Training (the recipe :func:`course_utils.recipes.retrieval.train_matchmap`) uses a margin ranking
loss with *sampled* impostor images and impostor captions per pair (:func:`impostor_ranking_loss`),
so a step costs (1 + 2k)B matchmaps instead of B^2, or the contrastive loss over the whole batch
(:func:`contrastive_matchmap_loss`, B^2 matchmaps).

Cells and words are L2-normalised, so every matchmap entry is a cosine in [-1, 1] and the margin
(0.2, as SCAN's) has a fixed meaning.  With raw dot products (Harwath et al.'s choice, margin 1)
this small model collapses here: every score drifts to the same value, the loss sits at exactly
2 x margin and the hottest cell never lands on the named object (pointing game 0 %).  A matchmap row
is a heat map of one word over the image; the pointing game (:func:`pointing_game`) asks whether
the hottest cell of a noun phrase lies inside the box of the object it names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .captions import CaptionedSplit, CaptionVocabulary, tokenize
from .devices import module_device
from .scan import Backbone, CaptionEncoder, length_mask

AGGREGATORS = ("sisa", "misa", "sima")


def matchmap(cells: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``cells (d, H, W)``, ``words (n, d)`` -> ``(n, H, W)`` dot products."""
    return torch.einsum("dhw,nd->nhw", cells, words)


def matchmap_score(mm: torch.Tensor, agg: str, word_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool matchmaps ``(..., n, H, W)`` to scores ``(...)``; ``word_mask (..., n)`` skips padding."""
    if agg not in AGGREGATORS:
        raise ValueError(f"agg must be one of {AGGREGATORS}, got {agg!r}")
    n = mm.shape[-3]
    if word_mask is None:
        word_mask = torch.ones(mm.shape[:-2], dtype=torch.bool, device=mm.device)
    m = word_mask.to(mm.dtype)
    n_words = m.sum(-1).clamp(min=1)
    if agg == "sisa":
        return (mm.mean((-1, -2)) * m).sum(-1) / n_words
    if agg == "misa":
        return (mm.flatten(-2).max(-1).values * m).sum(-1) / n_words
    masked = mm.masked_fill(~word_mask[..., None, None].bool(), float("-inf"))
    del n
    return masked.max(-3).values.mean((-1, -2))


class MatchmapModel(nn.Module):
    """A frozen :class:`~course_utils.scan.Backbone` + a trainable cell projection, and a bi-GRU.

    ``cells(images (B, 3, H, W)) -> (B, d, h, w)``; ``words(tokens, lengths) -> (B, L, d)``; both
    unit length along ``d`` (each cell, each word), so matchmap entries are cosines.
    """

    def __init__(self, backbone: Backbone, vocab_size: int, word_dim: int, embed_dim: int):
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        c = backbone.out_channels
        # A 3x3 conv lets a cell see its neighbours (a shape is several cells wide).
        self.proj = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, embed_dim, 1))
        self.txt = CaptionEncoder(vocab_size, word_dim, embed_dim, bidirectional=True)
        self.stride = backbone.stride

    def train(self, mode: bool = True) -> MatchmapModel:
        super().train(mode)
        self.backbone.eval()  # frozen: always in eval mode
        return self

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fmap = self.backbone(images.to(module_device(self)))
        return F.normalize(self.proj(fmap), dim=1)

    def words(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        dev = module_device(self)
        return self.txt(tokens.to(dev), lengths.to(dev))  # already unit length per word (padding stays zero)


def pair_scores(cells: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, agg: str) -> torch.Tensor:
    """Scores of aligned pairs ``cells[b]`` with ``words[b]``: ``(B, d, h, w), (B, L, d) -> (B,)``."""
    mm = torch.einsum("bdhw,bnd->bnhw", cells, words)
    return matchmap_score(mm, agg, length_mask(lengths, words.shape[1]))


def impostor_ranking_loss(cells: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, agg: str,
                          margin: float = 0.2, generator: torch.Generator | None = None,
                          impostors: int = 1) -> torch.Tensor:
    """Margin ranking loss with sampled impostors each way (Harwath et al.).

    For each pair ``b``, ``impostors`` impostor images ``i != b`` and as many impostor captions
    ``j != b`` are drawn at random; each side keeps its *hardest* draw (as VSE++ keeps the hardest
    negative of the whole batch, at the cost of ``2k`` instead of ``2(B-1)`` extra matchmaps):
    ``max_i [margin - S(b, b) + S(i, b)]_+ + max_j [margin - S(b, b) + S(b, j)]_+``, averaged over
    pairs.  ``impostors=1`` is Harwath et al.'s single random impostor.

    ``cells (B, d, h, w)``, ``words (B, L, d)``, ``lengths (B,)`` -> a scalar.
    """
    b = cells.shape[0]
    if b < 2:
        raise ValueError("impostor sampling needs a batch of at least 2 pairs")
    if impostors < 1:
        raise ValueError(f"impostors={impostors}: sample at least one impostor per pair")
    pos = pair_scores(cells, words, lengths, agg)
    h_img, h_cap = [], []
    for _ in range(impostors):
        imp_i = (torch.arange(b) + torch.randint(1, b, (b,), generator=generator)) % b  # never b itself
        imp_j = (torch.arange(b) + torch.randint(1, b, (b,), generator=generator)) % b
        h_img.append(F.relu(margin - pos + pair_scores(cells[imp_i], words, lengths, agg)))
        h_cap.append(F.relu(margin - pos + pair_scores(cells, words[imp_j], lengths[imp_j], agg)))
    return (torch.stack(h_img).max(0).values + torch.stack(h_cap).max(0).values).mean()


def batch_scores(cells: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, agg: str) -> torch.Tensor:
    """Every image of the batch against every caption: ``(B, d, h, w), (C, L, d) -> (B, C)``."""
    mask = length_mask(lengths, words.shape[1])
    return torch.stack([matchmap_score(torch.einsum("dhw,cnd->cnhw", c, words), agg, mask) for c in cells])


def contrastive_matchmap_loss(cells: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, agg: str,
                              temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE over the batch's matchmap scores: every other pair is an impostor.

    ``S = batch_scores / temperature``; the loss is the mean of the cross-entropies of the rows
    (which caption is image ``b``'s?) and the columns (which image is caption ``b``'s?), the right
    answer being the diagonal.  Costs ``B^2`` matchmaps per step.
    """
    if cells.shape[0] < 2:
        raise ValueError("a contrastive batch needs at least 2 pairs")
    S = batch_scores(cells, words, lengths, agg) / temperature
    target = torch.arange(S.shape[0], device=S.device)
    return 0.5 * (F.cross_entropy(S, target) + F.cross_entropy(S.T, target))


def phrase_spans(text: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Token ``[start, end)`` of each noun phrase in the caption, in order of appearance."""
    toks = tokenize(text)
    spans, pos = [], 0
    for ph in phrases:
        p = tokenize(ph)
        for s in range(pos, len(toks) - len(p) + 1):
            if toks[s:s + len(p)] == p:
                spans.append((s, s + len(p)))
                pos = s + len(p)
                break
        else:
            raise ValueError(f"noun phrase {ph!r} not found in caption {text!r}")
    return spans


@torch.no_grad()
def phrase_heatmaps(model: MatchmapModel, split: CaptionedSplit, vocab: CaptionVocabulary, c: int) -> list[torch.Tensor]:
    """Heat maps ``(h, w)`` of each noun phrase of caption ``c`` over its own image, on the CPU."""
    model.eval()
    cap = split.captions[c]
    i = int(split.cap_to_img[c])
    tok, ln = vocab.batch([cap.text])
    img = torch.from_numpy(split.image(i).copy()).permute(2, 0, 1).float()[None] / 255
    mm = matchmap(model.cells(img)[0], model.words(tok, ln)[0])
    return [mm[a:b].mean(0).cpu() for a, b in phrase_spans(cap.text, cap.phrases)]


@torch.no_grad()
def pointing_game(model: MatchmapModel, split: CaptionedSplit, vocab: CaptionVocabulary,
                  max_captions: int | None = None) -> dict[str, float]:
    """Is the hottest cell of each noun phrase inside the box of the object it names?

    Returns ``{"accuracy", "chance", "n"}`` in percent; ``chance`` is the accuracy of a uniformly
    random cell (the mean fraction of the image the named box covers).
    """
    hits, chance, n = 0, 0.0, 0
    caps = range(len(split.captions)) if max_captions is None else range(min(max_captions, len(split.captions)))
    for c in caps:
        cap = split.captions[c]
        scene = split.scenes[int(split.cap_to_img[c])]
        for hm, oi in zip(phrase_heatmaps(model, split, vocab, c), cap.objects):
            h, w = hm.shape
            y, x = divmod(int(hm.flatten().argmax()), w)
            px, py = (x + 0.5) * scene.size / w, (y + 0.5) * scene.size / h   # cell centre in pixels
            x1, y1, x2, y2 = scene.objects[oi].box
            hits += int(x1 <= px <= x2 and y1 <= py <= y2)
            chance += (x2 - x1) * (y2 - y1) / scene.size ** 2
            n += 1
    return {"accuracy": 100.0 * hits / max(n, 1), "chance": 100.0 * chance / max(n, 1), "n": n}
