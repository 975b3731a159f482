"""Proposal-text alignment and the end-to-end semantic detector (notebook 03, seed 000 §3.2-3.6).

The pieces, in the order the notebook builds them:

* :class:`ProposalEncoder` (Fig. 3) -- ROI pooling to ``S x S`` (``torchvision.ops.roi_pool``),
  a conv, two fully connected layers, L2 normalisation: proposals -> ``(K, d_r)``.
* :class:`QueryVocabulary` + :class:`QueryEncoder` (Fig. 4) -- word tokens, a learned ⟨ENC⟩
  token in front, a Transformer encoder; the ⟨ENC⟩ output, L2-normalised, is the query's
  ``(B, d_t)``.
* :class:`AlignmentHead` (Eq. 3) -- ``[f_r; f_t] -> 64 ReLU -> 1`` (a logit; sigmoid = Align).
* :func:`alignment_loss` (Eq. 4) and :func:`score_proposals` (Eq. 5, Score = Conf x Align).
* :class:`SemanticDetector` -- the RPN of notebook 02 plus all of the above, trained end to end
  with ``L = L_rpn + L_align`` (§3.6) through :func:`detector_step`; the training recipe that
  notebook 03 and ``benchmarks/detector.py`` share is
  :func:`course_utils.recipes.detection.train_detector`.

Where §3.6 is vague -- which boxes the alignment head sees during training -- we take the
decoded (and detached) boxes of the RPN's positive anchors, labelled with the alignment label of
the ground-truth object each anchor was matched to, plus the ground-truth boxes themselves
(``detector.align_gt_boxes``) so that the head also sees well-placed boxes from the first step.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import clip_boxes_to_image, roi_pool

from .boxes import decode_boxes
from .devices import module_device
from .distributed import example_generators, global_mean
from .rpn import RPN, build_rpn, check_targets
from .shapes import QUERY_WORDS

__all__ = [
    "AlignmentHead",
    "Detections",
    "ProposalEncoder",
    "QueryEncoder",
    "QueryVocabulary",
    "SemanticDetector",
    "alignment_loss",
    "build_detector",
    "clean_targets",
    "detector_step",
    "score_proposals",
]

PAD, UNK = "<pad>", "<unk>"


# --------------------------------------------------------------------------------------------
# Proposal encoder (Fig. 3)
# --------------------------------------------------------------------------------------------


class ProposalEncoder(nn.Module):
    """ROI pool -> conv -> FC -> FC -> L2 norm (Fig. 3).

    ``forward(features (B, C, H_f, W_f), boxes: list of B tensors (K_i, 4) in image pixels)``
    returns ``(sum K_i, embed_dim)`` unit vectors, in the order of the boxes.
    """

    def __init__(self, in_channels: int, spatial_scale: float, roi_size: int = 2,
                 hidden_channels: int = 256, hidden_dim: int = 256, embed_dim: int = 64):
        super().__init__()
        self.spatial_scale = spatial_scale
        self.roi_size = roi_size
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.fc1 = nn.Linear(hidden_channels * roi_size * roi_size, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, features: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        # roi_pool takes image-pixel boxes and maps them to the feature map with spatial_scale.
        pooled = roi_pool(features, [b.to(features.dtype) for b in boxes],
                          output_size=self.roi_size, spatial_scale=self.spatial_scale)
        x = F.relu(self.conv(pooled)).flatten(1)
        x = self.fc2(F.relu(self.fc1(x)))
        return F.normalize(x, dim=-1)


# --------------------------------------------------------------------------------------------
# Text encoder (Fig. 4)
# --------------------------------------------------------------------------------------------


class QueryVocabulary:
    """Words <-> ids.  Id 0 is padding, id 1 the unknown token; the ⟨ENC⟩ token is not a word but a
    learned vector inside :class:`QueryEncoder`.

    ``encode(["red circles", ...])`` lower-cases, splits on anything that is not a letter, maps each
    word to its id and pads to the longest query.  A word outside the vocabulary becomes ``<unk>``
    and a warning names it: the model has never seen it, so the student should know its meaning
    is lost.
    """

    def __init__(self, words: Sequence[str] = QUERY_WORDS):
        self.itos = [PAD, UNK] + sorted(set(words) - {PAD, UNK})
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """``"Find the RED circles!" -> ["find", "the", "red", "circles"]``."""
        return re.findall(r"[a-z]+", text.lower())

    def encode(self, texts: Sequence[str], max_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries -> ``ids (B, L)`` int64 and ``padding_mask (B, L)`` bool (True = padding).

        Raises ``ValueError`` for a query with no word at all; warns once per call about unknown
        words and about queries cut to ``max_len`` words.
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a list of queries; wrap a single query as [query]")
        rows, unknown = [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"query {i}: expected a str, got {type(text).__name__}")
            words = self.tokenize(text)
            if not words:
                raise ValueError(f"query {i} ({text!r}) has no words: type something like 'red circles'")
            if len(words) > max_len:
                warnings.warn(f"query {i} has {len(words)} words; only the first {max_len} are used",
                              stacklevel=2)
                words = words[:max_len]
            unknown += [w for w in words if w not in self.stoi]
            rows.append([self.stoi.get(w, self.stoi[UNK]) for w in words])
        if unknown:
            known = ", ".join(w for w in self.itos[2:])
            warnings.warn(f"unknown word(s) {sorted(set(unknown))} mapped to {UNK}; the model only "
                          f"knows: {known}", stacklevel=2)
        length = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids == self.stoi[PAD]


class QueryEncoder(nn.Module):
    """Word embeddings + positions, a learned ⟨ENC⟩ token in front, a Transformer encoder (Fig. 4).

    ``forward(ids (B, L), padding_mask (B, L))`` returns the ⟨ENC⟩ output ``(B, embed_dim)``,
    L2-normalised.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, num_heads: int = 2,
                 num_layers: int = 1, ff_dim: int = 128, max_len: int = 16, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.token_embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len + 1, embed_dim))  # +1 for ⟨ENC⟩
        self.enc_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.enc_token, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, ff_dim, dropout, batch_first=True)
        # enable_nested_tensor=False: the fast path would change numerics between train and eval.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2:
            raise ValueError(f"ids: expected shape (B, L), got {tuple(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"ids: {ids.shape[1]} tokens, more than max_len={self.max_len}")
        b = ids.shape[0]
        x = torch.cat([self.enc_token.expand(b, -1, -1), self.token_embed(ids)], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        # ⟨ENC⟩ is never padding, so every query attends to at least one position.
        mask = torch.cat([padding_mask.new_zeros((b, 1)), padding_mask], dim=1)
        x = self.encoder(x, src_key_padding_mask=mask)
        return F.normalize(x[:, 0], dim=-1)


# --------------------------------------------------------------------------------------------
# Alignment (Eq. 3, Eq. 4) and scoring (Eq. 5)
# --------------------------------------------------------------------------------------------


class AlignmentHead(nn.Module):
    """Eq. 3: ``Align(r, t) = sigmoid(W2 relu(W1 [f_r; f_t] + b1) + b2)``.

    ``forward(region (K, d_r), text (K, d_t)) -> (K,)`` logits; ``torch.sigmoid`` of them is Align.
    Returning logits lets the loss use the numerically stable ``binary_cross_entropy_with_logits``.
    """

    def __init__(self, region_dim: int = 64, text_dim: int = 64, hidden_dim: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(region_dim + text_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 1)
        # He initialisation for what fc1 really receives: two unit vectors, |z|^2 = 2, so
        # var(w) = 2 / |z|^2 = 1.  PyTorch's default (var ~ 1 / (3 fan_in)) assumes unit-variance
        # inputs; on unit-norm embeddings it gives pre-activations ~0.07 and the head sits at the
        # base rate for hundreds of steps before it starts to learn.
        nn.init.normal_(self.fc1.weight, std=1.0)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, region: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if region.shape[0] != text.shape[0]:
            raise ValueError(f"region {tuple(region.shape)} and text {tuple(text.shape)} must "
                             "have one row per proposal-text pair")
        z = torch.cat([region, text], dim=-1)
        return self.fc2(F.relu(self.fc1(z))).squeeze(-1)


def alignment_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 4, the mean binary cross-entropy: ``(N,)`` logits, ``(N,)`` 0/1 labels -> scalar.

    With ``N = 0`` (a batch without a single object) the loss is 0 and still part of the graph.
    """
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def score_proposals(conf: torch.Tensor, align: torch.Tensor, threshold: float = 0.5,
                    top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: ``Score = Conf x Align``; keep scores above ``threshold``, best first, at most ``top_k``.

    Args:
        conf: ``(K,)`` RPN confidences in [0, 1].
        align: ``(K,)`` alignment probabilities in [0, 1].

    Returns:
        ``(keep (M,) int64 indices into the K proposals, scores (M,))``, sorted by decreasing score.
    """
    scores = conf * align
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] > threshold]
    if top_k is not None:
        order = order[:top_k]
    return order, scores[order]


# --------------------------------------------------------------------------------------------
# The end-to-end model
# --------------------------------------------------------------------------------------------


@dataclass
class Detections:
    """One image's output for one query.

    Attributes:
        boxes: ``(K, 4)`` every RPN proposal (after NMS), best RPN confidence first.
        conf: ``(K,)`` RPN confidence (Conf of Eq. 5).
        align: ``(K,)`` alignment probability (Align of Eq. 3).
        score: ``(K,)`` Conf x Align (Eq. 5).
    """

    boxes: torch.Tensor
    conf: torch.Tensor
    align: torch.Tensor
    score: torch.Tensor

    def select(self, threshold: float = 0.5, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept boxes and their scores (Eq. 5 with a threshold and top-k)."""
        keep, scores = score_proposals(self.conf, self.align, threshold, top_k)
        return self.boxes[keep], scores


class SemanticDetector(nn.Module):
    """RPN + proposal encoder + query encoder + alignment head, trained end to end (Fig. 1).

    * ``forward(images (B, 3, H, W), queries: list of B str, boxes: list of (N_i, 4),
      aligned: list of (N_i,) bool)`` -> losses ``{"rpn", "rpn_cls", "rpn_box", "align"}``.
    * ``detect(images, queries)`` -> a list of :class:`Detections`, one per image.
    """

    def __init__(self, rpn: RPN, vocab: QueryVocabulary, embed_dim: int = 64, roi_size: int = 2,
                 proposal_channels: int = 256, proposal_hidden: int = 256, text_heads: int = 2,
                 text_layers: int = 1, text_ff_dim: int = 128, max_query_len: int = 16,
                 align_hidden: int = 64, align_gt_boxes: bool = True, align_weight: float = 1.0):
        super().__init__()
        self.rpn = rpn
        self.align_weight = align_weight
        self.vocab = vocab
        self.max_query_len = max_query_len
        self.align_gt_boxes = align_gt_boxes
        stride = rpn.backbone.stride
        self.proposal_encoder = ProposalEncoder(rpn.out_channels, 1.0 / stride, roi_size,
                                                proposal_channels, proposal_hidden, embed_dim)
        self.text_encoder = QueryEncoder(len(vocab), embed_dim, text_heads, text_layers,
                                         text_ff_dim, max_query_len)
        self.alignment = AlignmentHead(embed_dim, embed_dim, align_hidden)

    def encode_queries(self, queries: Sequence[str], device: torch.device) -> torch.Tensor:
        """``B`` strings -> ``(B, embed_dim)`` unit vectors."""
        ids, mask = self.vocab.encode(list(queries), self.max_query_len)
        return self.text_encoder(ids.to(device), mask.to(device))

    def align_logits(self, features: torch.Tensor, boxes: Sequence[torch.Tensor],
                     text: torch.Tensor) -> torch.Tensor:
        """Alignment logits of every box with its own image's query: ``-> (sum K_i,)``."""
        counts = torch.tensor([len(b) for b in boxes], device=text.device)
        if int(counts.sum()) == 0:
            return text.new_zeros(0)
        region = self.proposal_encoder(features, boxes)
        return self.alignment(region, text.repeat_interleave(counts, dim=0))

    def forward(self, images: torch.Tensor, queries: Sequence[str], boxes: Sequence[torch.Tensor],
                aligned: Sequence[torch.Tensor],
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                extra_queries: Sequence[Sequence[str]] | None = None,
                extra_aligned: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Losses of one batch; ``extra_queries[i]`` (``k_i`` str) with ``extra_aligned[i]``
        (``(k_i, N_i)`` bool) add more queries of image ``i`` to the alignment loss.

        ``generator`` samples the anchors: one for the batch, or one per image (what
        :func:`detector_step` passes, so that a batch split over processes samples the same).
        Under ``torchrun`` the alignment loss is the mean over the global batch's boxes
        (:func:`course_utils.distributed.global_mean`)."""
        if not (len(queries) == len(boxes) == len(aligned) == images.shape[0]):
            raise ValueError(f"expected one query, box tensor and aligned tensor per image "
                             f"({images.shape[0]}), got {len(queries)}, {len(boxes)}, {len(aligned)}")
        extra_queries = extra_queries or [[] for _ in queries]
        extra_aligned = extra_aligned or [torch.zeros((0, len(b)), dtype=torch.bool) for b in boxes]
        out = self.rpn(images)
        targets = self.rpn.assign(out, boxes, generator)
        losses = self.rpn.loss(out, targets)

        # §3.6: the positives of the RPN step are what the alignment head learns from.
        h, w = images.shape[-2:]
        train_boxes, texts, labels, rows = [], [], [], []
        start = 0
        for i, t in enumerate(targets):
            pred = decode_boxes(out["deltas"][i, t.pos_idx].detach(), out["anchors"][t.pos_idx])
            pred = clip_boxes_to_image(pred, (h, w))
            matched = t.matched
            if self.align_gt_boxes:
                pred = torch.cat([pred, boxes[i].to(pred.dtype)])
                matched = torch.cat([matched, torch.arange(len(boxes[i]), device=matched.device)])
            train_boxes.append(pred)
            if extra_aligned[i].shape[0] != len(extra_queries[i]):
                raise ValueError(f"image {i}: {len(extra_queries[i])} extra queries but "
                                 f"{extra_aligned[i].shape[0]} rows of extra alignment labels")
            # each query of the image sees the same boxes: one row per (query, box)
            for query, lab in zip([queries[i], *extra_queries[i]], [aligned[i], *extra_aligned[i]]):
                texts.append(query)
                labels.append(lab.to(pred.device)[matched].float())
                rows.append(torch.arange(start, start + len(pred), device=pred.device))
            start += len(pred)
        text = self.encode_queries(texts, images.device)
        if start == 0:
            logits = text.new_zeros(0)
        else:
            region = self.proposal_encoder(out["features"], train_boxes)
            text_idx = torch.cat([torch.full((len(r),), j, device=text.device) for j, r in enumerate(rows)])
            logits = self.alignment(region[torch.cat(rows)], text[text_idx])
        losses["align"] = global_mean(alignment_loss(logits, torch.cat(labels)), logits.numel())
        return losses

    @torch.no_grad()
    def detect(self, images: torch.Tensor, queries: Sequence[str],
               post_nms_top_n: int | None = None) -> list[Detections]:
        """RPN proposals of each image scored against its query (Eq. 5 inputs)."""
        if len(queries) != images.shape[0]:
            raise ValueError(f"expected one query per image ({images.shape[0]}), got {len(queries)}")
        out = self.rpn(images)
        props = self.rpn.proposals(out, post_nms_top_n)
        text = self.encode_queries(queries, images.device)
        logits = self.align_logits(out["features"], [p[0] for p in props], text)
        result, start = [], 0
        for boxes, conf in props:
            align = torch.sigmoid(logits[start: start + len(boxes)])
            start += len(boxes)
            result.append(Detections(boxes, conf, align, conf * align))
        return result

    def search(self, image: torch.Tensor, query: str, threshold: float = 0.5,
               top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One image ``(3, H, W)`` and one query -> the boxes ``(M, 4)`` it selects and their scores.

        The image may be on any device (it is moved to the model's); boxes ``(M, 4)`` and scores
        ``(M,)`` come back on the CPU, ready to draw.  Prints a line when nothing in the image
        matches, so an empty answer is never silent.
        """
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"search: image must be a (3, H, W) tensor, got {got}")
        was_training = self.training
        self.eval()
        try:
            det = self.detect(image[None].to(module_device(self)), [query])[0]
        finally:
            self.train(was_training)
        boxes, scores = det.select(threshold, top_k)
        if len(boxes) == 0:
            best = float(det.score.max()) if len(det.score) else 0.0
            print(f"no object matches {query!r} (best score {best:.2f} <= threshold {threshold})")
        return boxes.cpu(), scores.cpu()


def clean_targets(batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """Validate a collated batch's boxes; drop zero-area boxes (with a warning) and their labels.

    Returns ``(boxes, aligned, extra_aligned)``: per image ``(N_i, 4)``, ``(N_i,)`` and, when the
    batch has extra queries, ``(k_i, N_i)`` (else ``None``), all without the dropped boxes.
    """
    boxes, aligned, extra = [], [], []
    extra_in = batch.get("extra_aligned")
    for i, (b, a) in enumerate(zip(batch["boxes"], batch["aligned"])):
        ids = batch.get("image_id")
        where = f"batch['boxes'][{i}]" + (f" (image_id {ids[i]})" if ids is not None else "")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{where}: {b.shape[0]} boxes but {a.shape[0]} alignment labels")
        keep = check_targets(b, where)
        boxes.append(b[keep])
        aligned.append(a[keep])
        if extra_in is not None:
            e = extra_in[i]
            if e.ndim != 2 or e.shape[1] != b.shape[0]:
                raise ValueError(f"batch['extra_aligned'][{i}]: expected shape (k, {b.shape[0]}), "
                                 f"got {tuple(e.shape)}")
            extra.append(e[:, keep])
    return boxes, aligned, (extra if extra_in is not None else None)


def detector_step(model: SemanticDetector, batch: dict) -> dict[str, torch.Tensor]:
    """``train.fit`` step for notebook 03: ``loss = L_rpn + align_weight * L_align`` (§3.6).

    A batch with ``extra_queries`` (the training split with ``shapes.extra_train_queries > 0``)
    puts every query of an image into the alignment loss.

    Returns ``{"loss", "rpn", "align"}`` (scalars; the components detached, for the Fig. 7 curves).
    """
    boxes, aligned, extra = clean_targets(batch)
    # one anchor-sampling generator per image, seeded by its place in the global batch: the same
    # samples whether one process holds the batch or several share it
    losses = model(batch["image"], batch["query"], boxes, aligned,
                   generator=example_generators(batch["image"].shape[0]),
                   extra_queries=batch.get("extra_queries"), extra_aligned=extra)
    return {"loss": losses["rpn"] + model.align_weight * losses["align"], "rpn": losses["rpn"].detach(),
            "align": losses["align"].detach()}


def build_detector(cfg, vocab: QueryVocabulary | None = None) -> SemanticDetector:
    """The detector of a profile: ``build_detector(get_config())``."""
    d = cfg.detector
    return SemanticDetector(build_rpn(cfg), vocab or QueryVocabulary(), d.embed_dim, d.roi_size,
                            d.proposal_channels, d.proposal_hidden, d.text_heads, d.text_layers,
                            d.text_ff_dim, d.max_query_len, d.align_hidden, d.align_gt_boxes,
                            d.align_weight)

