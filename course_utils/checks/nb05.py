"""Checks for notebook 05 (query-agnostic retrieval with an object prior).

Each ``check_*`` runs the student's function on printed and hidden cases against the reference
in :mod:`course_utils.query_agnostic` and returns the function the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import query_agnostic as ref
from . import Case, Hint, run_exercise

EXERCISES = ["5.1 keep_regions", "5.2 decoder_block", "5.3 contrastive_loss"]


def _keep_pixels(boxes, image_size, alpha):
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return area > alpha


def _keep_at_least(boxes, image_size, alpha):
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return area / float(image_size) ** 2 >= alpha


KEEP_HINTS = (
    Hint("alpha is a fraction of the image: divide each box's area by the image's area first",
         _keep_pixels),
    Hint("the rule is strict, Area / Area(image) > alpha: with alpha = 0 a box of zero area is "
         "not kept", _keep_at_least),
)


def _contrastive_one_way(img, txt, temperature, img_ids=None):
    logits = img @ txt.T / temperature
    if img_ids is not None:
        same = (img_ids[:, None] == img_ids[None, :]) & ~torch.eye(len(img_ids), dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
    return nn.functional.cross_entropy(logits, torch.arange(len(img)))


def _contrastive_times_temperature(img, txt, temperature, img_ids=None):
    return ref.contrastive_loss(img, txt, 1.0 / temperature, img_ids)


def _contrastive_no_id_mask(img, txt, temperature, img_ids=None):
    return ref.contrastive_loss(img, txt, temperature, None) if img_ids is not None else None


CONTRASTIVE_HINTS = (
    Hint("only one direction: the symmetric loss averages image -> text and text -> image "
         "cross-entropies", _contrastive_one_way),
    Hint("the similarities are multiplied by the temperature: logits = similarity / temperature",
         _contrastive_times_temperature),
    Hint("captions of the same image are used as negatives of each other: mask the pairs that "
         "share an image (img_ids), the diagonal excepted", _contrastive_no_id_mask),
)


def check_keep_regions(fn: Callable) -> Callable:
    """Exercise 5.1: ``keep_regions(boxes (..., k, 4), image_size, alpha) -> (..., k) bool``."""
    g = torch.Generator().manual_seed(501)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 9.0]])
    xy = torch.rand(2, 6, 2, generator=g) * 40
    rand = torch.cat([xy, xy + torch.rand(2, 6, 2, generator=g) * 24], -1)
    cases = [
        Case("100 px image, alpha 0.005 (a zero-area box is never kept)", (boxes, 100, 0.005),
             expected=torch.tensor([True, False, False])),
        Case("alpha 0 keeps every box with an area", (boxes, 100, 0.0)),
        Case("a batch (2, 6, 4) of random boxes, 64 px", (rand, 64, 0.02)),
    ]
    hidden = [Case("h", (rand, 64, 0.05)), Case("h", (boxes, 20, 0.1))]
    return run_exercise(EXERCISES[0], fn, ref.keep_regions, cases, hidden, hints=KEEP_HINTS)


def _decoder_parts(image, regions, keep, ln_q, ln_kv, attn, use_keep=True):
    q, kv = ln_q(image).unsqueeze(1), ln_kv(regions)
    empty = ~keep.any(dim=1)
    pad = (~keep & ~empty[:, None]) if use_keep else None
    att, _ = attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
    return att.squeeze(1).masked_fill(empty[:, None], 0.0) if use_keep else att.squeeze(1)


def _decoder_no_ffn_residual(image, regions, keep, ln_q, ln_kv, attn, ffn):
    return ffn(image + _decoder_parts(image, regions, keep, ln_q, ln_kv, attn))


def _decoder_no_attention_residual(image, regions, keep, ln_q, ln_kv, attn, ffn):
    y = _decoder_parts(image, regions, keep, ln_q, ln_kv, attn)
    return y + ffn(y)


def _decoder_keep_ignored(image, regions, keep, ln_q, ln_kv, attn, ffn):
    y = image + _decoder_parts(image, regions, keep, ln_q, ln_kv, attn, use_keep=False)
    return y + ffn(y)


DECODER_HINTS = (
    Hint("the FFN's residual is missing: Y_hat = Y + FFN(Y)", _decoder_no_ffn_residual),
    Hint("the attention's residual is missing: Y = I + MHSA(...)", _decoder_no_attention_residual),
    Hint("the regions the object prior skipped were attended to: pass them as key_padding_mask "
         "(True = ignore)", _decoder_keep_ignored),
)


def check_decoder_block(fn: Callable) -> Callable:
    """Exercise 5.2: ``decoder_block(image (B, d), regions (B, k, d), keep (B, k), ln_q, ln_kv, attn, ffn) -> (B, d)``."""
    torch.manual_seed(502)
    d = 8
    block = ref.DecoderBlock(d, 2).eval()
    layers = (block.ln_q, block.ln_kv, block.attn, block.ffn)
    g = torch.Generator().manual_seed(502)
    img, reg = torch.randn(3, d, generator=g), torch.randn(3, 5, d, generator=g)
    all_kept = torch.ones(3, 5, dtype=torch.bool)
    some = torch.tensor([[True, False, True, True, False], [True] * 5, [False, False, False, False, True]])
    none_ = some.clone()
    none_[1] = False
    cases = [
        Case("every region kept", (img, reg, all_kept, *layers)),
        Case("some regions skipped by the object prior", (img, reg, some, *layers)),
        Case("an image with no region left (Y = I: no attention term)", (img, reg, none_, *layers)),
    ]
    hidden = [Case("h", (torch.randn(4, d, generator=g), torch.randn(4, 7, d, generator=g),
                         torch.rand(4, 7, generator=g) > 0.4, *layers))]
    with torch.no_grad():
        return run_exercise(EXERCISES[1], fn, ref.decoder_block, cases, hidden, atol=1e-5,
                            hints=DECODER_HINTS)


def check_contrastive_loss(fn: Callable) -> Callable:
    """Exercise 5.3: ``contrastive_loss(img (B, d), txt (B, d), temperature, img_ids=None) -> scalar``."""
    g = torch.Generator().manual_seed(503)

    def unit(*s):
        return nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)

    cases = [
        Case("4 pairs, temperature 0.1", (unit(4, 8), unit(4, 8), 0.1)),
        Case("perfectly aligned pairs give a small loss", (torch.eye(4), torch.eye(4), 0.05)),
        Case("pairs 0 and 1 share an image", (unit(4, 8), unit(4, 8), 0.1), {"img_ids": torch.tensor([0, 0, 1, 2])}),
    ]
    hidden = [Case("h", (unit(16, 32), unit(16, 32), 0.05))]
    return run_exercise(EXERCISES[2], fn, ref.contrastive_loss, cases, hidden, hints=CONTRASTIVE_HINTS)
