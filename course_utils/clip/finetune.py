"""Contrastive fine-tuning of CLIP on word crops (seed 004 §2.4.2, Algorithm 1, Table 2.5).

* :func:`clip_contrastive_loss` — the symmetric loss of Algorithm 1 (Eq. 2.4.1-2.4.2);
* :func:`distinct_pairs`, :func:`contrastive_step` — one batch, each text once, ``1/τ`` capped;
* :class:`WordCropDataset`, :func:`pair_dataset` — the (crop, word) pairs of a split;
* :func:`finetune_optimizer` — Adam with Table 2.5's settings, the temperature apart;
* :func:`training_step` — one iteration written out (notebook 07's exercise);
* :func:`finetune` — the whole run through :func:`course_utils.train.fit`, checkpoints kept at
  the thesis's epochs (:func:`checkpoint_epochs`).

Choosing the checkpoint by precision, as notebook 07 does, is the recipe
:func:`course_utils.recipes.clip_finetune.finetune_and_select`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import distributed
from ..devices import module_device, to_device
from ..history import History
from ..svt import SVTSplit
from ..train import fit
from .loading import ClipBundle, eval_unit

__all__ = [
    "MAX_LOGIT_SCALE",
    "WordCropDataset",
    "checkpoint_epochs",
    "clamp_logit_scale",
    "clip_contrastive_loss",
    "contrastive_step",
    "distinct_pairs",
    "finetune",
    "finetune_optimizer",
    "pair_dataset",
    "training_step",
]

#: CLIP's cap on ``1/τ`` (open_clip clamps ``logit_scale`` to ``log(100)`` while training).
MAX_LOGIT_SCALE = 100.0


def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                          logit_scale: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The symmetric contrastive loss of Algorithm 1 (Eq. 2.4.1-2.4.2).

    Args:
        image_emb: ``(B, d)`` image embeddings of the batch (normalised here, step (d)).
        text_emb: ``(B, d)`` text embeddings; pair ``b`` is ``(image_emb[b], text_emb[b])``.
        logit_scale: ``1/τ`` (a tensor to learn it, as CLIP does).

    Returns:
        ``{"loss": (L_I + L_T)/2, "loss_image": L_I, "loss_text": L_T}``, scalar tensors.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"clip_contrastive_loss: expected two (B, d) tensors of the same shape, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    v_i, v_t = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    S = logit_scale * v_i @ v_t.T  # S_ij, step (e)
    target = torch.arange(S.shape[0], device=S.device)
    loss_i = F.cross_entropy(S, target)  # rows: each image against all texts (Eq. 2.4.1)
    loss_t = F.cross_entropy(S.T, target)  # columns: each text against all images (Eq. 2.4.2)
    return {"loss": 0.5 * (loss_i + loss_t), "loss_image": loss_i, "loss_text": loss_t}


def distinct_pairs(tokens: torch.Tensor) -> torch.Tensor:
    """Which pairs of a batch to keep so that every text occurs once: ``(B, L) -> (B,)`` bool.

    Algorithm 1's right answers are the diagonal of ``S``.  When one word appears twice in a
    batch (THE cut from two images), each copy is also the *negative* of the other: the loss then
    pushes an image away from its own word and can only be lowered by flattening ``S``, so the
    learnt temperature falls instead of rising.  Keeping the first pair of each text makes the
    batch what step (a) assumes, ``B`` distinct pairs.  The first occurrence wins, so the choice
    is deterministic.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens: expected shape (B, context_length), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    # every helper tensor on the tokens' device: fit hands this function a batch on the GPU
    dev = tokens.device
    _, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    b = tokens.shape[0]
    first = torch.full((int(inverse.max()) + 1,) if b else (0,), b, dtype=torch.long, device=dev)
    first = first.scatter_reduce(0, inverse, torch.arange(b, device=dev), reduce="amin")
    keep = torch.zeros(b, dtype=torch.bool, device=dev)
    keep[first] = True
    return keep


