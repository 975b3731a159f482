"""Captioned shapes scenes and the Karpathy-split loader (notebooks 04-05)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from course_utils.captions import (
    CAPTIONS_PER_IMAGE,
    CaptionVocabulary,
    build_captioned,
    load_karpathy,
    relation,
    render,
    tokenize,
)
from course_utils.profiles import all_profiles, get_config

CFG = dict(get_config("smoke").retrieval)


def test_retrieval_section_has_same_keys_in_every_profile():
    keys = {n: sorted(c.retrieval) for n, c in all_profiles().items()}
    assert keys["smoke"] == keys["cpu"] == keys["full"]
    assert all_profiles()["cpu"].retrieval.n_test == 1000
    assert all_profiles()["full"].retrieval.n_test == 1000


def test_splits_are_deterministic_and_disjoint():
    a, b = build_captioned(CFG, seed=3), build_captioned(CFG, seed=3)
    assert [s.captions for s in a["test"].scenes] == [s.captions for s in b["test"].scenes]
    assert build_captioned(CFG, seed=4)["test"].texts != a["test"].texts
    ids = [s.image_id for sp in a.values() for s in sp.scenes]
    assert len(ids) == len(set(ids))
    assert {k: len(v) for k, v in a.items()} == {"train": CFG["n_train"], "val": CFG["n_val"], "test": CFG["n_test"]}


def test_captions_name_real_objects_with_correct_relations():
    sp = build_captioned(CFG, seed=0)["train"]
    assert len(sp.captions) == CAPTIONS_PER_IMAGE * len(sp)
    assert torch.equal(sp.cap_to_img, torch.arange(len(sp)).repeat_interleave(CAPTIONS_PER_IMAGE))
    for scene in sp.scenes:
        assert CFG["min_objects"] <= len(scene.objects) <= CFG["max_objects"]
        for cap in scene.captions:
            assert 1 <= len(cap.phrases) <= 3 and len(cap.phrases) == len(cap.objects)
            for ph, oi in zip(cap.phrases, cap.objects):
                o = scene.objects[oi]
                assert ph == f"a {o.size} {o.color} {o.shape}" and ph in cap.text
            for rel in ("left of", "right of", "above", "below"):
                if f" {rel} " in cap.text:  # the relation links the first two phrases
                    assert relation(scene.objects[cap.objects[0]], scene.objects[cap.objects[1]]) == rel


def test_objects_do_not_overlap_and_sizes_match_words():
    sp = build_captioned(CFG, seed=0)["val"]
    for scene in sp.scenes:
        for o in scene.objects:
            side = o.box[2] - o.box[0]
            lo, hi = CFG["small_size"] if o.size == "small" else CFG["large_size"]
            assert lo <= side <= hi
        bs = [o.box for o in scene.objects]
        for i in range(len(bs)):
            for j in range(i + 1, len(bs)):
                a, b = bs[i], bs[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_render_draws_each_object_inside_its_box():
    sp = build_captioned(CFG, seed=0)["test"]
    img = render(sp.scenes[0])
    assert img.shape == (CFG["image_size"], CFG["image_size"], 3) and img.dtype == np.uint8
    mask = np.zeros(img.shape[:2], bool)
    for o in sp.scenes[0].objects:
        x1, y1, x2, y2 = map(int, o.box)
        assert img[y1:y2, x1:x2].max() > 100  # something bright is drawn there
        mask[y1:y2, x1:x2] = True
    assert img[~mask].max() == 0  # and nothing outside the boxes
    assert sp.images().shape == (len(sp), 3, CFG["image_size"], CFG["image_size"])


def test_vocabulary_encodes_pads_and_rejects_bad_captions():
    v = CaptionVocabulary()
    tok, ln = v.batch(["a large red circle", "there is a small blue square , a large green triangle"])
    assert tok.shape == (2, int(ln.max())) and ln.tolist() == [4, 11]
    assert (tok[0, 4:] == 0).all()
    assert v.decode(tok[0].tolist()) == "a large red circle"
    assert tokenize("A, b") == ["a", ",", "b"]
    assert v.encode("a red zebra")[2] == 1  # unknown word -> <unk>, the rest still known
    with pytest.raises(ValueError, match="empty caption"):
        v.encode("   ")
    with pytest.raises(ValueError, match="no word in the vocabulary"):
        v.encode("zebra giraffe")
    with pytest.raises(ValueError, match="caption 1"):
        v.batch(["a red circle", ""])


def _karpathy(tmp_path, n=3, k=4, d=6):
    images = [{"split": s, "filename": f"im{i}.jpg", "imgid": i,
               "sentences": [{"raw": f"caption {j} of image {i}", "tokens": []} for j in range(5)]}
              for i, s in enumerate(["test"] * n + ["train"])]
    jp = tmp_path / "dataset_fake.json"
    jp.write_text(json.dumps({"images": images}))
    return jp


def test_karpathy_loader_stacked_and_per_image(tmp_path):
    jp = _karpathy(tmp_path)
    np.save(tmp_path / "test_ims.npy", np.ones((3, 4, 6), np.float32))
    sp = load_karpathy(jp, tmp_path / "test_ims.npy", "test")
    assert sp.features.shape == (3, 4, 6) and len(sp.captions) == 15
    assert sp.cap_to_img.tolist()[:6] == [0, 0, 0, 0, 0, 1]
    feat_dir = tmp_path / "feats"
    feat_dir.mkdir()
    for i in range(3):
        np.save(feat_dir / f"im{i}.npy", np.full((4, 6), i, np.float32))
    sp = load_karpathy(jp, feat_dir, "test")
    assert sp.features[2].eq(2).all() and sp.filenames[0] == "im0.jpg"


def test_karpathy_loader_names_what_is_wrong(tmp_path):
    jp = _karpathy(tmp_path)
    np.save(tmp_path / "bad.npy", np.ones((2, 4, 6), np.float32))
    with pytest.raises(ValueError, match="2 images but the JSON's 'test' split has 3"):
        load_karpathy(jp, tmp_path / "bad.npy", "test")
    np.save(tmp_path / "flat.npy", np.ones((3, 6), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(N, k, d\)"):
        load_karpathy(jp, tmp_path / "flat.npy", "test")
    feat_dir = tmp_path / "f"
    feat_dir.mkdir()
    np.save(feat_dir / "im0.npy", np.ones((4, 6), np.float32))
    np.save(feat_dir / "im1.npy", np.ones((0, 6), np.float32))
    with pytest.raises(ValueError, match="im1.npy: image has zero regions"):
        load_karpathy(jp, feat_dir, "test")
    np.save(feat_dir / "im1.npy", np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="feature dimension 5 differs from 6"):
        load_karpathy(jp, feat_dir, "test")
    np.save(feat_dir / "im1.npy", np.ones((4, 6), np.float32))
    with pytest.raises(FileNotFoundError, match="im2.npy: missing region features"):
        load_karpathy(jp, feat_dir, "test")
    with pytest.raises(ValueError, match="no image has split 'val'"):
        load_karpathy(jp, feat_dir, "val")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_karpathy(tmp_path / "broken.json", feat_dir, "test")
