"""Tests of course_utils.clip: word-spotting metrics against hand computations, the loss, the small CLIP, loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from course_utils import registry
from course_utils.clip import finetune as ft
from course_utils.clip import loading, small
from course_utils.clip import wordspotting as ws

# two images, four words; hand-made so every number below can be checked on paper
P2 = torch.tensor([[0.5, 0.3, 0.1, 0.1],
                   [0.1, 0.2, 0.4, 0.3]], dtype=torch.float64)
Y2 = torch.tensor([[True, True, False, False],
                   [True, False, False, False]])


# --------------------------------------------------------------------------------------------
# approach 2 (Eq. 2.3.10-2.3.13)
# --------------------------------------------------------------------------------------------


def test_soft_confusion_by_hand():
    c = ws.soft_confusion(P2, Y2)
    # image 0: positives 0.5, 0.3 -> ratios 1, 0.6; negatives 0.1, 0.1 -> ratios 1, 1
    # image 1: positive 0.1 -> ratio 1; negatives 0.2, 0.4, 0.3 -> ratios .5, 1, .75
    torch.testing.assert_close(c["tp"], torch.tensor([1.6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(c["fn"], torch.tensor([0.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(c["fp"], torch.tensor([2.0, 2.25], dtype=torch.float64))
    torch.testing.assert_close(c["tn"], torch.tensor([0.0, 0.75], dtype=torch.float64))


def test_soft_confusion_edge_cases():
    # no positives at all in row 0; all-zero negatives in row 1
    P = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    Y = torch.tensor([[False, False], [True, False]])
    c = ws.soft_confusion(P, Y)
    assert c["tp"].tolist() == [0.0, 1.0] and c["fn"].tolist() == [0.0, 0.0]
    assert c["fp"].tolist() == pytest.approx([1.25, 0.0]) and c["tn"].tolist() == pytest.approx([0.75, 1.0])


def test_classification_metrics_macro_and_micro_by_hand():
    c = ws.soft_confusion(P2, Y2)
    m = ws.classification_metrics(c, average="macro")
    acc = [(1.6 + 0) / 4, (1 + 0.75) / 4]
    prec = [1.6 / 3.6, 1 / 3.25]
    rec = [0.8, 1.0]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec)]
    assert m["accuracy"] == pytest.approx(np.mean(acc))
    assert m["precision"] == pytest.approx(np.mean(prec))
    assert m["recall"] == pytest.approx(np.mean(rec))
    assert m["f1"] == pytest.approx(np.mean(f1))
    mi = ws.classification_metrics(c, average="micro")
    tp, tn, fp, fn = 2.6, 0.75, 4.25, 0.4
    assert mi["accuracy"] == pytest.approx((tp + tn) / 8)
    assert mi["precision"] == pytest.approx(tp / (tp + fp))
    assert mi["recall"] == pytest.approx(tp / (tp + fn))
    with pytest.raises(ValueError, match="average='weighted'"):
        ws.classification_metrics(c, average="weighted")


def test_classification_metrics_zero_division_is_zero():
    zero = torch.zeros(1, dtype=torch.float64)
    m = ws.classification_metrics({"tp": zero, "fp": zero, "fn": zero + 1, "tn": zero + 3})
    assert m == {"accuracy": 0.75, "precision": 0.0, "recall": 0.0, "f1": 0.0}


# --------------------------------------------------------------------------------------------
# approach 1 (Youden's J)
# --------------------------------------------------------------------------------------------


def _best_j(scores: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: the largest TPR - FPR over every threshold 'score >= t'."""
    best = -1.0
    for t in np.concatenate([scores, [np.inf]]):
        pred = scores >= t
        tpr = (pred & labels).sum() / labels.sum()
        fpr = (pred & ~labels).sum() / (~labels).sum()
        best = max(best, tpr - fpr)
    return best


