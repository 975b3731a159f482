"""Object masks for ODITS (notebook 08, seed 004 §3.1 and Table 3.2): one interface, four sources.

ODITS needs, for every image ``X`` of size ``H x W``, a set of ``K`` binary object masks
``M ∈ {0, 1}^{K x H x W}`` and one confidence ``c_j`` per object (Table 3.1's ``conf``).  Every
mask source here returns exactly that as an :class:`ObjectMasks`:

* :class:`SamMaskSource` — Segment Anything's ``SamAutomaticMaskGenerator`` with the settings of
  the thesis's Table 3.2 (:data:`TABLE_3_2`) on SAM ViT-B, whose weights come through the data
  registry with their sha256 (:func:`load_sam_vit_b`).  The confidence is SAM's own predicted
  IoU.  This is the ``full`` profile's source: on a CPU one 1024 px image takes minutes.
* the course's small SAM (:mod:`course_utils.clip.small_sam`): SAM's architecture with half a
  million parameters, trained by the course on SynthSVT's words (``tools/train_mask_generator.py``)
  and run through the same :class:`SamMaskSource`.  The ``cpu`` and ``smoke`` profiles' source.
* :class:`BoxMaskSource` — rectangles as masks: SVT's word boxes (``taggedRectangles``) or any
  detector's boxes and scores.  With SVT boxes it is an *oracle*: the
  objects are exactly the words to find, so what it measures is an upper bound of what a
  perfect text detector would give ODITS; notebooks must say so next to its numbers.
* :func:`tiny_sam` — a small randomly initialised ``Sam`` built from
  ``segment_anything.modeling``, for tests only: it runs the real generator code path in a
  second, but its masks mean nothing.

Masks of the wrong size, a confidence vector that does not match, or a mask that is not binary
raise :class:`MaskError` naming the tensor and the expected shape (:func:`check_masks`).  An
image with no object is valid (``K = 0``); ODITS then falls back to the image alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

from ..registry import WHEN_UNAVAILABLE, fetch_or_fallback
from .small_sam import build_sam, load_small_sam

__all__ = [
    "TABLE_3_2",
    "MaskError",
    "ObjectMasks",
    "MaskSource",
    "check_masks",
    "masks_to_boxes",
    "BoxMaskSource",
    "SamMaskSource",
    "tiny_sam",
    "load_sam_vit_b",
    "load_mask_source",
]

#: ``SamAutomaticMaskGenerator`` settings of the thesis's Table 3.2 (segment-anything's defaults;
#: ``crop_overlap_ratio`` is 512/1500 ≈ 0.341).  ``model`` is passed separately.
TABLE_3_2: dict[str, Any] = {
    "points_per_side": 32,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
    "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500,
    "crop_n_points_downscale_factor": 1,
    "point_grids": None,
    "min_mask_region_area": 0,
    "output_mode": "binary_mask",
}


class MaskError(ValueError):
    """Masks or confidences that do not fit their image (the message names the tensor)."""


@dataclass
class ObjectMasks:
    """The objects of one image.

    Attributes:
        masks: ``(K, H, W)`` bool, one binary mask per object (``K`` may be 0).
        confidence: ``(K,)`` float32 in ``[0, 1]``, the thesis's ``c_j``.
        source: which mask source produced them (printed next to results).
        labels: optional name of each object (the SVT tag for box masks), for figures.
    """

    masks: torch.Tensor
    confidence: torch.Tensor
    source: str = ""
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the image the masks belong to."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def boxes(self) -> torch.Tensor:
        """``(K, 4)`` float ``(x1, y1, x2, y2)`` tight boxes of the masks (see :func:`masks_to_boxes`)."""
        return masks_to_boxes(self.masks)


@runtime_checkable
class MaskSource(Protocol):
    """Anything that turns an image into :class:`ObjectMasks`.

    ``record`` is the image's SVT record when there is one (box sources read its word boxes;
    SAM ignores it).
    """

    name: str

    def __call__(self, image: Image.Image, record: Any | None = None) -> ObjectMasks: ...


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _hw(image: Image.Image | np.ndarray | torch.Tensor | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of a PIL image, an ``(H, W, C)`` array, a ``(C, H, W)`` tensor or a size tuple."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return int(image[0]), int(image[1])


def check_masks(masks: torch.Tensor, confidence: torch.Tensor,
                image: Image.Image | np.ndarray | torch.Tensor | tuple[int, int],
                where: str = "masks") -> ObjectMasks:
    """Validate masks against their image and return them as an :class:`ObjectMasks`.

    Args:
        masks: ``(K, H, W)`` bool (or 0/1 integers or floats, converted) masks.
        confidence: ``(K,)`` confidences in ``[0, 1]``.
        image: the image (PIL, ``(H, W, C)`` array or ``(C, H, W)`` tensor) or its ``(H, W)``.
        where: a name for error messages (e.g. ``"image #3 (img/14_03.jpg)"``).

    Raises:
        MaskError: wrong number of dimensions, masks of another size than the image, values other
            than 0/1, or a confidence vector of the wrong length or range.
    """
    H, W = _hw(image)
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    # object masks are image-sized pictures for PIL and figures: they live on the CPU, whatever
    # device the source (a detector, SAM) computed them on
    masks = masks.cpu()
    if masks.ndim != 3:
        raise MaskError(f"{where}: expected masks of shape (K, {H}, {W}), got {tuple(masks.shape)} "
                        f"({masks.ndim} dimensions)")
    if tuple(masks.shape[1:]) != (H, W):
        raise MaskError(f"{where}: masks are {tuple(masks.shape[1:])} (H, W) but the image is ({H}, {W}); "
                        f"expected shape ({masks.shape[0]}, {H}, {W}). Resize the masks with the image.")
    if masks.dtype != torch.bool:
        if masks.numel() and not bool(((masks == 0) | (masks == 1)).all()):
            raise MaskError(f"{where}: masks must be binary (0/1 or bool), got values in "
                            f"[{float(masks.min()):.3g}, {float(masks.max()):.3g}] of dtype {masks.dtype}")
        masks = masks.bool()
    confidence = torch.as_tensor(confidence, dtype=torch.float32).cpu().flatten()
    if confidence.shape != (masks.shape[0],):
        raise MaskError(f"{where}: confidence has shape {tuple(confidence.shape)}, expected "
                        f"({masks.shape[0]},) — one per mask")
    if confidence.numel() and (not bool(torch.isfinite(confidence).all())
                               or float(confidence.min()) < 0 or float(confidence.max()) > 1):
        raise MaskError(f"{where}: confidences must lie in [0, 1], got "
                        f"[{float(confidence.min()):.3g}, {float(confidence.max()):.3g}]")
    return ObjectMasks(masks, confidence)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``(x1, y1, x2, y2)`` boxes of ``(K, H, W)`` masks, shape ``(K, 4)`` float.

    ``x2``/``y2`` are exclusive (one past the last pixel), the convention of PIL's ``crop``.  An
    empty mask gets the all-zero box.  (``torchvision.ops.masks_to_boxes`` uses inclusive
    corners and fails on empty masks, hence this small variant.)  The boxes are for drawing and
    cropping, so they come back on the CPU whatever the masks' device.
    """
    masks = masks.cpu()
    K = masks.shape[0]
    out = torch.zeros(K, 4)
    for k in range(K):
        ys, xs = torch.nonzero(masks[k], as_tuple=True)
        if ys.numel():
            out[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# box-derived masks
# --------------------------------------------------------------------------------------------


def _box_masks(boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``(K, 4)`` xyxy boxes → ``(K, H, W)`` bool rectangles, clipped to the image."""
    ys = torch.arange(H, dtype=torch.float32)[None, :, None] + 0.5  # pixel centres
    xs = torch.arange(W, dtype=torch.float32)[None, None, :] + 0.5
    b = boxes.float()[:, :, None, None]
    return (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])


class BoxMaskSource:
    """Rectangles as object masks: SVT word boxes, or the boxes of any detector.

    Called with an SVT record it uses the record's word rectangles (confidence 1, label = tag);
    called with ``boxes=`` it uses those.  Boxes are clipped to the image; boxes that end up
    empty (zero area after clipping) are dropped, because an empty object has no pixels to
    encode.

    Args:
        min_area: drop boxes smaller than this many pixels after clipping.
        max_objects: keep at most this many objects, the most confident first.
    """

    def __init__(self, min_area: int = 1, max_objects: int | None = None) -> None:
        self.min_area = min_area
        self.max_objects = max_objects
        self.name = "box masks (word rectangles)"

    def __call__(self, image: Image.Image, record: Any | None = None, *,
                 boxes: torch.Tensor | Sequence[Sequence[float]] | None = None,
                 scores: torch.Tensor | Sequence[float] | None = None,
                 labels: Sequence[str] | None = None) -> ObjectMasks:
        """Masks of ``image``'s boxes.

        Args:
            image: the RGB image (only its size is used).
            record: an :class:`course_utils.svt.SVTImage`; its ``words`` give the boxes.
            boxes: ``(K, 4)`` xyxy pixel boxes instead of a record.
            scores: ``(K,)`` detector confidences in ``[0, 1]`` (default 1).
            labels: optional name per box.

        Returns:
            :class:`ObjectMasks` with ``(K', H, W)`` masks, ``K' <= K`` after dropping empty boxes.
        """
        H, W = _hw(image)
        if boxes is None:
            if record is None:
                raise ValueError("BoxMaskSource: pass an SVT record or boxes=(K, 4)")
            words = list(getattr(record, "words", []))
            boxes = torch.tensor([w.xyxy for w in words], dtype=torch.float32).reshape(-1, 4)
            labels = [w.tag for w in words]
        # a detector's boxes and scores may come from the GPU; masks are built on the CPU
        boxes = torch.as_tensor(boxes, dtype=torch.float32).cpu().reshape(-1, 4)
        scores = (torch.ones(len(boxes)) if scores is None
                  else torch.as_tensor(scores, dtype=torch.float32).cpu().flatten())
        if scores.shape != (len(boxes),):
            raise MaskError(f"BoxMaskSource: {len(boxes)} boxes but scores of shape {tuple(scores.shape)}")
        labels = list(labels) if labels is not None else [""] * len(boxes)
        clipped = boxes.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, W)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, H)
        area = (clipped[:, 2] - clipped[:, 0]).clamp_min(0) * (clipped[:, 3] - clipped[:, 1]).clamp_min(0)
        keep = torch.nonzero(area >= max(self.min_area, 1e-9)).flatten()
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
        if self.max_objects is not None:
            keep = keep[: self.max_objects]
        masks = _box_masks(clipped[keep], H, W)
        out = check_masks(masks, scores[keep], (H, W), where="BoxMaskSource")
        out.source, out.labels = self.name, [labels[i] for i in keep.tolist()]
        return out


# --------------------------------------------------------------------------------------------
# Segment Anything
# --------------------------------------------------------------------------------------------


class SamMaskSource:
    """``SamAutomaticMaskGenerator`` as a mask source (Table 3.2's settings by default).

    Args:
        sam: a ``segment_anything.modeling.Sam`` (ViT-B from :func:`load_sam_vit_b`, or
            :func:`tiny_sam` in tests).
        max_objects: keep at most this many masks, highest predicted IoU first.
        description: shown in outputs, says which weights run.
        **overrides: any ``SamAutomaticMaskGenerator`` argument replacing Table 3.2's value.

    The confidence of a mask is SAM's ``predicted_iou`` clipped to ``[0, 1]`` (the model's own
    estimate of the mask's quality, the closest thing SAM has to a detection probability).
    """

    def __init__(self, sam: torch.nn.Module, max_objects: int | None = None,
                 description: str = "SAM", **overrides: Any) -> None:
        unknown = set(overrides) - set(TABLE_3_2)
        if unknown:
            raise TypeError(f"SamMaskSource: unknown generator settings {sorted(unknown)}; "
                            f"known: {sorted(TABLE_3_2)}")
        self.settings = {**TABLE_3_2, **overrides}
        self.generator = SamAutomaticMaskGenerator(sam, **self.settings)
        self.max_objects = max_objects
        self.name = f"{description} automatic masks"
        # The last few images' masks: a notebook shows one image's objects, then extracts every
        # image's, and SAM takes minutes per image on a CPU.  Keyed by the pixels themselves.
        self._recent: dict[str, ObjectMasks] = {}

    @torch.no_grad()
    def __call__(self, image: Image.Image, record: Any | None = None) -> ObjectMasks:
        """Masks of ``image`` (``record`` is ignored: SAM needs no annotation)."""
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        key = hashlib.sha1(array.tobytes()).hexdigest() + str(array.shape)
        if key not in self._recent:
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = self._generate(array)
        return self._recent[key]

    def _generate(self, array: np.ndarray) -> ObjectMasks:
        H, W = array.shape[:2]
        found = self.generator.generate(array)
        found.sort(key=lambda m: -float(m["predicted_iou"]))
        if self.max_objects is not None:
            found = found[: self.max_objects]
        if found:
            masks = torch.from_numpy(np.stack([m["segmentation"] for m in found]))
            conf = torch.tensor([float(m["predicted_iou"]) for m in found]).clamp(0, 1)
        else:
            masks, conf = torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0)
        out = check_masks(masks, conf, (H, W), where=self.name)
        out.source = self.name
        return out


def tiny_sam(image_size: int = 64, dim: int = 32, seed: int = 0) -> torch.nn.Module:
    """A small, randomly initialised ``Sam`` for tests (its masks mean nothing).

    :func:`course_utils.clip.small_sam.build_sam` at test sizes: ``image_size`` px input (long
    side; a multiple of 16), 16 px patches, one global-attention block of width ``dim``.

    Args:
        image_size: the encoder's input size (128 or less keeps a forward pass well under a second).
        dim: width of every part (a multiple of 8: the decoder upsamples to ``dim // 8`` channels).
        seed: seeds the random initialisation.
    """
    if image_size % 16 or dim % 8:
        raise ValueError(f"tiny_sam: image_size ({image_size}) must be a multiple of 16 and dim ({dim}) of 8")
    return build_sam({"image_size": image_size, "patch_size": 16, "encoder_dim": dim, "encoder_depth": 1,
                      "encoder_heads": 2, "mlp_ratio": 2.0, "prompt_dim": dim, "mask_in_chans": 8,
                      "decoder_depth": 1, "decoder_heads": 2, "decoder_mlp_dim": 2 * dim,
                      "iou_head_hidden_dim": dim}, seed=seed)


def load_sam_vit_b(checkpoint: str | Path | None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """SAM ViT-B with the weights in ``checkpoint`` (a state dict, read with ``weights_only=True``).

    ``checkpoint=None`` gives SAM ViT-B with random weights (seed 0, so reruns see the same
    masks): the full code path runs, but its masks mean nothing.
    """
    if checkpoint is None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return sam_model_registry["vit_b"](checkpoint=None).to(device).eval()
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"load_sam_vit_b: {checkpoint}: no such file (expected a SAM ViT-B state dict)")
    sam = sam_model_registry["vit_b"](checkpoint=None)
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    return sam.to(device).eval()


def load_mask_source(kind: str = "boxes", device: str | torch.device = "cpu",
                     max_objects: int | None = None,
                     fetch: Callable[..., tuple[Any, str]] | None = None,
                     when_unavailable: str = "fallback",
                     points_per_side: int = TABLE_3_2["points_per_side"],
                     small_sam_dir: str | Path | None = None) -> tuple[MaskSource, str]:
    """The mask source of a profile, and one line saying what really runs.

    Args:
        kind: ``"sam"`` (SAM ViT-B through the registry entry ``sam_vit_b``, sha256-checked),
            ``"small_sam"`` (the course's small SAM trained on SynthSVT, shipped in
            ``data/small_sam``: :mod:`course_utils.clip.small_sam`) or ``"boxes"`` (word
            rectangles).  Both SAMs run through ``SamAutomaticMaskGenerator`` with Table 3.2's
            settings.
        max_objects: cap on objects per image.
        points_per_side: the generator's point grid (Table 3.2: 32, i.e. 1024 prompts; a size:
            the ``cpu`` profile uses fewer, since on a CPU upsampling each prompt's masks to the
            image costs most of the time).
        small_sam_dir: where the small SAM's weights and manifest are (default ``data/small_sam``).
        fetch: replaces :func:`course_utils.registry.fetch_or_fallback` (tests).
        when_unavailable: what ``"sam"`` uses when the checkpoint cannot be had, after one
            printed line saying why: ``"fallback"`` (box masks, the documented fallback) or
            ``"random"`` (SAM ViT-B with random weights, so the full code path still runs).

    Returns:
        ``(source, description)``.
    """
    if when_unavailable not in WHEN_UNAVAILABLE:
        raise ValueError(f"load_mask_source: when_unavailable={when_unavailable!r}, expected one of {WHEN_UNAVAILABLE}")
    if kind == "boxes":
        src = BoxMaskSource(max_objects=max_objects)
        return src, "box masks from the SVT word rectangles (oracle boxes, confidence 1)"
    if not isinstance(points_per_side, int) or points_per_side < 1:
        raise ValueError(f"load_mask_source: points_per_side must be a positive int, got {points_per_side!r}")
    if kind == "small_sam":
        sam, manifest = load_small_sam(small_sam_dir, device=device)
        # Table 3.2's two quality thresholds are SAM ViT-B's calibration; the small SAM's own
        # were chosen on held-out training scenes by tools/train_mask_generator.py
        thresholds = dict(manifest["generator_thresholds"])
        desc = (f"the course's small SAM ({manifest['parameters']:,} parameters, trained on "
                f"{manifest['scenes_seen']:,} SynthSVT street scenes; sha256 {manifest['file_sha256'][:12]}…)")
        return (SamMaskSource(sam, max_objects=max_objects, description="small SAM",
                              points_per_side=points_per_side, **thresholds),
                f"{desc} through SamAutomaticMaskGenerator, {points_per_side}x{points_per_side} points, "
                f"Table 3.2's settings with its own thresholds {thresholds}")
    if kind != "sam":
        raise ValueError(f"load_mask_source: kind={kind!r}, expected 'sam', 'small_sam' or 'boxes'")
    if fetch is None:
        fetch = fetch_or_fallback
    random = when_unavailable == "random"
    box_src = BoxMaskSource(max_objects=max_objects)
    # the registry prints the one line saying why; its text after "using" is the entry's fallback
    got, how = fetch("sam_vit_b", fallback=lambda: None if random else box_src,
                     fallback_text="SAM ViT-B with RANDOM weights (its masks mean nothing)" if random else None)
    if isinstance(got, BoxMaskSource):
        return got, how
    sam = load_sam_vit_b(got, device)
    name = "SAM ViT-B" if got is not None else "SAM ViT-B with RANDOM weights"
    return SamMaskSource(sam, max_objects=max_objects, description=name, points_per_side=points_per_side), how
