"""Tests of the course's small SAM (course_utils.clip.small_sam) and of its training script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam
from torchvision.ops import box_iou

from course_utils import synthsvt as ss
from course_utils.checkpoints import CheckpointError
from course_utils.clip import small_sam
from course_utils.clip.masks import TABLE_3_2, SamMaskSource, load_mask_source, tiny_sam
from course_utils.profiles import get_config

TOOL = Path(__file__).resolve().parent.parent / "tools" / "train_mask_generator.py"


def _tool():
    spec = importlib.util.spec_from_file_location("train_mask_generator", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_sam_is_segment_anythings_sam_and_checks_its_config() -> None:
    sam = small_sam.build_sam(seed=0)
    assert isinstance(sam, Sam) and sam.image_encoder.img_size == small_sam.SMALL_SAM_CONFIG["image_size"]
    again = small_sam.build_sam(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(sam.state_dict().values(), again.state_dict().values()))
    before = torch.random.get_rng_state()
    small_sam.build_sam(seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # a forked RNG: the global stream stays
    with pytest.raises(ValueError, match=r"\['depth'\] are unknown or missing"):
        small_sam.build_sam({**small_sam.SMALL_SAM_CONFIG, "depth": 2})
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        small_sam.build_sam({**small_sam.SMALL_SAM_CONFIG, "image_size": 250})
    with pytest.raises(ValueError, match="multiple of 8"):
        small_sam.build_sam({**small_sam.SMALL_SAM_CONFIG, "prompt_dim": 60})
    assert isinstance(tiny_sam(64), Sam)  # the test SAM is build_sam at test sizes


def test_load_small_sam_names_what_is_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json.*train_mask_generator.py"):
        small_sam.load_small_sam(tmp_path)
    manifest = json.loads((small_sam.SMALL_SAM_DIR / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / small_sam.SMALL_SAM_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not the small SAM"):
        small_sam.load_small_sam(tmp_path, verbose=False)


# --------------------------------------------------------------------------------------------
# the shipped weights
# --------------------------------------------------------------------------------------------


def test_shipped_weights_match_their_manifest_and_load_through_the_generator() -> None:
    sam, manifest = small_sam.load_small_sam(verbose=False)
    assert manifest["file_sha256"] == manifest["sha256"]
    assert manifest["config"] == small_sam.SMALL_SAM_CONFIG
    src, line = load_mask_source("small_sam", max_objects=8, points_per_side=12)
    assert isinstance(src, SamMaskSource) and "small SAM" in line
    # Table 3.2's settings except the two thresholds the manifest calibrated for these weights
    expected = {**TABLE_3_2, "points_per_side": 12, **manifest["generator_thresholds"]}
    assert src.settings == expected
    assert set(manifest["generator_thresholds"]) == {"pred_iou_thresh", "stability_score_thresh"}
    with pytest.raises(ValueError, match="points_per_side must be a positive int"):
        load_mask_source("small_sam", points_per_side=0)


def test_shipped_generator_finds_the_words_of_synthsvt_test_scenes() -> None:
    # the cpu profile's source on the first test scenes (as SynthSVT draws them, before JPEG):
    # random weights find no word here; the trained ones must find most
    oc = get_config("cpu").odits
    src, _ = load_mask_source("small_sam", max_objects=oc["max_objects"], points_per_side=oc["points_per_side"])
    found = total = 0
    for k in range(6):
        scene, words, _, _ = ss.street_scene(0, "test", k)
        objs = src(scene)
        gt = torch.tensor([b for _, b in words], dtype=torch.float32)
        total += len(gt)
        if len(objs):
            found += int((box_iou(objs.boxes, gt).max(0).values >= 0.5).sum())
    assert total >= 6 and found / total >= 0.5


# --------------------------------------------------------------------------------------------
# tools/train_mask_generator.py
# --------------------------------------------------------------------------------------------


def test_prompted_scenes_target_the_word_under_each_point() -> None:
    mod = _tool()
    data = mod.PromptedScenes(seed=0, points=8, size=256)
    image, points, targets = data[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 192, 256)
    assert points.shape == (8, 2) and targets.shape == (8, 256, 256)
    scene, words, _, _ = ss.street_scene(0, "masks", 5)
    boxes = torch.tensor([b for _, b in words], dtype=torch.float64) * 256 / 480
    for (x, y), t in zip(points.tolist(), targets):
        inside = [(b[0] <= x < b[2]) and (b[1] <= y < b[3]) for b in boxes.tolist()]
        assert bool(t.any()) == any(inside)
        if any(inside):
            ys, xs = torch.nonzero(t, as_tuple=True)
            b = boxes[inside.index(True)]
            assert abs(xs.min().item() - b[0].item()) <= 1 and abs(ys.max().item() + 1 - b[3].item()) <= 1
    # the second half of the points fall anywhere: over a few scenes some land on the background
    assert any(not t.any() for k in range(4) for t in data[k][2][4:])
    again = mod.PromptedScenes(seed=0, points=8, size=256)[5]
    assert all(torch.equal(a, b) for a, b in zip((image, points, targets), again))


def test_sam_losses_follow_sams_recipe() -> None:
    mod = _tool()
    sam = tiny_sam(64, dim=16, seed=0).train()
    images = torch.randint(0, 255, (2, 3, 48, 64), dtype=torch.uint8)
    points = torch.tensor([[[10.0, 10.0], [40.0, 30.0]], [[5.0, 5.0], [60.0, 40.0]]])
    targets = torch.zeros(2, 2, 64, 64)
    targets[0, 0, 5:20, 5:30] = 1  # one word under the first point; the others are background
    out = mod.sam_losses(sam, images, points, targets)
    assert set(out) == {"loss", "focal", "dice", "iou_mse", "iou"}
    assert out["loss"].item() == pytest.approx(
        mod.FOCAL_WEIGHT * out["focal"].item() + out["dice"].item() + out["iou_mse"].item(), rel=1e-6)
    assert 0 <= out["iou"].item() <= 1
    out["loss"].backward()
    assert all(p.grad is not None for p in sam.mask_decoder.iou_prediction_head.parameters())


def test_training_script_rebuilds_the_same_bytes(tmp_path: Path) -> None:
    mod = _tool()
    shas = []
    for run in ("a", "b"):
        out = tmp_path / run
        m = mod.main(["--steps", "2", "--batch-size", "2", "--points", "4", "--eval-every", "0",
                      "--eval-images", "2", "--calibration-scenes", "2", "--workers", "0",
                      "--out", str(out), "--ckpt", str(tmp_path / f"{run}.pt"), "--no-resume"])
        shas.append(m["sha256"])
        assert m["sha256"] == small_sam.file_sha256(out / small_sam.SMALL_SAM_WEIGHTS)
        assert set(m["generator_thresholds"]) == {"pred_iou_thresh", "stability_score_thresh"}
        assert m["scenes_seen"] == 4 and "calibration" in m and "final_metrics" in m
    assert shas[0] == shas[1]
    src, _ = load_mask_source("small_sam", points_per_side=2, small_sam_dir=tmp_path / "a")
    assert isinstance(src, SamMaskSource)
    assert src.generator.pred_iou_thresh == json.loads((tmp_path / "a" / "manifest.json").read_text())[
        "generator_thresholds"]["pred_iou_thresh"]
    assert np.isfinite(m["final_metrics"]["word_recall_iou50"])
