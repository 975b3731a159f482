"""The shapes world of seed 000 §4.1: deterministic, well-formed, cached."""

from __future__ import annotations

import json

import numpy as np
import torch

from course_utils import shapes as S
from course_utils.profiles import get_config


def test_full_profile_is_the_papers_split():
    c = get_config("full").shapes
    assert (c.image_size, c.n_train, c.n_val, c.n_test) == (512, 4000, 500, 500)
    assert (c.min_shapes, c.max_shapes) == (10, 20)


def test_scenes_follow_the_paper(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    data = S.build_shapes(get_config("cpu").shapes | {"n_train": 60, "n_val": 5, "n_test": 5}, seed=3)
    for scene in data["train"].scenes:
        assert 10 <= len(scene.objects) <= 20
        boxes = torch.tensor([o.box for o in scene.objects])
        assert (boxes >= 0).all() and (boxes <= scene.size).all()
        assert ((boxes[:, 2] - boxes[:, 0]) > 0).all()
        # Non-overlapping objects.
        from torchvision.ops import box_iou
        iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert iou.max() == 0
        assert {o.shape for o in scene.objects} <= set(S.SHAPES)
        assert {o.color for o in scene.objects} <= set(S.COLORS)
        # Alignment labels are exactly the objects the query's terms describe.
        assert scene.aligned == [any(S.matches(o, t) for t in scene.terms) for o in scene.objects]
        assert set(scene.query.split()) <= set(S.QUERY_WORDS)


def test_pixels_lie_inside_their_boxes_with_their_colour():
    scene = S.generate_scenes(1, seed=0, size=128, min_shapes=10, max_shapes=12, min_size=10, max_size=20)[0]
    img = S.render_scene(scene)
    mask = np.zeros(img.shape[:2], bool)
    for o in scene.objects:
        x1, y1, x2, y2 = (int(v) for v in o.box)
        patch = img[y1:y2, x1:x2]
        channel = {"red": 0, "green": 1, "blue": 2}[o.color]
        assert patch[..., channel].max() >= 160
        assert patch[..., [c for c in range(3) if c != channel]].max() == 0
        mask[y1:y2, x1:x2] = True
    assert img[~mask].max() == 0  # black background


def test_same_seed_same_bytes_different_seed_different(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    cfg = get_config("smoke").shapes
    a = S.build_shapes(cfg, seed=0, cache=False)
    b = S.build_shapes(cfg, seed=0, cache=False)
    c = S.build_shapes(cfg, seed=1, cache=False)
    assert [S.scene_to_dict(s) for s in a["test"].scenes] == [S.scene_to_dict(s) for s in b["test"].scenes]
    assert torch.equal(a["test"][0]["image"], b["test"][0]["image"])
    assert a["test"].scenes[0].query != c["test"].scenes[0].query or \
        a["test"].scenes[0].objects != c["test"].scenes[0].objects


def test_splits_do_not_share_scenes():
    data = S.build_shapes(get_config("smoke").shapes, seed=0, cache=False)
    ids = [s.image_id for ds in data.values() for s in ds.scenes]
    assert len(ids) == len(set(ids))


def test_cache_is_used_and_a_truncated_file_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    cfg = get_config("smoke").shapes
    first = S.build_shapes(cfg, seed=5)
    (root,) = (tmp_path / "runs").glob("shapes_*")  # one run folder, named by the sizes and seed
    assert (root / "train.json").exists()
    first["train"][0]
    # Images are rendered when read, never written: only the annotation files are on disk.
    assert sorted(p.name for p in root.iterdir()) == ["test.json", "train.json", "val.json"]
    # A truncated annotation file: the next build must recover, not crash.
    text = (root / "train.json").read_text()
    (root / "train.json").write_text(text[: len(text) // 2])
    again = S.build_shapes(cfg, seed=5)
    assert json.loads((root / "train.json").read_text())  # rewritten whole
    assert torch.equal(again["train"][0]["image"], first["train"][0]["image"])


def test_item_layout_and_collate():
    ds = S.build_shapes(get_config("smoke").shapes, seed=0, cache=False)["train"]
    item = ds[0]
    n = len(ds.scenes[0].objects)
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["boxes"].shape == (n, 4) and item["aligned"].shape == (n,)
    batch = S.collate_scenes([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["boxes"]) == 2


def test_queries_read_naturally():
    assert S.term_text("red", "circle") == "red circles"
    assert S.term_text(None, "triangle") == "triangles"
    assert S.term_text("blue", None) == "blue shapes"
    rng = np.random.default_rng(0)
    objs = [S.ShapeObject("circle", "red", (0, 0, 5, 5))]
    for _ in range(50):
        query, terms = S.make_query(objs, rng)
        assert 1 <= len(terms) <= 2
        assert not any(S._overlaps(a, b) for i, a in enumerate(terms) for b in terms[i + 1:])
