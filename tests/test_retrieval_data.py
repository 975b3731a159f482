"""Real retrieval data: a Karpathy-layout fixture through the loading path of notebooks 04-05 and
the command line (``load_retrieval_inputs``), its validation errors, and the fallback to the scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from course_utils.captions import build_captioned
from course_utils.profiles import get_config
from course_utils.recipes import retrieval
from course_utils.recipes.retrieval_data import (
    PAPER_SCAN,
    load_retrieval_inputs,
    retrieval_data_root,
    retrieval_examples,
)
from course_utils.scan import recall_at_k

WORDS = ("a", "man", "woman", "dog", "runs", "sits", "on", "the", "beach", "grass", "red", "shirt", "ball")
K, D = 36, 2048


def _fixture(root, *, n=(4, 3, 3), k=K, d=D, form="npy", json_name="dataset_flickr30k.json"):
    """A Karpathy-split folder: ``n`` = (train, val, test) images (plus one ``restval`` image that
    counts as train), splits interleaved in the JSON, five captions each, random float32 features
    whose ``[0, 0]`` entry is the image's ``imgid`` (to check the row order).  Returns the JSON."""
    rng = np.random.default_rng(0)
    order = ["train"] * n[0] + ["val"] * n[1] + ["test"] * n[2] + ["restval"]
    order = [order[i] for i in rng.permutation(len(order))]
    images = []
    for imgid, split in enumerate(order):
        sents = [{"tokens": [str(w) for w in rng.choice(WORDS, 6)], "raw": "A Caption."} for _ in range(5)]
        images.append({"imgid": imgid, "split": split, "filename": f"{imgid:04d}.jpg", "sentences": sents})
    root.mkdir(parents=True, exist_ok=True)
    (root / json_name).write_text(json.dumps({"images": images}))
    for split, stem in (("train", "train"), ("val", "dev"), ("test", "test")):
        ids = [im["imgid"] for im in images if (im["split"] == "restval" and split == "train") or im["split"] == split]
        feats = rng.standard_normal((len(ids), k, d)).astype(np.float32)
        feats[:, 0, 0] = ids
        if form == "npy":
            np.save(root / f"{stem}_ims.npy", feats)
        else:
            (root / stem).mkdir()
            for i, f in zip(ids, feats):
                np.save(root / stem / f"{i:04d}.npy", f)
    return images


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_profiles_name_the_datasets():
    full, fullpath = get_config("full").retrieval, get_config("fullpath").retrieval
    assert full.real_data == fullpath.real_data == ("f30k", "coco")
    assert get_config("smoke").retrieval.real_data == get_config("cpu").retrieval.real_data == ()


