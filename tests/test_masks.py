"""Tests of the mask sources (course_utils.clip.masks): boxes, a tiny random SAM, validation."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from course_utils.clip.masks import (
    TABLE_3_2,
    BoxMaskSource,
    MaskError,
    MaskSource,
    ObjectMasks,
    SamMaskSource,
    check_masks,
    load_mask_source,
    masks_to_boxes,
    tiny_sam,
)
from course_utils.svt import SVTWord


def _image(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _record(*boxes: tuple[int, int, int, int, str]) -> SimpleNamespace:
    return SimpleNamespace(words=[SVTWord(x, y, w, h, tag, tag) for x, y, w, h, tag in boxes])


# --------------------------------------------------------------------------------------------
# Table 3.2
# --------------------------------------------------------------------------------------------


def test_table_3_2_is_the_thesis_table_and_segment_anythings_defaults() -> None:
    from segment_anything import SamAutomaticMaskGenerator

    defaults = {k: p.default for k, p in inspect.signature(SamAutomaticMaskGenerator).parameters.items()
                if k != "model"}
    assert TABLE_3_2 == defaults
    assert TABLE_3_2["points_per_side"] == 32 and TABLE_3_2["pred_iou_thresh"] == 0.88
    assert TABLE_3_2["stability_score_thresh"] == 0.95 and round(TABLE_3_2["crop_overlap_ratio"], 3) == 0.341


# --------------------------------------------------------------------------------------------
# box masks
# --------------------------------------------------------------------------------------------


def test_box_masks_from_svt_word_rectangles() -> None:
    img = _image()
    objs = BoxMaskSource()(img, _record((5, 6, 20, 10, "JOINT"), (30, 20, 10, 5, "BAR")))
    assert isinstance(objs, ObjectMasks) and len(objs) == 2
    assert objs.masks.shape == (2, 48, 64) and objs.masks.dtype == torch.bool
    assert objs.masks.sum(dim=(1, 2)).tolist() == [200, 50]
    assert objs.labels == ["JOINT", "BAR"]
    assert torch.equal(objs.confidence, torch.ones(2))
    assert objs.boxes.tolist() == [[5, 6, 25, 16], [30, 20, 40, 25]]
    assert isinstance(BoxMaskSource(), MaskSource)


def test_box_masks_clip_drop_empty_and_sort_by_score() -> None:
    src = BoxMaskSource(max_objects=2)
    objs = src(_image(), boxes=[[0, 0, 10, 10], [60, 40, 80, 60], [70, 0, 90, 10], [5, 5, 5, 9]],
               scores=[0.2, 0.9, 0.5, 1.0], labels=["a", "b", "c", "d"])
    # box c lies outside the 64 px wide image, d has zero width: both dropped; b clipped to 4x8
    assert objs.labels == ["b", "a"]
    assert objs.masks.sum(dim=(1, 2)).tolist() == [32, 100]
    assert torch.allclose(objs.confidence, torch.tensor([0.9, 0.2]))


def test_box_masks_without_boxes_is_an_image_with_no_objects() -> None:
    objs = BoxMaskSource()(_image(), _record())
    assert len(objs) == 0 and objs.masks.shape == (0, 48, 64) and objs.confidence.shape == (0,)


def test_box_masks_errors() -> None:
    with pytest.raises(ValueError, match="record or boxes"):
        BoxMaskSource()(_image())
    with pytest.raises(MaskError, match="scores"):
        BoxMaskSource()(_image(), boxes=[[0, 0, 4, 4]], scores=[0.5, 0.5])


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_check_masks_names_the_wrong_size() -> None:
    img = _image()
    with pytest.raises(MaskError, match=r"masks are \(32, 32\) \(H, W\) but the image is \(48, 64\)"):
        check_masks(torch.zeros(2, 32, 32, dtype=torch.bool), torch.ones(2), img, where="image #3")
    with pytest.raises(MaskError, match="image #3"):
        check_masks(torch.zeros(2, 32, 32, dtype=torch.bool), torch.ones(2), img, where="image #3")
    with pytest.raises(MaskError, match=r"expected masks of shape \(K, 48, 64\)"):
        check_masks(torch.zeros(48, 64, dtype=torch.bool), torch.ones(1), img)
    with pytest.raises(MaskError, match="binary"):
        check_masks(torch.full((1, 48, 64), 0.5), torch.ones(1), img)
    with pytest.raises(MaskError, match=r"confidence has shape \(3,\), expected \(2,\)"):
        check_masks(torch.zeros(2, 48, 64, dtype=torch.bool), torch.ones(3), img)
    with pytest.raises(MaskError, match=r"\[0, 1\]"):
        check_masks(torch.zeros(1, 48, 64, dtype=torch.bool), torch.tensor([1.5]), img)


def test_check_masks_accepts_0_1_integers_and_every_image_kind() -> None:
    m = torch.zeros(1, 48, 64, dtype=torch.uint8)
    m[0, 2:4, 3:9] = 1
    for image in (_image(), np.zeros((48, 64, 3)), torch.zeros(3, 48, 64), (48, 64)):
        out = check_masks(m, [0.7], image)
        assert out.masks.dtype == torch.bool and out.image_size == (48, 64)
    assert masks_to_boxes(out.masks).tolist() == [[3, 2, 9, 4]]
    assert masks_to_boxes(torch.zeros(1, 4, 4, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]]


# --------------------------------------------------------------------------------------------
# Segment Anything (tiny, random)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    return tiny_sam(64, dim=32, seed=0)


def test_tiny_sam_is_a_real_sam(sam: torch.nn.Module) -> None:
    from segment_anything.modeling import Sam

    assert isinstance(sam, Sam) and sam.image_encoder.img_size == 64
    assert sum(p.numel() for p in sam.parameters()) < 500_000
    again = tiny_sam(64, dim=32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(sam.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_sam(60)


def test_sam_source_uses_table_3_2_and_returns_object_masks(sam: torch.nn.Module) -> None:
    src = SamMaskSource(sam)
    assert src.settings == TABLE_3_2
    assert src.generator.point_grids[0].shape == (32 * 32, 2)
    assert src.generator.pred_iou_thresh == 0.88 and src.generator.stability_score_thresh == 0.95
    with pytest.raises(TypeError, match="unknown generator settings"):
        SamMaskSource(sam, points_per_sid=4)


def test_sam_source_on_a_small_image(sam: torch.nn.Module) -> None:
    img = _image(64, 48)
    # a random SAM's masks fail Table 3.2's quality filters: relax them to get some objects
    loose = SamMaskSource(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    objs = loose(img)
    assert objs.masks.shape[1:] == (48, 64) and objs.masks.dtype == torch.bool
    assert objs.confidence.shape == (len(objs),)
    assert bool(((objs.confidence >= 0) & (objs.confidence <= 1)).all())
    assert torch.equal(objs.confidence, objs.confidence.sort(descending=True).values)
    capped = SamMaskSource(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_objects=1)(img)
    assert len(capped) <= 1
    strict = SamMaskSource(sam, points_per_side=4)(img)  # may find nothing: still a valid result
    assert strict.masks.shape == (len(strict), 48, 64)


def test_load_mask_source_falls_back_to_boxes_offline(capsys: pytest.CaptureFixture[str]) -> None:
    src, line = load_mask_source("sam")  # tests run with COURSE_OFFLINE=1: no download
    assert isinstance(src, BoxMaskSource) and "box masks" in line
    assert "[offline]" in capsys.readouterr().out
    src, line = load_mask_source("boxes", max_objects=3)
    assert isinstance(src, BoxMaskSource) and src.max_objects == 3 and "oracle" in line
    with pytest.raises(ValueError, match="'sam', 'small_sam' or 'boxes'"):
        load_mask_source("grounding-dino")
