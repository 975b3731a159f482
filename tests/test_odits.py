"""Tests of ODITS (course_utils.clip.objects, course_utils.clip.odits, course_utils.recipes.odits) and its exercise checks (course_utils.checks.nb08).

Tiny models only: an open_clip ``CLIP`` even smaller than the course's small one (same input
size and tokenizer, width 32, one layer per tower), randomly initialised.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from course_utils.clip import loading, objects, odits, odits_loss
from course_utils.clip import wordspotting as ws
from course_utils.clip.masks import BoxMaskSource, MaskError, ObjectMasks
from course_utils.recipes import odits as ro
from course_utils.svt import SVTWord

D, N_WORDS = 32, 12
TINY_CLIP = {
    "embed_dim": D,
    "vision_cfg": {"image_size": (32, 128), "patch_size": (32, 16), "width": 32, "layers": 1,
                   "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "mlp_ratio": 2.0},
}


@pytest.fixture(scope="module")
def clip() -> torch.nn.Module:
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return open_clip.CLIP(**TINY_CLIP).eval()


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _batch(seed: int = 0, B: int = 4, K: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[1, 1:] = False
    valid[2] = False  # image 2 has no objects
    targets = torch.zeros(B, N_WORDS, dtype=torch.bool)
    targets[0, [1, 2]] = targets[1, 3] = targets[2, 4] = targets[3, 5] = True
    return {"image_emb": _unit(g, B, D), "object_emb": _unit(g, B, K, D) * valid[..., None],
            "conf": torch.rand(B, K, generator=g) * valid, "valid": valid, "targets": targets}


def _model(clip: torch.nn.Module, seed: int = 0, **kw) -> odits.ODITS:
    import copy

    m = odits.ODITS(copy.deepcopy(clip), heads=4, seed=seed, **kw)
    m.set_vocabulary([f"W{i}" for i in range(N_WORDS)], _unit(torch.Generator().manual_seed(99), N_WORDS, D))
    return m


# --------------------------------------------------------------------------------------------
# objects
# --------------------------------------------------------------------------------------------


def test_object_image_background_and_crop() -> None:
    x = np.full((20, 30, 3), 200, dtype=np.uint8)
    x[5:10, 10:20] = 10
    img = Image.fromarray(x)
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[5:10, 10:20] = True
    crop = objects.object_image(img, mask, pad=0.0)
    assert crop.size == (10, 5) and np.all(np.asarray(crop) == 10)
    full = np.asarray(objects.object_image(img, mask, background="black", crop=False))
    assert full.shape == (20, 30, 3) and full[0, 0].tolist() == [0, 0, 0] and full[6, 12].tolist() == [10] * 3
    mean = np.asarray(objects.object_image(img, mask, crop=False))
    assert mean[0, 0].tolist() == [round(x.reshape(-1, 3).mean(0)[0])] * 3
    padded = objects.object_image(img, mask, pad=0.4)  # 2 px margin on each side
    assert padded.size == (14, 9)
    assert objects.object_image(img, torch.zeros(20, 30, dtype=torch.bool)).size == (1, 1)
    with pytest.raises(ValueError, match="mask is"):
        objects.object_image(img, torch.zeros(10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="background"):
        objects.object_image(img, mask, background="white")


# --------------------------------------------------------------------------------------------
# object-count analysis
# --------------------------------------------------------------------------------------------


def test_count_statistics() -> None:
    s = objects.count_statistics([1, 2, 2, 3, 7])
    assert s["mean"] == 3.0 and s["median"] == 2.0 and s["mode"] == 2.0 and s["n"] == 5
    assert math.isclose(s["std"], np.std([1, 2, 2, 3, 7], ddof=1))
    with pytest.raises(ValueError, match="no counts"):
        objects.count_statistics([])


def test_anderson_table_matches_scipy_and_decides() -> None:
    import inspect
    import warnings

    from scipy import stats

    counts = np.round(np.random.default_rng(0).exponential(8.0, size=300)).astype(int) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning from SciPy's deprecated interface
        rows = {r["distribution"]: r for r in objects.anderson_table(counts)}
    assert set(rows) == {"normal", "exponential"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = stats.anderson(counts.astype(float), dist="norm")
        ref_e = stats.anderson(counts.astype(float), dist="expon")
    assert math.isclose(rows["normal"]["statistic"], float(ref.statistic))
    assert math.isclose(rows["exponential"]["statistic"], float(ref_e.statistic))
    # the thesis's rule with the thesis's table (Stephens 1974): 1.341 / (1 + 0.6 / n)
    assert rows["exponential"]["critical_value"] == round(1.341 / (1 + 0.6 / 300), 3)
    assert rows["normal"]["critical_value"] == round(0.787 / (1 + 4 / 300 - 25 / 300 ** 2), 3)
    assert rows["normal"]["reject"] and rows["normal"]["decision"] == "reject H0"
    for r in rows.values():
        assert r["reject"] == (r["statistic"] > r["critical_value"]) and r["alpha"] == 0.05 and r["n"] == 300
        assert r["same_decision"] == (r["reject"] == (r["statistic"] > r["critical_value_scipy117"]))
    if "method" in inspect.signature(stats.anderson).parameters and hasattr(ref, "critical_values"):
        # SciPy 1.17-1.18 still tabulate critical values: the course's copy of that table equals them
        assert math.isclose(rows["normal"]["critical_value_scipy117"], float(ref.critical_values[2]))
        assert math.isclose(rows["exponential"]["critical_value_scipy117"], float(ref_e.critical_values[2]))
    text = objects.format_anderson_table(list(rows.values()))
    assert "exponential law" in text and "crit. 5 %" in text and "SciPy 1.17" in text
    with pytest.raises(ValueError, match="all 4 counts equal"):
        objects.anderson_table([2, 2, 2, 2])
    with pytest.raises(ValueError, match="at least 3"):
        objects.anderson_table([1, 2])
    with pytest.raises(ValueError, match="alpha=0.2"):
        objects.anderson_table(counts, alpha=0.2)


def test_ad_critical_values_are_the_thesis_and_the_revised_tables() -> None:
    # Table 3.3: H0 exponential, 5 %, n = 100 -> 1.333; SciPy 1.17's revised table -> 1.313
    assert objects.ad_critical_value("expon", 100) == 1.333
    assert objects.ad_critical_value("expon", 100, table="scipy1.17") == 1.313
    assert objects.ad_critical_value("norm", 100, 0.01) == round(1.092 / (1 + 0.04 - 0.0025), 3)
    with pytest.raises(ValueError, match="table='x'"):
        objects.ad_critical_value("norm", 100, table="x")
    with pytest.raises(ValueError, match="dist='gumbel'"):
        objects.ad_critical_value("gumbel", 100)


def test_plot_object_counts_marks_the_statistics() -> None:
    import matplotlib.pyplot as plt

    ax = objects.plot_object_counts([1, 2, 2, 3, 5, 8], density=True)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lbl.startswith("mean") for lbl in labels) and any(lbl.startswith("mode") for lbl in labels)
    assert "KDE" in labels and ax.get_ylabel() == "density"
    ax2 = objects.plot_object_counts([3, 3, 3])  # constant counts: no KDE, still a figure
    assert "KDE" not in [t.get_text() for t in ax2.get_legend().get_texts()]
    plt.close("all")


def test_explanation_figure_lists_the_words_of_each_object() -> None:
    import matplotlib.pyplot as plt

    img = Image.new("RGB", (80, 60), (120, 120, 120))
    objs = BoxMaskSource()(img, boxes=[[2, 3, 30, 13], [40, 30, 70, 42]])
    P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    ax = objects.plot_object_words(img, objs, P, ["JOINT", "BAR", "CAFE"], k=2, truth=["JOINT"])
    text = "\n".join(t.get_text() for t in ax.texts)
    assert "1: JOINT ✓ 0.70, BAR 0.20" in text and "2: CAFE 0.80" in text
    empty = objects.plot_object_words(img, BoxMaskSource()(img, boxes=[]), torch.zeros(0, 3), ["A", "B", "C"])
    assert "image alone" in "".join(t.get_text() for t in empty.texts)
    plt.close("all")


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def test_similarity_weighted_embeddings() -> None:
    g = torch.Generator().manual_seed(1)
    em, et = 2 * _unit(g, 2, 3, 16), _unit(g, 5, 16)
    P, es = odits.similarity_weighted_embeddings(em, et, 100.0)
    assert P.shape == (2, 3, 5) and es.shape == (2, 3, 16)
    assert torch.allclose(P.sum(-1), torch.ones(2, 3))
    assert torch.allclose(es, P @ et)
    assert torch.allclose(P, (100 * F.normalize(em, dim=-1) @ et.T).softmax(-1))  # cosine, not dot
    with pytest.raises(ValueError, match="non-empty"):
        odits.similarity_weighted_embeddings(em, torch.zeros(0, 16))
    with pytest.raises(ValueError, match="same embedding size"):
        odits.similarity_weighted_embeddings(em, _unit(g, 5, 8))


def test_object_self_attention_rules() -> None:
    g = torch.Generator().manual_seed(2)
    B, K, d = 2, 4, 8
    es, em, conf = torch.randn(B, K, d, generator=g), _unit(g, B, K, d), torch.rand(B, K, generator=g)
    w = [torch.randn(d, d, generator=g) for _ in range(3)]
    valid = torch.tensor([[True, True, True, False], [False, False, False, False]])
    out = odits.object_self_attention(es, em, conf, valid, *w)
    assert out.shape == (B, d) and torch.all(out[1] == 0)  # no objects → zeros, not NaN
    # padding is ignored: garbage in the invalid slot changes nothing
    es2, em2 = es.clone(), em.clone()
    es2[0, 3], em2[0, 3] = 1e3, 1e3
    assert torch.allclose(odits.object_self_attention(es2, em2, conf, valid, *w), out)
    # the objects form a set: their order does not matter
    perm = torch.tensor([2, 0, 1, 3])
    assert torch.allclose(odits.object_self_attention(es[:, perm], em[:, perm], conf[:, perm], valid[:, perm], *w), out,
                          atol=1e-6)
    # one object: attention weight 1, output c · E_M W_v^T
    one = odits.object_self_attention(es[:, :1], em[:, :1], conf[:, :1], torch.ones(B, 1, dtype=torch.bool), *w)
    assert torch.allclose(one, conf[:, :1] * em[:, 0] @ w[2].T, atol=1e-6)


def test_cross_attention_folded_output_projection_is_exact() -> None:
    torch.manual_seed(0)
    att = odits.CrossAttention(16, heads=4)
    q, ctx = torch.randn(50, 16), torch.randn(3, 2, 16)  # 50 shared queries, 2 keys: folded path
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    got = att(q, ctx, valid)
    assert got.shape == (3, 50, 16)
    # the textbook formula, head by head
    Q = att.q(q).view(50, 4, 4).transpose(0, 1)
    for b in range(3):
        K = att.k(ctx[b]).view(2, 4, 4).transpose(0, 1)
        V = att.v(ctx[b]).view(2, 4, 4).transpose(0, 1)
        s = (Q @ K.transpose(1, 2) / 2.0).masked_fill(~valid[b][None, None], float("-inf"))
        a = torch.nan_to_num(s.softmax(-1))
        want = att.o((a @ V).transpose(0, 1).reshape(50, 16))
        assert torch.allclose(got[b], want, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


def test_odits_forward_shapes_and_probabilities(clip: torch.nn.Module) -> None:
    m = _model(clip)
    b = _batch()
    out = m(b["image_emb"], b["object_emb"], b["conf"], b["valid"])
    assert out["logits"].shape == (4, N_WORDS) and out["object_text"].shape == (4, 3, N_WORDS)
    assert out["has_objects"].tolist() == [True, True, False, True]
    assert torch.allclose(out["image"].norm(dim=-1), torch.ones(4))
    assert torch.isfinite(out["logits"]).all()
    assert float(out["logits"].detach().abs().max()) <= float(m.logit_scale.detach().exp()) + 1e-4  # cosine x temperature


def test_image_without_objects_falls_back_to_the_image_alone(clip: torch.nn.Module) -> None:
    m = _model(clip).eval()
    b = _batch()
    out = m(b["image_emb"], b["object_emb"], b["conf"], b["valid"])
    ablation = _model(clip, use_objects=False).eval()
    ablation.load_state_dict(m.state_dict())
    ab = ablation(b["image_emb"], b["object_emb"], b["conf"], b["valid"])
    assert torch.allclose(out["logits"][2], ab["logits"][2], atol=1e-5)  # no objects: same as ablation
    assert not torch.allclose(out["logits"][0], ab["logits"][0], atol=1e-3)  # with objects: different
    alone = m(b["image_emb"][2:3], torch.zeros(1, 0, D), torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.bool))
    assert torch.allclose(alone["logits"][0], out["logits"][2], atol=1e-5)  # K = 0 batch works too


def test_empty_vocabulary_and_bad_shapes_are_clear_errors(clip: torch.nn.Module) -> None:
    m = _model(clip)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        m.set_vocabulary([], torch.zeros(0, D))
    with pytest.raises(ValueError, match=r"expected \(2, 32\)"):
        m.set_vocabulary(["A", "B"], torch.zeros(3, D))
    b = _batch()
    with pytest.raises(ValueError, match="vocabulary is empty"):
        m(b["image_emb"], b["object_emb"], b["conf"], b["valid"], text_emb=torch.zeros(0, D))
    with pytest.raises(ValueError, match="object_emb must be"):
        m(b["image_emb"], b["object_emb"][:2], b["conf"], b["valid"])
    with pytest.raises(ValueError, match="conf"):
        m(b["image_emb"], b["object_emb"], b["conf"][:, :2], b["valid"])
    with pytest.raises(ValueError, match="empty"):
        odits.ODITS(clip).forward(b["image_emb"], b["object_emb"], b["conf"], b["valid"])


def test_vocabulary_from_a_tokenizer(clip: torch.nn.Module) -> None:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    m = _model(clip)
    m.set_vocabulary(["JOINT", "BAR"], tokenizer=lambda w: tok(list(w)))
    assert m.text_emb.shape == (2, D) and torch.allclose(m.text_emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_initialisation_shared_from_clip_new_layers_seeded(clip: torch.nn.Module) -> None:
    m0, m0b, m1 = _model(clip, seed=0), _model(clip, seed=0), _model(clip, seed=1, init="kaiming")
    shared = m0.shared_parameter_names()
    assert "logit_scale" in shared and any(n.startswith("clip.visual") for n in shared)
    for name, p in clip.named_parameters():
        assert torch.equal(m0.get_parameter("clip." + name), p)
    assert torch.equal(m0.logit_scale, clip.logit_scale)
    new = [n for n, _ in m0.named_parameters() if n not in shared]
    assert all(torch.equal(m0.get_parameter(n), m0b.get_parameter(n)) for n in new)  # same seed, same init
    assert not torch.equal(m0.sa1_q.weight, m1.sa1_q.weight)
    b_x, b_k = math.sqrt(6 / (2 * D)), math.sqrt(6 / D)
    assert float(m0.sa1_q.weight.detach().abs().max()) <= b_x < float(m1.sa1_q.weight.detach().abs().max()) <= b_k
    assert torch.all(m0.sa1_out.bias == 0) and torch.all(m0.norm_sa2.weight == 1)
    # frozen CLIP: only the new layers and the temperature learn
    assert not any(p.requires_grad for p in m0.clip.parameters())
    state = torch.get_rng_state()
    _model(clip, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # building ODITS leaves the global RNG alone


def test_set_deterministic_sets_the_flags_of_section_3_2() -> None:
    flags = odits.set_deterministic(0)
    try:
        assert flags == {"use_deterministic_algorithms": True, "cudnn.benchmark": False,
                         "cudnn.deterministic": True}
    finally:
        torch.use_deterministic_algorithms(False)


# --------------------------------------------------------------------------------------------
# loss and training
# --------------------------------------------------------------------------------------------


def test_class_weighted_loss() -> None:
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = torch.zeros(3, 5, dtype=torch.bool)
    y[0, 1] = y[1, 2] = True
    # one word per image, unit weights: plain cross-entropy; image 2 (no words) is left out
    assert torch.allclose(odits_loss.class_weighted_loss(logits, y), F.cross_entropy(logits[:2], torch.tensor([1, 2])))
    y[0, 3] = True
    w = torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0])
    lp = logits.log_softmax(-1)
    want = (-(lp[0, 1] + 3 * lp[0, 3]) / 4 - lp[1, 2]) / 2
    assert torch.allclose(odits_loss.class_weighted_loss(logits, y, w), want)
    zero = odits_loss.class_weighted_loss(logits, torch.zeros(3, 5, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_written_mass_loss_is_minus_log_of_the_written_words_probability() -> None:
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = torch.zeros(3, 5, dtype=torch.bool)
    y[0, 1] = y[0, 3] = y[1, 2] = True  # image 2 has no written word: left out
    p = logits.softmax(-1)
    want = -(torch.log(p[0, 1] + p[0, 3]) + torch.log(p[1, 2])) / 2
    assert torch.allclose(odits_loss.written_mass_loss(logits, y), want)
    # one word per image: plain cross-entropy, like the seed's loss with unit weights
    one = y.clone()
    one[0, 3] = False
    assert torch.allclose(odits_loss.written_mass_loss(logits, one), odits_loss.class_weighted_loss(logits, one))
    # finite where every written word's probability underflows in float32
    far = torch.full((1, 5), -200.0)
    far[0, 0] = 200.0
    hit = torch.zeros(1, 5, dtype=torch.bool)
    hit[0, 1:3] = True
    big = odits_loss.written_mass_loss(far, hit)
    assert torch.isfinite(big) and big.item() > 399
    zero = odits_loss.written_mass_loss(logits, torch.zeros(3, 5, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match=r"written_mass_loss: logits and targets must both be \(B, n\), got \(3, 5\) and \(3, 4\)"):
        odits_loss.written_mass_loss(logits, y[:, :4])
    with pytest.raises(ValueError, match=r"odits_step_fn: loss must be one of \('written_mass', 'class_weighted'\), got 'uniform'"):
        odits_loss.odits_step_fn(None, "uniform")


def test_word_class_weights_lift_rare_words() -> None:
    t = torch.zeros(10, 4, dtype=torch.bool)
    t[:, 0] = True  # frequent
    t[0, 1] = True  # rare
    w = odits_loss.word_class_weights(t, power=0.5)
    assert w[1] > w[0] and math.isclose(float(w[:2].mean()), 1.0, rel_tol=1e-6)
    assert torch.allclose(odits_loss.word_class_weights(t, power=0.0)[:2], torch.ones(2))


def _train(clip: torch.nn.Module, epochs: int = 3) -> tuple[odits.ODITS, list[float]]:
    from course_utils.train import fit

    feats = objects.ObjectFeatures(**{k: v for k, v in _batch(5, B=8).items() if k != "targets"}, targets=_batch(5, B=8)["targets"],
                            lexicon=torch.ones(8, N_WORDS, dtype=torch.bool), counts=torch.zeros(8))
    m = _model(clip)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    hist = fit(m, odits_loss.odits_step_fn(odits_loss.word_class_weights(feats.targets)), objects.ObjectFeatureDataset(feats), epochs=epochs,
               batch_size=4, optimizer=opt, seed=0, progress=False, grad_clip=1.0)
    return m, hist.train["loss"]


def test_step_fn_trains_with_fit_deterministically(clip: torch.nn.Module) -> None:
    m, losses = _train(clip)
    assert losses[-1] < losses[0]
    m2, losses2 = _train(clip)
    assert losses == losses2
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


# --------------------------------------------------------------------------------------------
# features and evaluation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(clip: torch.nn.Module):
    import open_clip

    from course_utils.clip.loading import ClipBundle, small_clip_preprocess

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    return ClipBundle(clip, small_clip_preprocess, lambda t: tok(list(t)), "small", "weights: random (test)")


def _records() -> list[SimpleNamespace]:
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8))

    def rec(name: str, words: list[tuple[int, int, int, int, str]], lexicon: list[str]) -> SimpleNamespace:
        ws = [SVTWord(x, y, w, h, t, t) for x, y, w, h, t in words]
        return SimpleNamespace(load=lambda: img, words=ws, tags=[w.tag for w in ws], lexicon=lexicon, image_name=name)

    return [rec("a", [(2, 3, 30, 10, "JOINT"), (40, 30, 30, 12, "BAR")], ["JOINT", "BAR", "JOHNS"]),
            rec("b", [], ["CAFE", "BAR"]),  # an image with no words: no objects
            rec("c", [(10, 10, 40, 15, "CAFE")], ["CAFE", "JONES", "JOINT"])]


def test_extract_object_features_and_the_no_object_image(bundle) -> None:
    vocab = ["BAR", "CAFE", "JOHNS", "JOINT", "JONES"]
    f = objects.extract_object_features(bundle, _records(), BoxMaskSource(), vocab)
    assert f.image_emb.shape == (3, D) and f.object_emb.shape == (3, 2, D)
    assert f.valid.tolist() == [[True, True], [False, False], [True, False]] and f.counts.tolist() == [2, 0, 1]
    assert torch.allclose(f.object_emb[f.valid].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.all(f.object_emb[~f.valid] == 0)
    assert f.targets[0].tolist() == [True, False, False, True, False] and f.lexicon[1].sum() == 2
    assert f.object_labels == [["JOINT", "BAR"], [], ["CAFE"]]
    capped = objects.extract_object_features(bundle, _records(), BoxMaskSource(), vocab, max_objects=1)
    assert capped.object_emb.shape == (3, 1, D) and capped.counts.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="vocabulary is empty"):
        objects.extract_object_features(bundle, _records(), BoxMaskSource(), [])

    class HalfSize:  # a mask source that forgot to resize its masks to the image
        name = "half-size source"

        def __call__(self, image, record=None):
            return ObjectMasks(torch.zeros(1, image.height // 2, image.width // 2, dtype=torch.bool), torch.ones(1))

    with pytest.raises(MaskError, match=r"image #0 \(a\) from half-size source: masks are \(30, 40\)"):
        objects.extract_object_features(bundle, _records(), HalfSize(), vocab)

    # every model and baseline gives a probability row for every image, the empty one included
    text = bundle.encode_texts(vocab)
    m = odits.ODITS(bundle.model, heads=4)
    m.set_vocabulary(vocab, text)
    pred = odits.predict(m, f)
    for P in (pred["P"], objects.clip_probabilities(f, text, 100.0), objects.object_max_probabilities(f, text, 100.0)):
        assert P.shape == (3, 5) and torch.allclose(P.sum(1), torch.ones(3), atol=1e-5)
    assert torch.allclose(objects.object_max_probabilities(f, text, 100.0)[1], objects.clip_probabilities(f, text, 100.0)[1])
    tops = objects.top_words_per_object(pred["object_text"][0], f.valid[0], vocab, k=2)
    assert len(tops) == 2 and len(tops[0]) == 2 and tops[0][0][0] in vocab
    assert objects.top_words_per_object(pred["object_text"][1], f.valid[1], vocab) == []


def test_table_2_6_metrics() -> None:
    Y = torch.tensor([[True, True, False, False], [False, False, True, False]])
    lex = torch.tensor([[True, True, True, False], [False, True, True, True]])
    perfect = Y.float() / Y.float().sum(1, keepdim=True)
    m = ws.table_2_6_metrics(perfect, Y, lexicon=lex, approach1=True)
    assert set(m) >= {"accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1", "precision_youden"}
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["lexicon50_top1"] == 1.0
    # only image 0 has two words: the mean entropy is over it alone
    assert math.isclose(m["entropy"], 1.0)
    wrong = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert ws.table_2_6_metrics(wrong, Y, lexicon=lex)["lexicon50_top1"] == 0.0
    # no image with two words: the entropy is undefined (NaN), not 0
    one = torch.tensor([[True, False, False, False], [False, False, True, False]])
    assert math.isnan(ws.table_2_6_metrics(perfect, one)["entropy"])
    # a ranking that breaks the probabilities' tie (both 0) picks the right word
    tied = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    truth = torch.tensor([[False, False, True, False]])
    lex1 = torch.tensor([[False, True, True, False]])
    assert ws.table_2_6_metrics(tied, lex1, lexicon=lex1, truth=truth)["lexicon50_top1"] == 0.0
    cos = torch.tensor([[0.9, 0.1, 0.2, 0.0]])
    assert ws.table_2_6_metrics(tied, lex1, lexicon=lex1, truth=truth, ranking=cos)["lexicon50_top1"] == 1.0
    with pytest.raises(ValueError, match="truth has shape"):
        ws.table_2_6_metrics(perfect, Y, lexicon=lex, truth=truth)


# --------------------------------------------------------------------------------------------
# exercise checks
# --------------------------------------------------------------------------------------------


def test_checks_accept_the_reference_and_fall_back_on_mistakes(capsys: pytest.CaptureFixture[str]) -> None:
    from course_utils import checks
    from course_utils.checks import nb08

    def own(fn):  # the reference as a student's own correct function
        def student(*args, **kwargs):
            return fn(*args, **kwargs)
        return student

    for check, ref in ((nb08.check_similarity_weighted_embeddings, odits.similarity_weighted_embeddings),
                       (nb08.check_object_self_attention, odits.object_self_attention),
                       (nb08.check_init_new_layers, odits.init_new_layers_)):
        answer = own(ref)
        assert check(answer) is answer
    assert all(checks.RESULTS[e].passed for e in nb08.EXERCISES)
    # Handing in the package's own function earns nothing.
    assert nb08.check_object_self_attention(odits.object_self_attention) is odits.object_self_attention
    assert not checks.RESULTS[nb08.EXERCISES[1]].passed

    def no_cosine(em, et, s=100.0):
        P = (s * em @ et.T).softmax(-1)
        return P, P @ et

    assert nb08.check_similarity_weighted_embeddings(no_cosine) is odits.similarity_weighted_embeddings
    assert "not normalised" in capsys.readouterr().out

    def mean_over_padding(es, em, conf, valid, wq, wk, wv):
        a = (es @ wq.T @ (es @ wk.T).transpose(1, 2) / math.sqrt(wq.shape[0])).softmax(-1)
        return (a @ ((conf[..., None] * em) @ wv.T)).mean(1)

    assert nb08.check_object_self_attention(mean_over_padding) is odits.object_self_attention
    assert "invalid objects" in capsys.readouterr().out

    def global_rng(mods, scheme, generator):
        for m in mods:
            for p in m.parameters():
                if p.ndim == 2:
                    torch.nn.init.xavier_uniform_(p)

    assert nb08.check_init_new_layers(global_rng) is odits.init_new_layers_
    assert "global RNG" in capsys.readouterr().out

    def kaiming_always(mods, scheme, generator):
        odits.init_new_layers_(mods, "kaiming", generator)

    assert nb08.check_init_new_layers(kaiming_always) is odits.init_new_layers_
    assert "above the xavier bound" in capsys.readouterr().out

    def todo(*args):
        raise NotImplementedError

    nb08.check_init_new_layers(todo)
    assert "not implemented yet" in capsys.readouterr().out
    assert len(nb08.EXERCISES) == 3


def test_load_clip_weights_reads_fit_checkpoints_and_state_dicts(clip: torch.nn.Module, tmp_path) -> None:
    import copy

    from course_utils.checkpoints import save_checkpoint
    from course_utils.history import History

    tuned = copy.deepcopy(clip)
    with torch.no_grad():
        tuned.logit_scale.fill_(3.0)
    save_checkpoint(tmp_path / "epoch_001.pt", model=tuned, epoch=1, history=History())
    torch.save(tuned.state_dict(), tmp_path / "plain.pt")
    for name in ("epoch_001.pt", "plain.pt"):
        target = loading.load_clip_weights(copy.deepcopy(clip), tmp_path / name)
        assert float(target.logit_scale.detach()) == 3.0
        assert odits.ODITS(target).logit_scale.item() == 3.0  # ODITS starts from the loaded temperature


def test_odits_runs_the_functions_it_is_given(clip: torch.nn.Module) -> None:
    """Notebook 08 plugs the student's three functions into ODITS: they must really be used."""
    calls = {"sim": 0, "att": 0, "init": 0}

    def sim(*a, **k):
        calls["sim"] += 1
        return odits.similarity_weighted_embeddings(*a, **k)

    def att(*a, **k):
        calls["att"] += 1
        return odits.object_self_attention(*a, **k)

    def init(*a, **k):
        calls["init"] += 1
        return odits.init_new_layers_(*a, **k)

    b = _batch()
    plain = _model(clip)
    plugged = _model(clip, similarity_fn=sim, attention_fn=att, init_fn=init)
    assert calls == {"sim": 0, "att": 0, "init": 1}
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), plugged.parameters()))
    out = plugged(b["image_emb"], b["object_emb"], b["conf"], b["valid"])
    assert calls == {"sim": 1, "att": 1, "init": 1}
    torch.testing.assert_close(out["logits"], plain(b["image_emb"], b["object_emb"], b["conf"], b["valid"])["logits"])

    def wrong_attention(es, em, conf, valid, *w):  # ignores the objects: the logits must change
        return torch.zeros(es.shape[0], es.shape[-1])

    broken = _model(clip, attention_fn=wrong_attention)
    assert not torch.allclose(broken(b["image_emb"], b["object_emb"], b["conf"], b["valid"])["logits"], out["logits"])