def test_youden_thresholds_maximise_j():
    g = torch.Generator().manual_seed(0)
    P = torch.rand(40, 6, generator=g, dtype=torch.float64)
    Y = torch.rand(40, 6, generator=g) < 0.3
    Y[:, 4] = False  # a word nobody has
    Y[:, 5] = True  # a word everybody has
    th = ws.youden_thresholds(P, Y)
    assert th.shape == (6,) and th[4] == math.inf and th[5] == -math.inf
    Pn, Yn = P.numpy(), Y.numpy()
    for j in range(4):
        pred = Pn[:, j] >= th[j].item()
        j_stat = (pred & Yn[:, j]).sum() / Yn[:, j].sum() - (pred & ~Yn[:, j]).sum() / (~Yn[:, j]).sum()
        assert j_stat == pytest.approx(_best_j(Pn[:, j], Yn[:, j]))


def test_threshold_confusion_by_hand():
    th = torch.tensor([0.3, 0.25, 0.35, 0.5])
    c = ws.threshold_confusion(P2, Y2, th)
    # image 0 predicts words {0, 1}; image 1 predicts word {2}
    assert c["tp"].tolist() == [2, 0] and c["fn"].tolist() == [0, 1]
    assert c["fp"].tolist() == [0, 1] and c["tn"].tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"thresholds: expected shape \(4,\)"):
        ws.threshold_confusion(P2, Y2, th[:3])
    # one threshold per entry gives the same counts as the per-word ones broadcast
    per_entry = th[None, :].expand(P2.shape[0], -1)
    c2 = ws.threshold_confusion(P2, Y2, per_entry)
    assert all(torch.equal(c2[k], c[k]) for k in c)


def test_eq_2_3_5_literal_thresholds():
    th = ws.youden_thresholds(P2, Y2)
    lit = ws.eq_2_3_5_thresholds(P2, Y2)
    n_pos = Y2.sum(1).double()
    for i in range(P2.shape[0]):
        for j in range(P2.shape[1]):
            want = (1.0 / n_pos[i] - th[j]) if n_pos[i] > 0 else float("inf")
            assert lit[i, j] == pytest.approx(float(want)), (i, j)
    Y0 = Y2.clone()
    Y0[1] = False  # a row without positives is never given a word
    assert torch.isinf(ws.eq_2_3_5_thresholds(P2, Y0)[1]).all()


def test_separable_scores_give_perfect_threshold_metrics():
    Y = torch.eye(5, dtype=torch.bool)
    P = torch.where(Y, 0.6, 0.1).double()
    c = ws.threshold_confusion(P, Y, ws.youden_thresholds(P, Y))
    assert ws.classification_metrics(c) == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


# --------------------------------------------------------------------------------------------
# entropy (Eq. 2.3.15)
# --------------------------------------------------------------------------------------------


def test_normalised_similarity_entropy_by_hand():
    P = torch.tensor([[0.3, 0.1, 0.6], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05], [0.1, 0.0, 0.9]])
    Y = torch.tensor([[True, True, False], [True, True, False], [True, False, False], [True, True, False]])
    e = ws.normalised_similarity_entropy(P, Y)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert e[0].item() == pytest.approx(h)  # 0.811
    assert e[1].item() == pytest.approx(1.0)  # uniform over the positives
    assert math.isnan(e[2].item())  # one positive: base 1 is undefined
    assert e[3].item() == pytest.approx(0.0)  # all mass on one positive (0 log 0 = 0)


def test_entropy_base_is_the_number_of_positives():
    Y = torch.tensor([[True] * 4 + [False] * 2])
    P = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.3, 0.3]])
    assert ws.normalised_similarity_entropy(P, Y).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# probability matrices, lexicons, top-k
# --------------------------------------------------------------------------------------------


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_word_image_probabilities_is_a_row_softmax():
    img = _unit([1, 0], [0, 1], [1, 1])
    txt = _unit([1, 0], [0, 1], [-1, 0])
    P = ws.word_image_probabilities(img, txt, logit_scale=10.0)
    assert P.shape == (3, 3)
    torch.testing.assert_close(P.sum(1), torch.ones(3))
    torch.testing.assert_close(P[0], torch.softmax(torch.tensor([10.0, 0.0, -10.0]), 0))
    assert P[1].argmax() == 1
    with pytest.raises(ValueError, match=r"image_emb \(3, 2\) and text_emb \(2, 3\)"):
        ws.word_image_probabilities(img, torch.zeros(2, 3))


