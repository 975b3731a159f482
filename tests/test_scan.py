"""SCAN (notebook 04): attention, pooling, vectorised vs loop scores, loss, R@K, encoders, and the
retrieval recipes around it (backbone, region features and their cache, training)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from course_utils.cache import run_dir
from course_utils.captions import CaptionVocabulary, build_captioned
from course_utils.profiles import get_config
from course_utils.recipes.retrieval import (
    build_features,
    extract_region_features,
    feature_knobs,
    scan_grid_knobs,
    train_backbone,
    train_scan,
)
from course_utils.scan import (
    SCAN,
    CaptionEncoder,
    ImageEncoder,
    ScanConfig,
    attend,
    clipped_l2norm,
    evaluate_retrieval,
    hardest_negative_triplet_loss,
    l2norm,
    length_mask,
    pool_avg,
    pool_lse,
    recall_at_k,
    scan_similarity,
    scan_similarity_loop,
    scan_step_fn,
)

VARIANTS = [ScanConfig(d, a, 4.0 if d == "i2t" else 9.0, 6.0) for d in ("t2i", "i2t") for a in ("lse", "avg")]


def _inputs(n_img=12, n_cap=15, k=6, n=9, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = l2norm(torch.randn(n_img, k, d, generator=g))
    lengths = torch.randint(2, n + 1, (n_cap,), generator=g)
    lengths[0] = n
    cap = l2norm(torch.randn(n_cap, n, d, generator=g)) * length_mask(lengths, n)[..., None]
    return img, cap, lengths


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.direction}-{c.agg}")
def test_vectorised_scores_equal_the_loop(cfg):
    img, cap, lengths = _inputs()
    fast = scan_similarity(img, cap, lengths, cfg, shard=(5, 7))  # shards that do not divide evenly
    slow = scan_similarity_loop(img, cap, lengths, cfg)
    assert fast.shape == (12, 15)
    assert (fast - slow).abs().max() <= 1e-5


def test_vectorised_is_at_least_5x_faster_than_the_loop():
    """One thread (as ``make test`` runs), best of three calls each, after a warm-up.

    The bar was 20x on the machine these tests were first written on.  On today's 2-core machine
    this variant (i-t AVG, the slowest to vectorise: norms over the 8 regions of an
    ``(I, C, k, n)`` block and softmaxes over rows of 12 words dominate) measures 11-13x
    single-threaded when idle (t-i variants more); 5x leaves room for the second test worker on
    the other core, while a Python loop creeping back into the vectorised path would drop it to ~1x.
    """
    img, cap, lengths = _inputs(n_img=40, n_cap=40, k=8, n=12, d=64)
    cfg = VARIANTS[3]

    def best(fn, n=3):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, min(times)

    scan_similarity(img, cap, lengths, cfg)  # warm-up
    fast, t_fast = best(lambda: scan_similarity(img, cap, lengths, cfg))
    slow, t_slow = best(lambda: scan_similarity_loop(img, cap, lengths, cfg), n=1)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert t_slow / t_fast >= 5, f"only {t_slow / t_fast:.1f}x"


def test_attend_matches_the_equations_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    q, c = l2norm(torch.randn(3, 8, generator=g)), l2norm(torch.randn(5, 8, generator=g))
    s = q @ c.T
    sb = F.leaky_relu(s, 0.1)
    sb = sb / (sb.pow(2).sum(0, keepdim=True).sqrt() + 1e-8)
    expected = torch.softmax(4.0 * sb, dim=1) @ c
    assert torch.allclose(attend(q, c, 4.0), expected, atol=1e-6)
    # A padded context entry must get no weight, whatever its value.
    padded = torch.cat([c, torch.full((2, 8), 9.0)])
    mask = torch.tensor([True] * 5 + [False] * 2)
    assert torch.allclose(attend(q, padded, 4.0, mask), expected, atol=1e-6)
    # Larger lambda -> sharper attention -> closer to the single best context entry.
    sharp = attend(q, c, 200.0)
    assert torch.allclose(sharp, c[sb.argmax(1)], atol=1e-3)


def test_clipped_l2norm_clips_then_normalises_over_the_query_axis():
    s = torch.tensor([[3.0, -1.0], [4.0, 2.0]])
    out = clipped_l2norm(s, dim=0, negative_slope=0.0)
    assert torch.allclose(out, torch.tensor([[0.6, 0.0], [0.8, 1.0]]), atol=1e-6)


def test_pooling():
    r = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.2, 0.2]])
    assert torch.allclose(pool_avg(r), torch.tensor([0.5, 0.2]))
    assert torch.allclose(pool_lse(r, 6.0), torch.logsumexp(6 * r, 1) / 6)
    # LSE tends to max as lambda grows, and ignores masked entries.
    assert torch.allclose(pool_lse(r, 1000.0), r.max(1).values, atol=1e-2)
    m = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.allclose(pool_avg(r, m), torch.tensor([0.3, 0.2]))
    assert torch.allclose(pool_lse(r, 6.0, m)[0], torch.logsumexp(6 * r[0, :2], 0) / 6)


def test_hardest_negative_loss_by_hand():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.0, 0.1, 0.7]])
    # Pair 0: hardest caption 0.8 -> 0.2-0.9+0.8=0.1; hardest image for cap 0 is 0.2 -> 0.
    # Pair 1: caption 0.6 -> 0.3; image 0.8 -> 0.5.   Pair 2: caption 0.1 -> 0; image 0.6 -> 0.1.
    expected = (0.1 + 0.0 + 0.3 + 0.5 + 0.0 + 0.1) / 3
    assert torch.isclose(hardest_negative_triplet_loss(s, 0.2), torch.tensor(expected))
    summed = hardest_negative_triplet_loss(s, 0.2, max_violation=False)
    assert summed >= hardest_negative_triplet_loss(s, 0.2)
    # Two captions of the same image are not each other's negatives.
    ids = torch.tensor([0, 0, 1])
    got = hardest_negative_triplet_loss(s, 0.2, img_ids=ids)
    assert torch.isclose(got, torch.tensor((0.0 + 0.3 + 0.0 + 0.0 + 0.0 + 0.1) / 3))
    with pytest.raises(ValueError, match="square"):
        hardest_negative_triplet_loss(torch.zeros(2, 3))


def test_recall_at_k_counts_any_of_five_captions():
    cap_to_img = torch.arange(3).repeat_interleave(2)           # 3 images x 2 captions
    sims = torch.tensor([[9, 0, 5, 0, 0, 0],                     # image 0: its caption 0 is top
                         [8, 1, 0, 7, 2, 0],                     # image 1: caption 3 ranks 2nd
                         [0, 0, 0, 0, 0, 0.]])                   # image 2: all tied -> no credit
    r = recall_at_k(sims, cap_to_img, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r2"] == pytest.approx(200 / 3)
    # t2i (captions 0,1 of image 0; 2,3 of image 1; 4,5 of image 2): c0 hit, c1 miss (img1
    # scores 1), c2 miss, c3 hit, c4 miss, c5 all tied -> miss.
    assert r["t2i_r1"] == pytest.approx(200 / 6)
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))
    perfect = recall_at_k(torch.eye(3).repeat_interleave(5, dim=1), torch.arange(3).repeat_interleave(5))
    assert perfect["rsum"] == pytest.approx(600.0)


def test_encoders_shapes_norms_and_bad_input():
    enc = CaptionEncoder(20, 8, 16, bidirectional=True)
    tok = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    out = enc(tok, torch.tensor([3, 2]))
    assert out.shape == (2, 4, 16)
    assert torch.allclose(out[0, :3].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out[1, 2:].abs().max() == 0  # padding stays zero
    # The backward direction must not read the padding: same caption, padded more, same output.
    out2 = enc(torch.tensor([[6, 7, 0, 0, 0, 0]]), torch.tensor([2]))
    assert torch.allclose(out2[0, :2], out[1, :2], atol=1e-6)
    uni = CaptionEncoder(20, 8, 16, bidirectional=False)
    assert uni(tok, torch.tensor([3, 2])).shape == (2, 4, 16)
    with pytest.raises(ValueError, match="caption 1 is empty"):
        enc(tok, torch.tensor([3, 0]))
    img = ImageEncoder(10, 16)
    assert img(torch.randn(2, 5, 10)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="zero regions"):
        img(torch.randn(2, 0, 10))
    with pytest.raises(ValueError, match="zero regions"):
        scan_similarity(torch.randn(2, 0, 4), torch.randn(3, 2, 4), torch.tensor([2, 2, 2]), VARIANTS[0])


def test_features_training_and_retrieval_end_to_end(tmp_path):
    """Smoke-size pipeline: backbone, region features, one SCAN variant, R@K."""
    cfg = get_config("smoke").retrieval
    splits = build_captioned(cfg, seed=0)
    bb, stats = train_backbone(splits["train"], 8, 2, 1, seed=0)
    assert stats["loss"] > 0
    feats = extract_region_features(bb, splits["test"], k=4, pool=2)
    n = len(splits["test"])
    assert feats["fine"].shape == (n, 4, 16 * 4) and feats["coarse"].shape == (n, 1, 16 * 4)
    # The first boxes are the objects' own boxes.
    assert torch.equal(feats["boxes"][0, :1], splits["test"].boxes(0)[:1])
    vocab = CaptionVocabulary()
    tok, ln = vocab.batch(splits["test"].texts)
    torch.manual_seed(0)
    model = SCAN(64, len(vocab), 8, 16, VARIANTS[3])
    hist = train_scan(model, feats["fine"], tok, ln, splits["test"].cap_to_img, epochs=2,
                      batch_size=16, lr=1e-3, warmup_epochs=1, progress=False)
    assert len(hist) == 2
    r, sims = evaluate_retrieval(model, feats["fine"], tok, ln, splits["test"].cap_to_img, (7, 30))
    assert sims.shape == (n, 5 * n) and 0 <= r["t2i_r1"] <= 100


def test_warmup_switch_follows_the_optimizer_step_so_resume_is_exact():
    """After a resume the step counter comes from Adam's restored state, not from zero."""
    torch.manual_seed(0)
    model = SCAN(8, 20, 4, 8, VARIANTS[3])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    batch = (torch.randn(4, 3, 8), torch.randint(2, 20, (4, 5)), torch.tensor([5, 4, 3, 5]), torch.arange(4))
    fn = scan_step_fn(0.2, warmup_steps=1, optimizer=opt)
    warm = fn(model, batch)["loss"]                     # step 0: sum over negatives
    warm.backward()
    opt.step()                                           # Adam's state now says step 1
    fresh_fn = scan_step_fn(0.2, warmup_steps=1, optimizer=opt)  # as after a resume
    scores = model(*batch[:3]).detach()
    hard = hardest_negative_triplet_loss(scores, 0.2, img_ids=batch[3])
    assert torch.isclose(fresh_fn(model, batch)["loss"], hard, atol=1e-6)


