"""Profiles: the one place that holds every size knob of the course.

``COURSE_PROFILE`` picks one of ``smoke`` (CI and tests: tiny, numbers mean nothing),
``cpu`` (synthetic data and course-sized models, about ten minutes a notebook on two CPU
cores), ``full`` (the seed papers' settings, meant for a GPU) or ``fullpath`` (``full``'s
architectures, settings and code path with the smallest data counts and steps: CI runs every
notebook in it on two CPU cores, with random weights where pretrained ones cannot be had).
Unset or ``auto`` means ``full`` when CUDA is available and ``cpu`` otherwise.

Profiles change *sizes only*.  Every notebook runs the same code path in every profile; if you
find yourself writing ``if profile == ...`` in a notebook, add a knob here instead.

Usage::

    from course_utils.profiles import get_config
    cfg = get_config()            # the active profile
    cfg.shapes.image_size         # 512 in full, 128 in cpu, 64 in smoke
"""

from __future__ import annotations

import copy
import os
from typing import Any

PROFILE_NAMES = ("smoke", "cpu", "full", "fullpath")

# Each section belongs to one part of the course.  Keys are identical across profiles
# (a test checks this) so that a notebook never meets a missing knob.
_PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        # How the notebooks run, not what they compute (no run folder depends on it):
        # loader_workers processes render/decode images for train.fit (Colab has 2 CPUs; on a
        # GPU the main process alone would spend longer on images than on steps); when pretrained
        # weights cannot be had, weights_when_unavailable says what runs instead: "fallback" (the
        # course's documented substitute: small CLIP, box masks, ...) or "random" (the same
        # architecture, randomly initialised); mixed_precision trains the detection notebooks
        # (02-03: MobileNetV2 at 512 px, batch 32) under float16 autocast on a GPU, which halves
        # the activations kept for backward (about 13 GiB in float32, over a T4's budget).
        "runtime": dict(loader_workers=2, weights_when_unavailable="fallback", mixed_precision=True),
        # seed 004 Ch. 3 (notebook 08): ODITS on the notebook-07 CLIP.  full: SAM ViT-B masks with
        # Table 3.2's generator settings; cpu/smoke: the course's small SAM (data/small_sam) through
        # the same generator, on a points_per_side grid small enough for a CPU.  The
        # shared CLIP towers stay frozen (embeddings computed once), the new layers train with
        # AdamW on the written-word mass (loss; "class_weighted" is the seed's loss, with class
        # weights (1 + count)^-power for the long-tailed vocabulary).  Without
        # notebook 07's fine-tuned checkpoint, benchmarks/odits.py first fine-tunes with its recipe
        # (finetune_clip_if_missing; off in smoke to stay under a minute).
        "odits": dict(mask_source="sam", points_per_side=32, max_objects=32, background="mean", crop=True,
                      heads=8, ff_mult=2, init="xavier", freeze_clip=True, epochs=20,
                      batch_size=32, lr=5e-4, weight_decay=0.01, class_weight_power=0.5,
                      loss="written_mass", grad_clip=1.0, seed=0, finetune_clip_if_missing=True),
        # seed 004 Ch. 2 (notebooks 06-07): SVT word spotting with CLIP.  Real SVT when present,
        # else SynthSVT (100 train / 249 test like the seed); ViT-B/32 fine-tuned with Table 2.5
        # (Adam 5e-5, betas 0.9/0.98, eps 1e-6, wd 0.2, batch 128), checkpoints at the seed's epochs.
        "svt": dict(n_train=100, n_test=249, image_size=(640, 480), seed=0, lexicon_size=50,
                    max_words=3, clip_kind="full", eval_batch_size=128,
                    ft_epochs=40, ft_batch_size=128, ft_lr=5e-5, ft_betas=(0.9, 0.98), ft_eps=1e-6,
                    ft_weight_decay=0.2, ft_checkpoints=(1, 2, 3, 4, 5, 7, 20, 40),
                    ft_logit_scale_lr=5e-5, ft_crop_pads=(0.0,), ft_ablation_live=0, download_svt=True),
        # seed 000 §4.1: 5000 images of 512x512, split 4000/500/500, 10-20 shapes each.
        "shapes": dict(image_size=512, n_train=4000, n_val=500, n_test=500,
                       min_shapes=10, max_shapes=20, min_size=40, max_size=80, extra_train_queries=0),
        # seed 000 §4.2: 64 px anchors aligned with the MobileNetV2 feature map (stride 32).
        "anchors": dict(anchor_size=64, stride=32, pos_iou=0.6, neg_iou=0.1,
                        rpn_batch_per_image=256, n_random_cases=1000),
        # seed 000 §3.1/§4.2 (notebook 02): RPN on MobileNetV2 features (1280 ch, stride 32,
        # ImageNet weights when downloadable).  Top-N and beta as torchvision's RPN; NMS at 0.1
        # because shapes never overlap, so any overlap is a second box on one object (at 0.3 such
        # boxes, IoU 0.2-0.3 with the first, were 16% of the confident proposals).  The
        # RPN-only training of notebook 02 uses §4.3's optimiser.
        "rpn": dict(backbone="mobilenet_v2", backbone_widths=(), pretrained=True, head_channels=256,
                    box_weight=1.0, smooth_l1_beta=1.0 / 9, pre_nms_top_n=1000, post_nms_top_n=100,
                    nms_iou=0.1, min_box_size=1.0, conf_thresh=0.5, recall_top_n=(1, 5, 10, 20, 50, 100),
                    optimizer="sgd", epochs=10, batch_size=32, lr=1e-2, momentum=0.9,
                    weight_decay=1e-5, lr_step=3, lr_gamma=0.9, grad_clip=10.0),
        # seed 000 §3.2-3.6/§4.2-4.3 (notebook 03): 2x2 ROI pool, 64-d embeddings, 2 heads / 1 layer
        # text transformer, 64 hidden alignment MLP; SGD 1e-2 m 0.9 wd 1e-5, StepLR(3, 0.9),
        # 10 epochs, batch 32.
        "detector": dict(embed_dim=64, roi_size=2, proposal_channels=256, proposal_hidden=256,
                         text_heads=2, text_layers=1, text_ff_dim=128, max_query_len=16,
                         align_hidden=64, align_weight=1.0, align_gt_boxes=True, score_thresh=0.5,
                         top_k=100, optimizer="sgd", epochs=10, batch_size=32, lr=1e-2, momentum=0.9,
                         weight_decay=1e-5, lr_step=3, lr_gamma=0.9, grad_clip=10.0),
        # seed 003 Ch. 3-4 / seed 001 / seed 002 (notebooks 04-05): captioned shapes scenes.
        # k_fine = 36 regions and 1024-d joint space as in seed 003 §4.4; 300-d word vectors.
        # 3000 training images and 8 epochs: sized so that notebook 04 (ten SCAN variants and the
        # matchmaps) fits a Colab T4 session; with 10000 images and 12 epochs it was estimated at
        # 82 min (course_tools.full_estimates).  The test split keeps the 1000-image protocol.
        # real_data: the datasets looked for, in order, under <cache>/retrieval_data/<name>/
        # (Karpathy-split JSON + SCAN's precomputed 36x2048 region features, layout in
        # course_utils.recipes.retrieval_data); the first one present replaces the scenes in the
        # SCAN grid and the query-agnostic model (n_train/n_val/n_test then do not apply: the
        # Karpathy splits are used whole).  Absent: one line says so and the scenes are used.
        # qa_ablation_live: how many of notebook 05's ablation rows (beyond its own model) the
        # notebook trains when no saved table exists; in full none (all twelve were estimated at
        # about 48 more minutes on a T4): RUN_ABLATION = True or benchmarks/retrieval.py trains them.
        "retrieval": dict(real_data=("f30k", "coco"), image_size=224, n_train=3000, n_val=1000, n_test=1000,
                          min_objects=3, max_objects=5, small_size=(24, 34), large_size=(52, 72),
                          k_fine=36, backbone_channels=64, backbone_epochs=4, feat_pool=2,
                          word_dim=300, embed_dim=1024, batch_size=128, epochs=8, lr=2e-4,
                          margin=0.2, lambda_softmax_t2i=9.0, lambda_softmax_i2t=4.0,
                          lambda_lse=6.0, warmup_epochs=1, eval_shard=(100, 1000),
                          loop_images=100, loop_captions=100,
                          qa_alpha=0.01, qa_heads=8, qa_epochs=24, qa_lr=5e-4, qa_layers=1, qa_ffn_norm=False, qa_loss="infonce", qa_text_tower="conv",
                          qa_ablation_live=0,
                          speed_gallery_sizes=(250, 500, 1000, 2000, 5000),
                          mm_epochs=4, mm_impostors=1, mm_loss="contrastive", mm_batch_size=32,
                          mm_margin=0.2, mm_temperature=0.1),
    },
    "cpu": {
        "runtime": dict(loader_workers=0, weights_when_unavailable="fallback", mixed_precision=False),
        # 30 epochs: on 20 held-out *training* images ODITS's F1 levels off after about 30
        "odits": dict(mask_source="small_sam", points_per_side=12, max_objects=8, background="mean", crop=True,
                      heads=4, ff_mult=2, init="xavier", freeze_clip=True, epochs=30,
                      batch_size=16, lr=1e-3, weight_decay=0.01, class_weight_power=0.5,
                      loss="written_mass", grad_clip=1.0, seed=0, finetune_clip_if_missing=True),
        # Fine-tuning the small CLIP: Table 2.5's Adam, but no weight decay (the coupled L2 penalty
        # lowers lexicon-50), each training crop cut at 4 paddings, and the temperature learnt at
        # 1e-2 (it starts at 1/tau = 41; ViT-B/32's sits at the cap).  Each choice is a row of
        # notebook 07's ablation (benchmarks/clip_svt.py measures them); ft_ablation_live: how many
        # of those rows the notebook trains itself when no saved table matches its run.
        "svt": dict(n_train=100, n_test=249, image_size=(480, 360), seed=0, lexicon_size=50,
                    max_words=3, clip_kind="small", eval_batch_size=64,
                    ft_epochs=20, ft_batch_size=32, ft_lr=5e-5, ft_betas=(0.9, 0.98), ft_eps=1e-6,
                    ft_weight_decay=0.0, ft_checkpoints=(1, 2, 3, 4, 5, 7, 20),
                    ft_logit_scale_lr=1e-2, ft_crop_pads=(0.0, 0.05, 0.1, 0.2), ft_ablation_live=0,
                    download_svt=False),
        # extra_train_queries: 8 more queries per training image for the alignment branch.  With
        # them the detector's validation alignment accuracy on ground-truth boxes reached 0.94 at
        # epoch 4 instead of 0.85, for about 35% more time per epoch (measured).
        "shapes": dict(image_size=128, n_train=2000, n_val=200, n_test=500,
                       min_shapes=10, max_shapes=20, min_size=10, max_size=20, extra_train_queries=8),
        "anchors": dict(anchor_size=16, stride=8, pos_iou=0.6, neg_iou=0.1,
                        rpn_batch_per_image=256, n_random_cases=1000),
        # Notebooks 02-03 at a quarter of the paper's scale (128 px, 16 px anchors, stride 8): a
        # small from-scratch conv backbone instead of MobileNetV2 and AdamW instead of SGD, so that
        # everything trains from scratch in minutes on two CPU cores.  Same code path as full.
        "rpn": dict(backbone="small", backbone_widths=(16, 32, 64, 64), pretrained=False,
                    head_channels=64, box_weight=1.0, smooth_l1_beta=1.0 / 9, pre_nms_top_n=1000,
                    post_nms_top_n=100, nms_iou=0.1, min_box_size=1.0, conf_thresh=0.5,
                    recall_top_n=(1, 5, 10, 20, 50, 100), optimizer="adamw", epochs=3,
                    batch_size=16, lr=2e-3, momentum=0.9, weight_decay=1e-4, lr_step=3,
                    lr_gamma=0.9, grad_clip=10.0),
        # Two text-encoder layers where the paper has one (§4.2): with one, the encoder read queries
        # as bags of words ("red circles and blue shapes" = "red shapes and blue circles", cosine
        # 0.999) and alignment accuracy stopped at 0.95; with two it learns word order after about
        # 13 epochs (notebook 03, "Which queries go wrong?").
        "detector": dict(embed_dim=64, roi_size=2, proposal_channels=64, proposal_hidden=128,
                         text_heads=2, text_layers=2, text_ff_dim=128, max_query_len=16,
                         align_hidden=64, align_weight=1.0, align_gt_boxes=True, score_thresh=0.5,
                         top_k=100, optimizer="adamw", epochs=18, batch_size=16, lr=2e-3,
                         momentum=0.9, weight_decay=1e-4, lr_step=3, lr_gamma=0.9, grad_clip=10.0),
        "retrieval": dict(real_data=(), image_size=64, n_train=2000, n_val=200, n_test=1000,
                          min_objects=3, max_objects=5, small_size=(7, 10), large_size=(15, 20),
                          k_fine=6, backbone_channels=16, backbone_epochs=2, feat_pool=2,
                          word_dim=32, embed_dim=128, batch_size=128, epochs=3, lr=2e-3,
                          margin=0.2, lambda_softmax_t2i=9.0, lambda_softmax_i2t=4.0,
                          lambda_lse=6.0, warmup_epochs=1, eval_shard=(100, 1000),
                          loop_images=40, loop_captions=40,
                          qa_alpha=0.01, qa_heads=4, qa_epochs=24, qa_lr=1e-3, qa_layers=1, qa_ffn_norm=False, qa_loss="infonce", qa_text_tower="conv",
                          qa_ablation_live=20,
                          speed_gallery_sizes=(250, 500, 1000, 2000),
                          mm_epochs=2, mm_impostors=1, mm_loss="contrastive", mm_batch_size=16,
                          mm_margin=0.2, mm_temperature=0.1),
    },
    "smoke": {
        "runtime": dict(loader_workers=0, weights_when_unavailable="fallback", mixed_precision=False),
        "odits": dict(mask_source="small_sam", points_per_side=4, max_objects=4, background="mean", crop=True,
                      heads=2, ff_mult=2, init="xavier", freeze_clip=True, epochs=2,
                      batch_size=4, lr=1e-3, weight_decay=0.01, class_weight_power=0.5,
                      loss="written_mass", grad_clip=1.0, seed=0, finetune_clip_if_missing=False),
        "svt": dict(n_train=6, n_test=8, image_size=(160, 120), seed=0, lexicon_size=50,
                    max_words=3, clip_kind="small", eval_batch_size=16,
                    ft_epochs=1, ft_batch_size=8, ft_lr=5e-5, ft_betas=(0.9, 0.98), ft_eps=1e-6,
                    ft_weight_decay=0.2, ft_checkpoints=(1,),
                    ft_logit_scale_lr=1e-2, ft_crop_pads=(0.0, 0.1), ft_ablation_live=10,
                    download_svt=False),
        "shapes": dict(image_size=64, n_train=32, n_val=8, n_test=8,
                       min_shapes=10, max_shapes=20, min_size=5, max_size=10, extra_train_queries=2),
        "anchors": dict(anchor_size=8, stride=4, pos_iou=0.6, neg_iou=0.1,
                        rpn_batch_per_image=64, n_random_cases=50),
        "rpn": dict(backbone="small", backbone_widths=(8, 16), pretrained=False,
                    head_channels=16, box_weight=1.0, smooth_l1_beta=1.0 / 9, pre_nms_top_n=200,
                    post_nms_top_n=30, nms_iou=0.1, min_box_size=1.0, conf_thresh=0.5,
                    recall_top_n=(1, 5, 10, 30), optimizer="adamw", epochs=1, batch_size=8,
                    lr=2e-3, momentum=0.9, weight_decay=1e-4, lr_step=3, lr_gamma=0.9, grad_clip=10.0),
        "detector": dict(embed_dim=16, roi_size=2, proposal_channels=16, proposal_hidden=16,
                         text_heads=2, text_layers=1, text_ff_dim=32, max_query_len=16,
                         align_hidden=16, align_weight=1.0, align_gt_boxes=True, score_thresh=0.5,
                         top_k=30, optimizer="adamw", epochs=1, batch_size=8, lr=2e-3, momentum=0.9,
                         weight_decay=1e-4, lr_step=3, lr_gamma=0.9, grad_clip=10.0),
        "retrieval": dict(real_data=(), image_size=48, n_train=48, n_val=16, n_test=24,
                          min_objects=2, max_objects=3, small_size=(6, 8), large_size=(12, 15),
                          k_fine=4, backbone_channels=8, backbone_epochs=1, feat_pool=2,
                          word_dim=16, embed_dim=32, batch_size=16, epochs=1, lr=1e-3,
                          margin=0.2, lambda_softmax_t2i=9.0, lambda_softmax_i2t=4.0,
                          lambda_lse=6.0, warmup_epochs=0, eval_shard=(16, 64),
                          loop_images=6, loop_captions=8,
                          qa_alpha=0.01, qa_heads=2, qa_epochs=1, qa_lr=1e-3, qa_layers=1, qa_ffn_norm=False, qa_loss="infonce", qa_text_tower="conv",
                          qa_ablation_live=20,
                          speed_gallery_sizes=(6, 12, 24, 48),
                          mm_epochs=1, mm_impostors=1, mm_loss="contrastive", mm_batch_size=8,
                          mm_margin=0.2, mm_temperature=0.1),
    },
}