def test_train_odits_leaves_the_clip_untouched_and_is_reproducible(clip: torch.nn.Module) -> None:
    import copy

    b = _batch(B=6)
    feats = objects.ObjectFeatures(b["image_emb"], b["object_emb"], b["conf"], b["valid"], b["targets"],
                            b["targets"].clone(), b["valid"].sum(1))
    words = [f"W{i}" for i in range(N_WORDS)]
    text = _unit(torch.Generator().manual_seed(99), N_WORDS, D)
    cfg = {"heads": 4, "ff_mult": 2, "init": "xavier", "seed": 3, "freeze_clip": True, "epochs": 3,
           "batch_size": 2, "lr": 1e-3, "weight_decay": 0.01, "class_weight_power": 0.5, "loss": "written_mass", "grad_clip": 1.0}
    before = copy.deepcopy(clip.state_dict())
    m1, h1, info = ro.train_odits(clip, feats, words, text, cfg)
    m2, h2, _ = ro.train_odits(clip, feats, words, text, cfg)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert h1.train["loss"] == h2.train["loss"] and len(h1.train["loss"]) == 3
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert info["trainable_params"] == sum(p.numel() for p in m1.parameters() if p.requires_grad) > 0
    ablation, _, _ = ro.train_odits(clip, feats, words, text, cfg, use_objects=False)
    assert ablation.use_objects is False


