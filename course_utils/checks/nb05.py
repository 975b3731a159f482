"""Checks for notebook 05 (query-agnostic retrieval with an object prior).

Each ``check_*`` runs the student's function on printed and hidden cases against the reference
in :mod:`course_utils.query_agnostic` and returns the function the rest of the notebook should use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import query_agnostic as ref
from . import Case, run_exercise

EXERCISES = ["5.1 keep_regions", "5.2 decoder_block", "5.3 contrastive_loss"]


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
    return run_exercise(EXERCISES[0], fn, ref.keep_regions, cases, hidden)


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
        return run_exercise(EXERCISES[1], fn, ref.decoder_block, cases, hidden, atol=1e-5)


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
    return run_exercise(EXERCISES[2], fn, ref.contrastive_loss, cases, hidden)
