"""What the course's two training scripts share: pinned numerics, the evaluation split and the
learning-rate schedule."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

EVAL_SEED = 0  # the cpu profile's SynthSVT seed, reported in both manifests


def pin_numerics() -> None:
    """Pin MKL, oneDNN and ATen to their AVX2 code paths; call it *before* torch is imported.

    Results then do not depend on the CPU model (AVX-512 kernels sum in another order than AVX2
    ones), so the same command writes the same bytes on any x86-64 CPU with AVX2.
    """
    os.environ.setdefault("MKL_CBWR", "AVX2")
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def synthsvt_test(n_images: int):
    """The first ``n_images`` images of the ``cpu`` profile's SynthSVT test split (an
    :class:`course_utils.svt.SVTSplit`, the folder cached in the temporary directory)."""
    from course_utils import synthsvt as ss
    from course_utils.profiles import get_config
    from course_utils.svt import load_svt

    cfg = get_config("cpu").svt
    assert cfg["seed"] == EVAL_SEED, "the manifests report EVAL_SEED: keep them equal"
    root = Path(tempfile.gettempdir()) / f"synthsvt_cpu_seed{cfg['seed']}"
    ss.make_synthsvt_for_profile(root, cfg)
    split = load_svt(root, "test")
    split.images = split.images[:n_images]
    return split


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up then cosine decay to 2 % of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))