def test_load_start_clip_names_a_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ro.load_start_clip("small", "smoke", checkpoint=tmp_path / "nowhere.pt")


# --------------------------------------------------------------------------------------------
# devices: ODITS on the (virtual) GPU, features from the CPU (notebook 08 on Colab)
# --------------------------------------------------------------------------------------------


def test_odits_on_the_gpu_takes_cpu_features_and_gives_the_cpu_numbers(clip: torch.nn.Module) -> None:
    import copy

    from course_utils.device_guard import is_on_virtual_cuda, virtual_cuda

    b = _batch()
    feats = objects.ObjectFeatures(b["image_emb"], b["object_emb"], b["conf"], b["valid"], b["targets"],
                                   b["targets"].clone(), b["valid"].sum(1))
    text = _unit(torch.Generator().manual_seed(99), N_WORDS, D)
    m_cpu = _model(clip)
    with torch.no_grad():
        want = m_cpu(b["image_emb"], b["object_emb"], b["conf"], b["valid"])
    want_pred = odits.predict(m_cpu, feats)
    want_loss = odits_loss.odits_step_fn()(m_cpu, b)["loss"]
    P_want, E_want = odits.similarity_weighted_embeddings(b["object_emb"], text, 50.0)
    with virtual_cuda() as dev:
        m = odits.ODITS(copy.deepcopy(clip).to(dev), heads=4, seed=0)  # built on a CLIP on the GPU
        assert all(is_on_virtual_cuda(t) for t in [*m.parameters(), *m.buffers()])  # new layers too
        m.set_vocabulary([f"W{i}" for i in range(N_WORDS)], text)  # CPU embeddings
        with torch.no_grad():
            out = m(b["image_emb"], b["object_emb"], b["conf"], b["valid"])  # CPU inputs (notebook 08, §9)
        # the guard computes on the CPU, but with its mode on eval-mode attention skips PyTorch's
        # fused kernel: the same numbers up to float rounding
        assert is_on_virtual_cuda(out["logits"])
        torch.testing.assert_close(out["logits"].cpu(), want["logits"])
        pred = odits.predict(m, feats)
        assert not is_on_virtual_cuda(pred["P"])
        torch.testing.assert_close(pred["P"], want_pred["P"])
        loss = odits_loss.odits_step_fn()(m, b)["loss"]  # a batch taken from the dataset by hand
        torch.testing.assert_close(loss.cpu(), want_loss.detach())
        P, E_S = odits.similarity_weighted_embeddings(b["object_emb"], text.to(dev), torch.tensor(50.0))
        assert is_on_virtual_cuda(P) and torch.equal(P.cpu(), P_want) and torch.equal(E_S.cpu(), E_want)
        for base in (objects.clip_probabilities, objects.object_max_probabilities):
            assert torch.equal(base(feats, text.to(dev), 100.0).cpu(), base(feats, text, 100.0))
        e_x, e_m = m.embed(torch.zeros(2, 3, 32, 128), torch.zeros(2, 1, 3, 32, 128))  # pixels from the CPU
        assert is_on_virtual_cuda(e_x) and e_m.shape == (2, 1, D)
        tops = objects.top_words_per_object(pred["object_text"][0].to(dev), feats.valid[0], m.vocabulary, k=2)
        assert tops == objects.top_words_per_object(want_pred["object_text"][0], feats.valid[0], m.vocabulary, k=2)


