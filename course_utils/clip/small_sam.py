"""The course's small Segment Anything: SAM's architecture, shrunk, trained on SynthSVT's words.

SAM ViT-B is 94 M parameters and takes minutes per image through Table 3.2's 1024-point
generator on a CPU.  The ``cpu`` profile's object masks come instead from a model built from
the same ``segment_anything.modeling`` parts (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder`` with a ``TwoWayTransformer``) at :data:`SMALL_SAM_CONFIG`'s sizes, which the
course trains itself on SynthSVT street scenes (``tools/train_mask_generator.py``) and ships in
``data/small_sam/`` with a sha256 manifest.  It runs through the very
``SamAutomaticMaskGenerator`` code path of SAM ViT-B (:class:`course_utils.clip.masks.SamMaskSource`).

* :func:`build_sam` — a ``Sam`` of any :data:`SMALL_SAM_CONFIG`-shaped config, randomly
  initialised from a seed (also what :func:`course_utils.clip.masks.tiny_sam` builds);
* :func:`save_small_sam` / :func:`load_small_sam` — safetensors weights with their sha256 checked
  against the manifest.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from ..checkpoints import CheckpointError, reject_lfs_pointer
from .small import file_sha256

__all__ = ["SMALL_SAM_CONFIG", "SMALL_SAM_DIR", "SMALL_SAM_WEIGHTS", "build_sam", "load_small_sam",
           "save_small_sam"]

SMALL_SAM_DIR = Path(__file__).resolve().parents[2] / "data" / "small_sam"
SMALL_SAM_WEIGHTS = "small_sam.safetensors"

#: Sizes of the course's small SAM.  SynthSVT's 480 x 360 scenes are resized to 256 px on the
#: long side (SAM's ResizeLongestSide, 1024 for ViT-B), cut into 16 x 16 patches of 16 px as in
#: ViT-B; words are 13-27 px tall there.  Four global-attention blocks of width 64 (ViT-B: 12 of
#: 768, windowed), a 64-d prompt/mask space (SAM: 256) and a 2-block two-way decoder as SAM's.
SMALL_SAM_CONFIG: dict[str, Any] = {
    "image_size": 256,
    "patch_size": 16,
    "encoder_dim": 64,
    "encoder_depth": 4,
    "encoder_heads": 4,
    "mlp_ratio": 4.0,
    "prompt_dim": 64,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_heads": 4,
    "decoder_mlp_dim": 256,
    "iou_head_hidden_dim": 64,
}

_KEYS = frozenset(SMALL_SAM_CONFIG)


def build_sam(config: dict[str, Any] | None = None, seed: int = 0) -> Sam:
    """A randomly initialised ``Sam`` of ``config``'s sizes (default :data:`SMALL_SAM_CONFIG`).

    The image encoder takes ``(B, 3, image_size, image_size)`` (SAM's ``preprocess`` pads to it)
    and returns ``(B, prompt_dim, g, g)`` with ``g = image_size / patch_size``; the decoder's
    low-resolution masks are ``(4g, 4g)``.  Initialisation draws from a forked RNG seeded with
    ``seed``, so the global stream does not move.

    Raises:
        ValueError: unknown or missing keys, an image size that is not a multiple of the patch
            size, or a ``prompt_dim`` that is not a multiple of 8 (the decoder upsamples to
            ``prompt_dim // 8`` channels).
    """
    cfg = dict(SMALL_SAM_CONFIG if config is None else config)
    if set(cfg) != _KEYS:
        raise ValueError(f"build_sam: config keys {sorted(set(cfg) ^ _KEYS)} are unknown or missing; "
                         f"expected exactly {sorted(_KEYS)}")
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError(f"build_sam: image_size {cfg['image_size']} is not a multiple of patch_size {cfg['patch_size']}")
    if cfg["prompt_dim"] % 8:
        raise ValueError(f"build_sam: prompt_dim {cfg['prompt_dim']} must be a multiple of 8")
    size, grid = cfg["image_size"], cfg["image_size"] // cfg["patch_size"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=size, patch_size=cfg["patch_size"], embed_dim=cfg["encoder_dim"],
                depth=cfg["encoder_depth"], num_heads=cfg["encoder_heads"], mlp_ratio=cfg["mlp_ratio"],
                out_chans=cfg["prompt_dim"], qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=False, window_size=0, global_attn_indexes=tuple(range(cfg["encoder_depth"]))),
            prompt_encoder=PromptEncoder(embed_dim=cfg["prompt_dim"], image_embedding_size=(grid, grid),
                                         input_image_size=(size, size), mask_in_chans=cfg["mask_in_chans"]),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=cfg["decoder_depth"], embedding_dim=cfg["prompt_dim"],
                                              mlp_dim=cfg["decoder_mlp_dim"], num_heads=cfg["decoder_heads"]),
                transformer_dim=cfg["prompt_dim"], iou_head_depth=3,
                iou_head_hidden_dim=cfg["iou_head_hidden_dim"]),
            pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval()


def save_small_sam(sam: torch.nn.Module, path: str | Path) -> str:
    """Save ``sam``'s weights as safetensors (no metadata that changes between runs) and return
    the file's sha256; identical weights give identical bytes."""
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return file_sha256(path)


def load_small_sam(weights_dir: str | Path | None = None, device: str | torch.device = "cpu",
                   verbose: bool = True) -> tuple[Sam, dict[str, Any]]:
    """The course's trained small SAM from ``weights_dir`` (default ``data/small_sam``).

    Reads ``manifest.json`` (its ``config`` builds the model) and the weights, whose sha256 is
    compared with the manifest's (a warning is printed when they differ).

    Returns:
        ``(sam, manifest)``; ``sam`` is in eval mode on ``device``.

    Raises:
        FileNotFoundError: naming the missing manifest or weights file.
        CheckpointError: the weights are a git-LFS pointer, truncated, or do not fit the config.
    """
    folder = Path(weights_dir) if weights_dir is not None else SMALL_SAM_DIR
    manifest_path, path = folder / "manifest.json", folder / SMALL_SAM_WEIGHTS
    for p in (manifest_path, path):
        if not p.is_file():
            raise FileNotFoundError(f"load_small_sam: {p}: no such file (build it with "
                                    "`python tools/train_mask_generator.py`)")
    manifest = json.loads(manifest_path.read_text())
    reject_lfs_pointer(path)
    sha = file_sha256(path)
    if verbose and sha != manifest.get("sha256"):
        print(f"warning: {path} has sha256 {sha[:12]}…, the manifest says {str(manifest.get('sha256'))[:12]}…")
    sam = build_sam(manifest["config"])
    try:
        sam.load_state_dict(load_file(str(path)))
    except Exception as err:  # SafetensorError, or keys/shapes that do not fit the config
        raise CheckpointError(f"{path}: not the small SAM of {manifest_path} ({type(err).__name__}: "
                              f"{str(err)[:300]}); rebuild it with `python tools/train_mask_generator.py`") from None
    return sam.to(device).eval(), {**manifest, "path": str(path), "file_sha256": sha}