def test_features_are_cached_in_one_run_folder_named_by_their_knobs(tmp_path, monkeypatch, capsys):
    """The notebook and the benchmark pool the features once: a second call loads them."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    cfg = dict(get_config("smoke").retrieval)
    splits = build_captioned(cfg, seed=0)
    feats, _, stats = build_features(splits, cfg, seed=0, progress=False)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].startswith("04_region_features_")
    again, backbone, stats2 = build_features(splits, cfg, seed=0)
    assert "loaded from cache" in capsys.readouterr().out
    assert stats2 == stats and not backbone.training
    for split in feats:
        for level in ("fine", "coarse", "boxes"):
            assert torch.equal(again[split][level], feats[split][level])
    # Another seed or another pooling knob never reads these features.
    assert feature_knobs(cfg, 1) != feature_knobs(cfg, 0)
    assert feature_knobs(dict(cfg, k_fine=5), 0) != feature_knobs(cfg, 0)
    # The grid's checkpoints depend on the features too, and on every training knob.
    grid = run_dir("04_scan_grid", scan_grid_knobs(cfg, 0))
    assert grid.parent == tmp_path / "runs" and grid.name.startswith("04_scan_grid_")
    assert run_dir("04_scan_grid", scan_grid_knobs(cfg, 1)) != grid
    for knob, value in (("lr", 0.5), ("warmup_epochs", 3), ("k_fine", 5)):
        assert run_dir("04_scan_grid", scan_grid_knobs(dict(cfg, **{knob: value}), 0)) != grid, knob