def test_object_features_with_a_clip_on_the_gpu(bundle) -> None:
    from course_utils.device_guard import is_on_virtual_cuda, virtual_cuda

    vocab = ["BAR", "CAFE", "JOHNS", "JOINT", "JONES"]
    want = objects.extract_object_features(bundle, _records(), BoxMaskSource(), vocab)
    with virtual_cuda() as dev:
        gpu = loading.ClipBundle(bundle.model.to(dev), bundle.preprocess, bundle.tokenizer, "small", "test")
        try:
            f = objects.extract_object_features(gpu, _records(), BoxMaskSource(), vocab)
            # a detector's boxes on the GPU become CPU masks
            on_gpu = BoxMaskSource()(Image.new("RGB", (20, 10)), boxes=torch.tensor([[1.0, 1, 8, 6]]).to(dev),
                                     scores=torch.tensor([0.5]).to(dev))
        finally:
            bundle.model.cpu()  # the module-scoped CLIP goes back for the other tests
    assert not any(is_on_virtual_cuda(t) for t in (f.image_emb, f.object_emb, f.conf, f.valid))
    for k in ("image_emb", "object_emb", "conf", "valid", "targets", "lexicon", "counts"):
        torch.testing.assert_close(getattr(f, k), getattr(want, k), msg=k)
    assert on_gpu.masks.device.type == "cpu" and int(on_gpu.masks.sum()) == 35 and on_gpu.boxes.tolist() == [[1, 1, 8, 6]]