def clamp_logit_scale(model: torch.nn.Module) -> torch.Tensor:
    """Cap the model's learnt ``1/τ`` at :data:`MAX_LOGIT_SCALE` in place and return ``exp(logit_scale)``.

    open_clip clamps after every optimiser step; doing it before each forward is the same for
    the loss and keeps Adam's momentum from carrying the parameter past the cap unseen.
    """
    with torch.no_grad():
        model.logit_scale.clamp_(max=float(np.log(MAX_LOGIT_SCALE)))
    return model.logit_scale.exp()


def _batch_on_model(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a ``(images, tokens)`` batch and move it to ``model``'s device.

    A batch built by hand from a dataset (notebook 07's one-batch demo) is on the CPU while the
    model is on ``env.device``; :func:`course_utils.train.fit` has already moved its batches, and
    moving a tensor to where it is returns it unchanged.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch: expected (images (B, 3, H, W), tokens (B, context_length)), got "
                         f"{type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""))
    images, tokens = batch
    if not (isinstance(images, torch.Tensor) and isinstance(tokens, torch.Tensor)) or len(images) != len(tokens):
        raise ValueError("batch: expected two tensors with one row per pair, got "
                         + " and ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                                        for t in (images, tokens)))
    images, tokens = to_device((images, tokens), module_device(model))
    return images, tokens


def contrastive_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``step_fn`` for :func:`course_utils.train.fit`: Algorithm 1 on one batch.

    Args:
        batch: ``(images (B, 3, H, W), tokens (B, context_length))`` on any device (moved to
            the model's).

    Returns:
        ``{"loss", "loss_image", "loss_text"}`` (scalars, on the model's device) over the
        batch's distinct texts (:func:`distinct_pairs`), with the learnt ``1/τ`` capped at
        :data:`MAX_LOGIT_SCALE`.
    """
    images, tokens = _batch_on_model(model, batch)
    if distributed.is_distributed():
        # Under torchrun: Algorithm 1 on the *global* batch.  Every rank encodes its share, the
        # embeddings of all shares are gathered (differentiably), and each rank computes the same
        # loss over every image and text; each text is kept once across all shares.
        image_emb = distributed.all_gather_rows(model.encode_image(images))
        text_emb = distributed.all_gather_rows(model.encode_text(tokens))
        keep = distinct_pairs(distributed.all_gather_rows(tokens))
        return clip_contrastive_loss(image_emb[keep], text_emb[keep], clamp_logit_scale(model))
    keep = distinct_pairs(tokens)
    images, tokens = images[keep], tokens[keep]
    return clip_contrastive_loss(model.encode_image(images), model.encode_text(tokens), clamp_logit_scale(model))


class WordCropDataset(torch.utils.data.Dataset):
    """``(image tensor (3, H, W), token ids (context_length,))`` pairs for contrastive fine-tuning.

    Args:
        images: PIL word crops (or whole images).
        texts: one word per image.
        bundle: gives the model's ``preprocess`` and ``tokenizer``.

    Preprocessing happens once here, so epochs cost only the model's time.
    """

    def __init__(self, images: Sequence[Image.Image], texts: Sequence[str], bundle: ClipBundle) -> None:
        if len(images) != len(texts):
            raise ValueError(f"WordCropDataset: {len(images)} images but {len(texts)} texts")
        self.texts = list(texts)
        self.x = torch.stack([bundle.preprocess(im) for im in images]) if images else torch.zeros(0)
        self.tokens = bundle.tokenizer(self.texts) if texts else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.tokens[i]


def pair_dataset(split: SVTSplit, bundle: ClipBundle, unit: str | None = None,
                 pads: Sequence[float] = (0.0,)) -> WordCropDataset:
    """``(image (3, H, W), tokens (context_length,))`` pairs of Algorithm 1 from ``split``.

    One pair per tagged word: the word crop (small CLIP) or the whole image (ViT-B/32) with the
    word as its text.  With the small CLIP, ``pads`` cuts every word once per entry, its box grown
    by that fraction of the box size on each side (the profile's ``ft_crop_pads``): a word
    rectangle drawn by a person or a detector is never exact, and 195 crops seen 20 times each
    teach the model those 195 pictures more than the words in them.  Whole images (``unit="image"``)
    ignore ``pads``.
    """
    unit = unit or eval_unit(bundle)
    if unit == "crop":
        crops = [c for pad in pads for c in split.word_crops(pad=float(pad))]
        images, texts = [c for c, _, _ in crops], [t for _, t, _ in crops]
    else:
        images, texts = [], []
        for im in split:
            if im.words:
                picture = im.load()
                images += [picture] * len(im.words)
                texts += im.tags
    if not images:
        raise ValueError(f"SVT split {split.name!r}: no tagged words to fine-tune on")
    return WordCropDataset(images, texts, bundle)


def training_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                  optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One iteration of Algorithm 1's loop, steps (b)-(i): forward, loss, backward, update.

    Args:
        model: an open_clip ``CLIP`` (``encode_image``, ``encode_text``, ``logit_scale``), on any device.
        batch: ``(images (B, 3, H, W), tokens (B, context_length))``, pair ``b`` matching; on
            the CPU or the model's device (moved to the model's by :func:`contrastive_step`).
        optimizer: over ``model``'s parameters.

    Returns:
        ``{"loss", "loss_image", "loss_text"}`` as Python floats (before the update).
    """
    model.train()
    out = contrastive_step(model, batch)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in out.items()}


def finetune_optimizer(model: torch.nn.Module, svt_cfg: dict) -> torch.optim.Adam:
    """Adam with the Table 2.5 hyper-parameters of the profile (``ft_lr``, ``ft_betas``, ``ft_eps``,
    ``ft_weight_decay``).  ``torch.optim.Adam``'s ``weight_decay`` adds ``λθ`` to the gradient,
    the L2 penalty the thesis writes (``L + λ Σ θ²``), not AdamW's decoupled decay.

    The temperature (``model.logit_scale``, CLIP's learnt ``log(1/τ)``) is a parameter group of
    its own: no weight decay (it is not a weight; open_clip exempts it too) and its own learning
    rate ``ft_logit_scale_lr``.  Adam moves a parameter by about ``lr`` per step whatever its
    gradient, so at 5e-5 a temperature that starts far from CLIP's cap of 100 (the small CLIP's
    is 41) would need thousands of steps to move; ViT-B/32's already sits at the cap.
    """
    named = list(model.named_parameters())
    scale = [p for n, p in named if n == "logit_scale"]
    groups: list[dict] = [{"params": [p for n, p in named if n != "logit_scale"]}]
    if scale:
        groups.append({"params": scale, "weight_decay": 0.0,
                       "lr": float(svt_cfg.get("ft_logit_scale_lr", svt_cfg["ft_lr"]))})
    return torch.optim.Adam(groups, lr=svt_cfg["ft_lr"], betas=tuple(svt_cfg["ft_betas"]),
                            eps=svt_cfg["ft_eps"], weight_decay=svt_cfg["ft_weight_decay"])


def checkpoint_epochs(svt_cfg: dict) -> list[int]:
    """The thesis's checkpoints (+1 ... +40) that this profile reaches: ``ft_checkpoints`` clipped
    to ``ft_epochs``, sorted."""
    return sorted({int(e) for e in svt_cfg["ft_checkpoints"] if 1 <= int(e) <= int(svt_cfg["ft_epochs"])})


def finetune(model: torch.nn.Module, train_set: torch.utils.data.Dataset, svt_cfg: dict,
             ckpt_dir: str | Path, *, step_fn=contrastive_step, resume: bool = True, seed: int = 0,
             max_steps: int | None = None, progress: bool = True) -> History:
    """Fine-tune ``model`` with Algorithm 1 through :func:`course_utils.train.fit`.

    Checkpoints are written every epoch; only :func:`checkpoint_epochs` (and the latest) are kept.
    A second call with the same ``ckpt_dir`` resumes (or, when finished, just returns the history).

    Returns:
        the run's :class:`course_utils.train.History` (``loss``, ``loss_image``, ``loss_text``).
    """
    optimizer = finetune_optimizer(model, svt_cfg)
    return fit(model, step_fn, train_set, epochs=int(svt_cfg["ft_epochs"]),
               batch_size=int(svt_cfg["ft_batch_size"]), optimizer=optimizer, ckpt_dir=ckpt_dir,
               resume=resume, seed=seed, keep_epochs=checkpoint_epochs(svt_cfg), max_steps=max_steps,
               progress=progress, desc="fine-tune CLIP")