def test_lexicon_probabilities_are_zero_outside_the_lexicon():
    img = _unit([1, 0], [0, 1])
    txt = _unit([1, 0], [0, 1], [1, 1])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    P = ws.lexicon_probabilities(img, txt, mask, logit_scale=5.0)
    assert P[0, 0] == 0
    torch.testing.assert_close(P.sum(1), torch.ones(2))
    s = 5.0 * (img[0] @ txt[1:].T)
    torch.testing.assert_close(P[0, 1:], s.softmax(0))
    with pytest.raises(ValueError, match="image 0 has an empty lexicon"):
        ws.lexicon_probabilities(img, txt, torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="expected a bool tensor of shape"):
        ws.lexicon_probabilities(img, txt, mask.float())


def test_positives_matrix_and_top_k():
    vocab = ["BAR", "CAFE", "INC", "JOINT"]
    Y = ws.positives_matrix([["JOINT", "BAR"], []], vocab)
    assert Y.tolist() == [[True, False, False, True], [False] * 4]
    with pytest.raises(KeyError, match=r"image 1: words \['PUB'\]"):
        ws.positives_matrix([["BAR"], ["PUB"]], vocab)
    top = ws.top_k_words(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), vocab, k=2)
    assert [w for w, _ in top[0]] == ["JOINT", "INC"] and top[0][0][1] == pytest.approx(0.4)


def test_lexicon_top1_accuracy_by_hand():
    vocab = ["A", "B", "C"]
    txt = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    img = _unit([1, 0.2, 0], [0.9, 1, 0], [0, 0, 1])
    # crop 0 -> A (right); crop 1 -> B overall, but B is not in its lexicon -> A (wrong, truth C);
    # crop 2 -> C (right)
    acc = ws.lexicon_top1_accuracy(img, txt, vocab, [["A", "B"], ["A", "C"], ["B", "C"]], ["A", "C", "C"])
    assert acc == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 crops, 2 lexicons"):
        ws.lexicon_top1_accuracy(img, txt, vocab, [["A"], ["B"]], ["A", "B", "C"])


# --------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------


def test_contrastive_loss_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    out = ft.clip_contrastive_loss(a, b, 7.0)
    va, vb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    S = 7.0 * va @ vb.T
    li = -sum(S[i, i] - torch.logsumexp(S[i, :], 0) for i in range(5)) / 5
    lt = -sum(S[i, i] - torch.logsumexp(S[:, i], 0) for i in range(5)) / 5
    torch.testing.assert_close(out["loss_image"], li)
    torch.testing.assert_close(out["loss_text"], lt)
    torch.testing.assert_close(out["loss"], (li + lt) / 2)
    # open_clip's own loss agrees
    from open_clip.loss import ClipLoss

    torch.testing.assert_close(ClipLoss()(va, vb, torch.tensor(7.0)), out["loss"])


def test_contrastive_loss_extremes_and_shapes():
    e = torch.eye(4)
    assert ft.clip_contrastive_loss(e, e, 100.0)["loss"].item() < 1e-6
    same = torch.ones(4, 3)
    assert ft.clip_contrastive_loss(same, same, 10.0)["loss"].item() == pytest.approx(math.log(4), rel=1e-5)
    scale = torch.tensor(3.0, requires_grad=True)
    ft.clip_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), scale)["loss"].backward()
    assert scale.grad is not None
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(3, 3\)"):
        ft.clip_contrastive_loss(torch.randn(4, 3), torch.randn(3, 3), 1.0)