def test_finetune_start_clip_leaves_no_temporary_folder(tmp_path, monkeypatch) -> None:
    """The run's checkpoints (8 ViT-B/32 files in ``full``) go to a temporary folder that is
    removed once the chosen weights are in the model, also when fine-tuning fails."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list = []

    def fake_finetune_and_select(bundle, train, test, svt_cfg, ckpt_dir, **kw):
        seen.append(ckpt_dir)
        for e in (1, 2):  # what fit would leave there
            (ckpt_dir / f"epoch_{e:03d}.pt").write_bytes(b"x" * 100)
        if svt_cfg.get("fail"):
            raise RuntimeError("fine-tuning stopped")
        return SimpleNamespace(best={"epoch": 2, "precision": 0.5}, zero_shot={"precision": 0.25},
                               ev=SimpleNamespace(unit="crop"))

    monkeypatch.setattr(ro, "finetune_and_select", fake_finetune_and_select)
    b = SimpleNamespace(weights="weights: test", info={})
    line = ro.finetune_start_clip(b, None, None, {"seed": 0, "ft_epochs": 2})
    assert "checkpoint +2 of 2" in line and b.info["finetuned"] and b.weights.endswith(line)
    assert seen[0].parent == tmp_path and not seen[0].exists()
    with pytest.raises(RuntimeError, match="stopped"):
        ro.finetune_start_clip(b, None, None, {"seed": 0, "ft_epochs": 2, "fail": True})
    assert not seen[1].exists()
    assert list(tmp_path.iterdir()) == []