def _fullpath() -> dict[str, dict[str, Any]]:
    """``full`` with the smallest counts: every architecture, setting and code path stays."""
    prof = copy.deepcopy(_PROFILES["full"])
    sizes = {
        "runtime": dict(weights_when_unavailable="random"),
        "shapes": dict(n_train=8, n_val=2, n_test=8),
        "anchors": dict(n_random_cases=50),
        "rpn": dict(epochs=1, batch_size=2),
        "detector": dict(epochs=1, batch_size=2),
        "retrieval": dict(n_train=48, n_val=16, n_test=24, backbone_epochs=1, batch_size=8, epochs=1,
                          warmup_epochs=0, eval_shard=(8, 32), loop_images=3, loop_captions=3,
                          qa_epochs=1, speed_gallery_sizes=(8, 16), mm_epochs=1, mm_batch_size=4),
        "svt": dict(n_train=1, n_test=1, eval_batch_size=8, ft_epochs=2, ft_batch_size=4,
                    ft_checkpoints=(1, 2)),
        "odits": dict(epochs=1, batch_size=2),
    }
    for section, knobs in sizes.items():
        prof[section].update(knobs)
    return prof


_PROFILES["fullpath"] = _fullpath()


class Section(dict):
    """A dict whose keys can also be read as attributes (``cfg.shapes.image_size``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"profile section has no knob {name!r}; known knobs: {sorted(self)}"
            ) from None


class Config(dict):
    """The active profile: ``cfg.name`` plus one :class:`Section` per part of the course."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"profile has no section {name!r}; known sections: {sorted(self)}"
            ) from None


def resolve_profile_name(name: str | None = None) -> str:
    """Return the profile to use: ``name``, else ``$COURSE_PROFILE``, else auto.

    Auto is ``full`` when CUDA is available, otherwise ``cpu``.
    """
    if name is None:
        name = os.environ.get("COURSE_PROFILE", "auto")
    name = name.strip().lower()
    if name in ("", "auto"):
        import torch

        return "full" if torch.cuda.is_available() else "cpu"
    if name not in PROFILE_NAMES:
        raise ValueError(
            f"COURSE_PROFILE={name!r} is not a profile; expected one of "
            f"{', '.join(PROFILE_NAMES)} or 'auto'"
        )
    return name


def get_config(name: str | None = None) -> Config:
    """Return the knobs of profile ``name`` (default: the active profile) as a :class:`Config`."""
    resolved = resolve_profile_name(name)
    sections = copy.deepcopy(_PROFILES[resolved])
    cfg = Config({k: Section(v) for k, v in sections.items()})
    cfg["name"] = resolved
    return cfg


def all_profiles() -> dict[str, Config]:
    """Every profile by name (used by the consistency test and the README table)."""
    return {n: get_config(n) for n in PROFILE_NAMES}