# --------------------------------------------------------------------------------------------
# the small CLIP: build, save/load, load_clip
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A small CLIP with a few non-zero token rows saved like the shipped one."""
    d = tmp_path_factory.mktemp("small_clip")
    model = small.build_small_clip(seed=3)
    with torch.no_grad():
        model.token_embedding.weight[[5, 700, 49407]] = torch.randn(3, 128)
    sha = small.save_small_clip(model, d / small.SMALL_CLIP_WEIGHTS)
    (d / "manifest.json").write_text(json.dumps({"sha256": sha, "final_metrics": {"lexicon50_top1_synthsvt_test": 0.5}}))
    return d, model, sha


def test_build_small_clip_is_seeded_and_starts_with_a_zero_token_table():
    a, b = small.build_small_clip(seed=0), small.build_small_clip(seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.visual.proj, small.build_small_clip(seed=1).visual.proj)
    assert a.token_embedding.weight.abs().sum() == 0
    x = torch.randn(2, 3, *small.SMALL_CLIP_IMAGE_SIZE)
    assert a.encode_image(x).shape == (2, 128)


def test_save_and_load_round_trip_and_same_bytes(small_dir, tmp_path):
    d, model, sha = small_dir
    state = small.load_small_clip_state(d / small.SMALL_CLIP_WEIGHTS)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert small.save_small_clip(model, tmp_path / "again.safetensors") == sha == small.file_sha256(d / small.SMALL_CLIP_WEIGHTS)
    # sparse storage: the file is far smaller than the 49408x128 float table (25 MB)
    assert (d / small.SMALL_CLIP_WEIGHTS).stat().st_size < 10_000_000


def test_load_clip_small_and_offline_fallback(small_dir, monkeypatch, capsys):
    d, model, sha = small_dir
    bundle = loading.load_clip("small", weights_dir=d)
    out = capsys.readouterr().out
    assert "course small CLIP" in out and sha[:12] in out and "50.0%" in out
    assert bundle.kind == "small" and bundle.info["sha256"] == sha
    # COURSE_OFFLINE=1 (the tests' setting): no cached ViT-B/32, so the small CLIP, said once
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    monkeypatch.setattr(loading, "open_clip_cached_file", lambda *a, **k: None)
    bundle = loading.load_clip("full", weights_dir=d)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("[offline] could not download clip_vit_b32_openai (COURSE_OFFLINE=1 is set); "
                                   "using the course's small CLIP instead.") and bundle.kind == "small"
    # network allowed but the download fails: the registry says why; open_clip never downloads itself
    monkeypatch.delenv("COURSE_OFFLINE")

    def no_network(*args, **kwargs):
        raise requests.exceptions.ConnectionError("no route to host")

    monkeypatch.setattr(registry.pooch, "retrieve", no_network)
    monkeypatch.setattr(loading.open_clip, "create_model_and_transforms",
                        lambda *a, **k: pytest.fail("built ViT-B/32 without its weights"))
    bundle = loading.load_clip("full", weights_dir=d)
    out = capsys.readouterr().out
    assert "could not download clip_vit_b32_openai (no network connection)" in out and bundle.kind == "small"
    with pytest.raises(ValueError, match="kind='tiny'"):
        loading.load_clip("tiny")
    with pytest.raises(FileNotFoundError, match="pretrain_small_clip.py"):
        loading.load_clip("small", weights_dir=d / "nowhere", random_if_missing=False)
    random = loading.load_clip("small", weights_dir=d / "nowhere")
    assert random.info["random_init"] and "RANDOMLY INITIALISED" in random.weights
    assert "nowhere" in random.weights and "small_clip.safetensors" in random.weights


def test_bundle_encodes_images_and_words(small_dir, capsys):
    d, _, _ = small_dir
    bundle = loading.load_clip("small", weights_dir=d, verbose=False)
    assert capsys.readouterr().out == ""
    imgs = [Image.new("RGB", (60, 20), (255, 0, 0)), Image.new("L", (30, 30), 128)]
    x = bundle.preprocess(imgs[1])
    assert x.shape == (3, 32, 128) and x.dtype == torch.float32
    e = bundle.encode_images(imgs, batch_size=1)
    t = bundle.encode_texts(["JOINT", "JOINE", "RESTAURANT"])
    assert e.shape == (2, 128) and t.shape == (3, 128)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    P = ws.word_image_probabilities(e, t, bundle.logit_scale)
    torch.testing.assert_close(P.sum(1), torch.ones(2))
    assert bundle.tokenizer(["JOINT"]).shape == (1, 16)


def test_small_tokenizer_reads_letter_by_letter():
    """One token per letter: look-alikes differ exactly where their letters differ."""
    assert small.spell_out("JOINT") == "J O I N T" and small.spell_out("NEW YORK") == "N E W _ Y O R K"
    tok = small.small_clip_tokenizer()(["JOINT", "JOINE", "JOINTS", "A"])
    sot, eot = tok[0, 0].item(), tok[0, 6].item()
    assert (tok[:, 0] == sot).all() and tok[0, 6] == eot and tok[2, 7] == eot and tok[3, 2] == eot
    assert (tok[0, :5] == tok[1, :5]).all() and tok[0, 5] != tok[1, 5]  # only the last letter differs
    assert (tok[0, :6] == tok[2, :6]).all()  # JOINTS = JOINT + one more letter
    letters = {small.small_clip_tokenizer()([c])[0, 1].item() for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    assert len(letters) == 26  # every letter its own token
    long = small.small_clip_tokenizer()(["X" * 40])
    assert long.shape == (1, 16) and long[0, -1] == eot  # truncated, still ends with <eot>


def test_word_crop_dataset_and_contrastive_step(small_dir):
    d, _, _ = small_dir
    bundle = loading.load_clip("small", weights_dir=d, verbose=False)
    imgs = [Image.new("RGB", (40 + 10 * k, 16), (30 * k, 0, 0)) for k in range(4)]
    ds = ft.WordCropDataset(imgs, ["JOINT", "JOHNS", "JONES", "THE"], bundle)
    assert len(ds) == 4
    x, t = ds[2]
    assert x.shape == (3, 32, 128) and t.shape == (16,) and t.dtype == torch.long
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    bundle.model.train()
    out = ft.contrastive_step(bundle.model, batch)
    assert set(out) == {"loss", "loss_image", "loss_text"} and out["loss"].ndim == 0
    out["loss"].backward()
    assert bundle.model.visual.proj.grad is not None
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        ft.WordCropDataset(imgs[:2], ["A"], bundle)


# --------------------------------------------------------------------------------------------
# the pretraining stream of tools/pretrain_small_clip.py
# --------------------------------------------------------------------------------------------


def _pretrain_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "pretrain_small_clip.py"
    spec = importlib.util.spec_from_file_location("pretrain_small_clip", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pretraining_batches_are_lookalike_pairs_and_deterministic():
    from course_utils.synthsvt import _edit_distance

    mod = _pretrain_module()
    data = mod.PairBatches(seed=0, batch_size=8, random_rate=0.25)
    texts = data.texts(3)
    assert len(texts) == 8 and len(set(texts)) == 8
    for base, twin in zip(texts[::2], texts[1::2]):
        assert 1 <= _edit_distance(base, twin) <= 2
    assert mod.PairBatches(seed=0, batch_size=8, random_rate=0.25).texts(3) == texts
    assert data.texts(4) != texts
    x, tokens, t = data[3]
    assert x.shape == (8, 3, 32, 128) and tokens.shape == (8, 16) and t == texts
    x2, _, _ = mod.PairBatches(seed=0, batch_size=8, random_rate=0.25)[3]
    assert torch.equal(x, x2)


def test_pretraining_learning_rate_schedule():
    mod = _pretrain_module()
    assert mod._shared.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert mod._shared.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert mod._shared.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert mod._shared.lr_at(100, 100, 10, 1.0) == pytest.approx(0.02)


# --------------------------------------------------------------------------------------------
# devices: the model on the (virtual) GPU, inputs from the CPU (notebooks 06-08 on Colab)
# --------------------------------------------------------------------------------------------


def test_small_clip_encoders_take_cpu_inputs_on_the_gpu():
    from course_utils.device_guard import is_on_virtual_cuda, virtual_cuda

    model = small.build_small_clip(seed=0, zero_token_embedding=False).eval()
    x = torch.randn(2, 3, *small.SMALL_CLIP_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    tokens = small.small_clip_tokenizer()(["JOINT", "BAR"])
    with torch.no_grad():
        want_img, want_txt = model.encode_image(x), model.encode_text(tokens)
    with virtual_cuda() as dev, torch.no_grad():
        gpu = model.to(dev)
        img, txt = gpu.encode_image(x), gpu.encode_text(tokens, normalize=True)
        assert is_on_virtual_cuda(img) and is_on_virtual_cuda(txt)
        # the guard computes on the CPU, but with its mode on PyTorch skips the fused attention
        # kernel of eval mode: the same numbers up to float rounding
        torch.testing.assert_close(img.cpu(), want_img)
        torch.testing.assert_close(txt.cpu(), F.normalize(want_txt, dim=-1))
        with pytest.raises(ValueError, match=r"image: expected a \(B, 3, H, W\) tensor"):
            gpu.encode_image(x[0])
        with pytest.raises(ValueError, match="text: expected"):
            gpu.encode_text(tokens[0])


def test_bundle_on_the_gpu_encodes_to_the_cpu(small_dir):
    from course_utils.device_guard import is_on_virtual_cuda, virtual_cuda

    d, _, _ = small_dir
    imgs = [Image.new("RGB", (60, 20), (255, 0, 0)), Image.new("RGB", (40, 20), (0, 90, 0))]
    cpu = loading.load_clip("small", weights_dir=d, verbose=False)
    want_e, want_t = cpu.encode_images(imgs), cpu.encode_texts(["JOINT", "BAR"])
    with virtual_cuda() as dev:
        bundle = loading.load_clip("small", device=dev, weights_dir=d, verbose=False)
        assert bundle.device.type == "cuda"
        e, t = bundle.encode_images(imgs), bundle.encode_texts(["JOINT", "BAR"])
        assert not is_on_virtual_cuda(e) and not is_on_virtual_cuda(t)  # for metrics and figures
        torch.testing.assert_close(e, want_e)
        torch.testing.assert_close(t, want_t)


def test_probability_helpers_accept_one_operand_on_the_cpu():
    from course_utils.device_guard import is_on_virtual_cuda, virtual_cuda

    g = torch.Generator().manual_seed(4)
    img, txt = F.normalize(torch.randn(3, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    vocab = ["A", "B", "C", "D", "E"]
    lexicons, targets = [["A", "B"], ["B", "C", "D"], ["E", "A"]], ["A", "C", "E"]
    Y = ws.positives_matrix(lexicons, vocab)
    want_P = ws.word_image_probabilities(img, txt, 30.0)
    want_lex = ws.lexicon_probabilities(img, txt, Y, 30.0)
    want_acc = ws.lexicon_top1_accuracy(img, txt, vocab, lexicons, targets)
    want_m = ws.table_2_6_metrics(want_P, Y, lexicon=Y, approach1=True)
    with virtual_cuda() as dev:
        img_gpu = img.to(dev)  # embeddings on the GPU, vocabulary and masks on the CPU
        P = ws.word_image_probabilities(img_gpu, txt, 30.0)
        assert is_on_virtual_cuda(P) and torch.equal(P.cpu(), want_P)
        assert torch.equal(ws.lexicon_probabilities(img_gpu, txt, Y, 30.0).cpu(), want_lex)
        assert ws.lexicon_top1_accuracy(img_gpu, txt, vocab, lexicons, targets) == want_acc
        assert ws.table_2_6_metrics(P, Y, lexicon=Y, approach1=True) == want_m
        counts = ws.soft_confusion(P, Y)
        assert ws.classification_metrics(counts) == {k: want_m[k] for k in ("accuracy", "precision", "recall", "f1")}
        ent = ws.normalised_similarity_entropy(P, Y)
        assert float(torch.nanmean(ent)) == want_m["entropy"]