def test_fixture_runs_through_the_full_loading_path_and_trains(cache, capsys):
    images = _fixture(cache / "retrieval_data" / "f30k")
    cfg = get_config("full").retrieval
    data, source = load_retrieval_inputs(cfg, seed=0, progress=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("retrieval data: Flickr30K from ") and "train 5 / val 3 / test 3" in out[0]
    assert source.name == "f30k" and not source.synthetic and source.label == "Flickr30K"
    assert source.paper == PAPER_SCAN["f30k"] and source.paper[1][3] == 48.6

    for split, n in (("train", 5), ("val", 3), ("test", 3)):
        f = data.feats[split]
        assert f["fine"].shape == (n, K, D) and f["fine"].dtype == torch.float32
        assert torch.allclose(f["coarse"], f["fine"].mean(1, keepdim=True)) and f["coarse"].shape == (n, 1, D)
        assert f["boxes"].shape == (n, K, 4)
        assert f["boxes"][..., 2:].eq(cfg.image_size).all() and f["boxes"][..., :2].eq(0).all()
        # rows follow the JSON's order of the split; restval counts as train
        want = [im for im in images if {"restval": "train"}.get(im["split"], im["split"]) == split]
        assert f["fine"][:, 0, 0].tolist() == [im["imgid"] for im in want]
        assert source.filenames[split] == [im["filename"] for im in want]
        # texts: the JSON's tokens, the whole caption at both levels
        assert source.captions[split][:5] == [" ".join(s["tokens"]) for s in want[0]["sentences"]]
        assert data.texts[split]["fine"] is data.texts[split]["coarse"]
        tok, ln = data.texts[split]["fine"]
        assert tok.shape[0] == len(data.cap_to_img[split]) == 5 * n and ln.eq(6).all()
        assert data.vocab.decode(tok[0].tolist()) == source.captions[split][0]
        assert data.cap_to_img[split].tolist() == [i for i in range(n) for _ in range(5)]
    assert set(data.vocab.itos[2:]) <= set(WORDS)

    # checkpoints of real runs never share a folder with the scenes'
    assert retrieval.scan_grid_knobs(cfg, 0, source.knobs) != retrieval.scan_grid_knobs(cfg, 0)
    assert retrieval.query_agnostic_knobs(cfg, 0, source.knobs) != retrieval.query_agnostic_knobs(cfg, 0)

    small = dict(cfg, word_dim=8, embed_dim=16, epochs=1, batch_size=8, warmup_epochs=0, eval_shard=(4, 16),
                 qa_epochs=1, qa_heads=2)
    for level, row in (("fine", "t-i AVG"), ("coarse", "i-t LSE")):
        res = retrieval.run_variant(data, level, row, small, seed=0, progress=False)
        assert res["sims"].shape == (3, 15) and torch.isfinite(res["sims"]).all()
        assert res["model"].img_enc.fc.in_features == D
        want = recall_at_k(res["sims"], data.cap_to_img["test"])
        assert {k: res[k] for k in want} == want
        assert all(0.0 <= res[k] <= 100.0 for k in want if k != "rsum") and res["t2i_r10"] == 100.0
        assert res["history"].epochs == [1] and np.isfinite(res["history"].train["loss"][0])
    qa = retrieval.run_query_agnostic(data, small, text_level="fine", seed=0, progress=False)
    assert qa["sims"].shape == (3, 15) and torch.isfinite(qa["sims"]).all()
    assert qa["kept"] == K  # no boxes in SCAN's precomp: the object prior keeps every region
    assert qa["rsum"] == pytest.approx(recall_at_k(qa["sims"], data.cap_to_img["test"])["rsum"])

    lines = retrieval_examples(qa["sims"], data.cap_to_img["test"], source, images=(0,), captions=(1,), k=2)
    assert lines[0] == f"image {source.filenames['test'][0]}: top-2 captions" and len(lines) == 6
    assert lines[3].startswith(f'caption "{source.captions["test"][1]}"')
    top = qa["sims"][:, 1].topk(2).indices.tolist()
    assert lines[4:] == [f"  {'✓' if i == 0 else '✗'} {source.filenames['test'][i]}" for i in top]
    assert lines[1:3] == [f"  {'✓' if c < 5 else '✗'} {source.captions['test'][c]}"
                          for c in qa["sims"][0].topk(2).indices.tolist()]


def test_per_image_folders_and_val_name(cache):
    root = cache / "retrieval_data" / "coco"
    _fixture(root, n=(2, 2, 2), form="dir", json_name="dataset_coco.json")
    (root / "dev").rename(root / "val")
    data, source = load_retrieval_inputs(get_config("full").retrieval, progress=False)
    assert source.name == "coco" and source.paper == PAPER_SCAN["coco"]
    assert data.feats["val"]["fine"].shape == (2, K, D) and data.feats["train"]["fine"].shape == (3, K, D)


@pytest.mark.parametrize("case, error, match", [
    ("no_json", FileNotFoundError, r"dataset_flickr30k\.json: missing; expected Flickr30K's Karpathy-split JSON"),
    ("no_dev", FileNotFoundError, r"dev_ims\.npy: missing; expected .* Karpathy's 'val' split: shape \(3, 36, d\)"),
    ("wrong_n", ValueError, r"test_ims\.npy: 2 images but dataset_flickr30k\.json's 'test' split has 3"),
    ("wrong_k", ValueError, r"train_ims\.npy: 10 regions per image, expected k = 36 \(the profile's retrieval\.k_fine"),
    ("wrong_d", ValueError, r"dev_ims\.npy: feature dimension 512, but train_ims\.npy has 2048"),
    ("flat", ValueError, r"test_ims\.npy: expected shape \(N, k, d\) = \(3, 36, d\), got \(3, 2048\)"),
    ("dir_wrong_d", ValueError, r"feature dimension differs between splits .*'val': 512"),
    ("no_test_split", ValueError, r"dataset_flickr30k\.json: no image has split 'test'"),
])
def test_layout_errors_name_the_file(cache, case, error, match):
    root = cache / "retrieval_data" / "f30k"
    rng = np.random.default_rng(1)
    if case == "no_json":
        root.mkdir(parents=True)
    else:
        images = _fixture(root, n=(4, 3, 3), form="dir" if case == "dir_wrong_d" else "npy")
    if case == "no_dev":
        (root / "dev_ims.npy").unlink()
    elif case == "wrong_n":
        np.save(root / "test_ims.npy", rng.standard_normal((2, K, D)).astype(np.float32))
    elif case == "wrong_k":
        np.save(root / "train_ims.npy", rng.standard_normal((5, 10, D)).astype(np.float32))
    elif case == "wrong_d":
        np.save(root / "dev_ims.npy", rng.standard_normal((3, K, 512)).astype(np.float32))
    elif case == "flat":
        np.save(root / "test_ims.npy", rng.standard_normal((3, D)).astype(np.float32))
    elif case == "dir_wrong_d":
        for f in (root / "dev").iterdir():
            np.save(f, rng.standard_normal((K, 512)).astype(np.float32))
    elif case == "no_test_split":
        for im in images:
            im["split"] = "val" if im["split"] == "test" else im["split"]
        (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(error, match=match):
        load_retrieval_inputs(get_config("full").retrieval, progress=False)


def test_unknown_dataset_name_is_an_error(cache):
    cfg = dict(get_config("smoke").retrieval, real_data=("flickr",))
    with pytest.raises(ValueError, match=r"unknown dataset 'flickr'; expected names among \['coco', 'f30k'\]"):
        load_retrieval_inputs(cfg, progress=False)


def test_absent_data_says_so_in_one_line_and_falls_back_to_the_scenes(cache, capsys):
    cfg = get_config("smoke").retrieval
    splits = build_captioned(cfg, seed=0)
    feats, _, _ = retrieval.build_features(splits, cfg, seed=0, progress=False)
    capsys.readouterr()
    want = retrieval.RetrievalData.build(splits, feats)

    # a profile that asks for no real data: the scenes, built by the same calls, nothing printed
    data, source = load_retrieval_inputs(cfg, seed=0, progress=False)
    assert capsys.readouterr().out == "" and source.synthetic and source.label == "captioned shapes"
    for split in ("train", "val", "test"):
        for level in ("fine", "coarse", "boxes"):
            assert torch.equal(data.feats[split][level], want.feats[split][level])
        for level in ("fine", "coarse"):
            assert all(torch.equal(a, b) for a, b in zip(data.texts[split][level], want.texts[split][level]))
        assert torch.equal(data.cap_to_img[split], want.cap_to_img[split])
    assert data.vocab.itos == want.vocab.itos
    # same checkpoint folders as before the data source existed
    assert retrieval.scan_grid_knobs(cfg, 0, source.knobs) == retrieval.scan_grid_knobs(cfg, 0)

    # full / fullpath ask for Flickr30K or MSCOCO; absent: exactly one line, then the scenes
    for name in ("full", "fullpath"):
        asks = dict(cfg, real_data=get_config(name).retrieval.real_data)
        data, source = load_retrieval_inputs(asks, seed=0, progress=False, synthetic=(splits, feats))
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1, out
        line = out[0]
        assert line.startswith("retrieval data: no Flickr30K or MSCOCO found (")
        for part in (f"{retrieval_data_root() / 'f30k'}/ with dataset_flickr30k.json",
                     f"{retrieval_data_root() / 'coco'}/ with dataset_coco.json",
                     "{train,dev,test}_ims.npy of shape (N, 4, d)", "using the synthetic captioned scenes instead"):
            assert part in line, (part, line)
        assert source.synthetic and source.message == line
        assert torch.equal(data.feats["test"]["fine"], want.feats["test"]["fine"])


def test_fixture_runs_through_the_command_line(cache, capsys):
    """The command line's scan and query-agnostic recipes on the fixture, in ``fullpath`` (full's
    settings and code path, one epoch), and then notebook 04's loading call finds their run."""
    from course_utils import cli
    from course_utils.cache import run_dir

    _fixture(cache / "retrieval_data" / "f30k")
    assert cli.main(["scan", "--profile", "fullpath", "--level", "fine", "--variant", "i-t AVG"]) == 0
    assert cli.main(["query-agnostic", "--profile", "fullpath", "--level", "fine"]) == 0
    out = capsys.readouterr().out
    assert "retrieval data: Flickr30K from " in out
    assert "fine   i-t AVG" in out and "query-agnostic (fine) t2i R@1" in out
    cfg = get_config("fullpath").retrieval
    data, source = load_retrieval_inputs(cfg, seed=0, progress=False)
    root = run_dir("04_scan_grid", retrieval.scan_grid_knobs(cfg, 0, source.knobs))
    res = retrieval.run_variant(data, "fine", "i-t AVG", cfg, seed=0, ckpt_root=root, progress=False)
    assert "[fine i-t AVG] already done: loaded" in capsys.readouterr().out
    assert res["sims"].shape == (3, 15)
