"""Query-agnostic retrieval (notebook 05), matchmaps (notebook 04) and the nb04/nb05 checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_utils.cache import run_dir
from course_utils.captions import CaptionedSplit, CaptionVocabulary, build_captioned, make_scene
from course_utils.checks import nb04, nb05
from course_utils.matchmap import (
    MatchmapModel,
    impostor_ranking_loss,
    matchmap,
    matchmap_score,
    phrase_spans,
    pointing_game,
)
from course_utils.profiles import get_config
from course_utils.query_agnostic import (
    ConvCaptionEncoder,
    DecoderBlock,
    QueryAgnostic,
    contrastive_loss,
    encode_gallery,
    encode_queries,
    keep_regions,
    mean_words,
    score_all,
)
from course_utils.recipes.qa_ablation import qa_ablation_rows
from course_utils.recipes.retrieval import (
    RetrievalData,
    query_agnostic_knobs,
    train_matchmap,
    train_query_agnostic,
    variant_config,
)
from course_utils.recipes.speed_race import speed_by_gallery_size, speed_table
from course_utils.scan import (
    SCAN,
    Backbone,
    CaptionEncoder,
    attend,
    l2norm,
    length_mask,
    recall_at_k,
)


def test_keep_regions_area_threshold():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 3.0, 3.0], [4.0, 4.0, 4.0, 20.0]])
    assert keep_regions(boxes, 100, 0.005).tolist() == [True, False, False]
    assert keep_regions(boxes, 100, 0.0).tolist() == [True, True, False]
    assert keep_regions(boxes[None].repeat(2, 1, 1), torch.tensor([[100.0, 100.0], [10.0, 10.0]]), 0.05).tolist() == [
        [False, False, False], [True, True, False]]
    with pytest.raises(ValueError, match="last dimension 4"):
        keep_regions(torch.zeros(3, 5), 10, 0.1)


def _mhsa_by_hand(attn: torch.nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of one query ``q (d,)`` over ``kv (k, d)`` from the layer's weights."""
    d, h = q.shape[0], attn.num_heads
    wq, wk, wv = attn.in_proj_weight.split(d)
    bq, bk, bv = attn.in_proj_bias.split(d)
    Q, K, V = (wq @ q + bq).view(h, -1), (kv @ wk.T + bk).view(-1, h, d // h), (kv @ wv.T + bv).view(-1, h, d // h)
    logits = torch.einsum("hc,khc->hk", Q, K) / (d // h) ** 0.5
    w = logits.masked_fill(~keep[None, :], float("-inf")).softmax(-1)
    out = torch.einsum("hk,khc->hc", w, V).reshape(d)
    return attn.out_proj.weight @ out + attn.out_proj.bias


def _ffn_by_hand(ffn: torch.nn.Sequential, y: torch.Tensor) -> torch.Tensor:
    """The poster's FFN(Y) = W2 GELU(W1 Y + b1) + b2 from the two Linear layers' weights."""
    l1, l2 = [m for m in ffn if isinstance(m, torch.nn.Linear)]
    return l2.weight @ torch.nn.functional.gelu(l1.weight @ y + l1.bias) + l2.bias


def test_decoder_block_follows_the_equations():
    torch.manual_seed(0)
    blk = DecoderBlock(8, 2).eval()
    # the poster's block: no LayerNorm inside the FFN
    assert [type(m).__name__ for m in blk.ffn] == ["Linear", "GELU", "Linear"]
    img, reg = torch.randn(3, 8), torch.randn(3, 4, 8)
    keep = torch.tensor([[True, True, False, True], [True] * 4, [False] * 4])
    with torch.no_grad():
        out = blk(img, reg, keep)
        assert out.shape == (3, 8)

        def ln(x, layer):  # LN written out: (x - mean) / sqrt(var + eps) * gamma + beta
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + layer.eps) \
                * layer.weight + layer.bias

        # q = LN(I), k = v = LN(X), Y = I + MHSA(q, k, v), Y_hat = Y + FFN(Y), every term by hand
        for b in (0, 1):
            y = img[b] + _mhsa_by_hand(blk.attn, ln(img[b], blk.ln_q), ln(reg[b], blk.ln_kv), keep[b])
            assert torch.allclose(out[b], y + _ffn_by_hand(blk.ffn, y), atol=1e-5), b
        # No region kept: no NaN, and Y = I.
        assert torch.allclose(out[2], img[2] + _ffn_by_hand(blk.ffn, img[2]), atol=1e-5)
        assert torch.isfinite(out).all()
        # Skipped regions have no influence, whatever their features.
        reg2 = reg.clone()
        reg2[0, 2] = 100.0
        assert torch.allclose(blk(img, reg2, keep)[0], out[0], atol=1e-5)

        # the ablation's pre-norm FFN: Y_hat = Y + FFN(LN(Y))
        pre = DecoderBlock(8, 2, ffn_norm=True).eval()
        assert [type(m).__name__ for m in pre.ffn] == ["LayerNorm", "Linear", "GELU", "Linear"]
        y = img[1] + _mhsa_by_hand(pre.attn, ln(img[1], pre.ln_q), ln(reg[1], pre.ln_kv), keep[1])
        assert torch.allclose(pre(img, reg, keep)[1], y + _ffn_by_hand(pre.ffn, ln(y, pre.ffn[0])), atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by heads"):
        DecoderBlock(10, 4)


def test_query_agnostic_stacks_decoder_blocks():
    torch.manual_seed(0)
    model = QueryAgnostic(6, 20, 4, 8, 2, layers=2).eval()
    assert len(model.blocks) == 2
    g, r, keep = torch.randn(3, 6), torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool)
    with torch.no_grad():
        x = model.region_proj(r)
        y = model.blocks[1](model.blocks[0](model.global_proj(g), x, keep), x, keep)
        assert torch.allclose(model.encode_image(g, r, keep), l2norm(y), atol=1e-6)
    with pytest.raises(ValueError, match="layers must be >= 1"):
        QueryAgnostic(6, 20, 4, 8, 2, layers=0)


def test_contrastive_loss_prefers_aligned_pairs():
    e = torch.eye(4)
    good = contrastive_loss(e, e, 0.05)
    bad = contrastive_loss(e, e[[1, 0, 3, 2]], 0.05)
    assert good < 0.01 < bad
    # Two captions of one image are not negatives of each other.
    ids = torch.tensor([0, 0, 1, 2])
    same = torch.stack([e[0], e[0], e[2], e[3]])
    assert contrastive_loss(same, same, 0.05, ids) < contrastive_loss(same, same, 0.05)


def test_query_agnostic_scores_equal_pairwise_dot_products_and_train():
    cfg = get_config("smoke").retrieval
    sp = build_captioned(cfg)["train"]
    vocab = CaptionVocabulary()
    tok, ln = vocab.batch(sp.texts)
    n, k, f = len(sp), 4, 12
    torch.manual_seed(0)
    glob, reg = torch.randn(n, f), torch.randn(n, k, f)
    keep = torch.rand(n, k) > 0.3
    keep[0] = False  # an image whose regions were all skipped still gets an embedding
    model = QueryAgnostic(f, len(vocab), 8, 16, 2)
    hist = train_query_agnostic(model, glob, reg, keep, tok, ln, sp.cap_to_img, epochs=1, batch_size=16,
                                lr=1e-3, progress=False)
    assert len(hist) == 1
    g = encode_gallery(model, glob, reg, keep, batch_size=7)
    q = encode_queries(model, tok, ln, batch_size=33)
    assert g.shape == (n, 16) and q.shape == (5 * n, 16) and torch.isfinite(g).all()
    sims = score_all(g, q)
    assert torch.allclose(sims[3, 7], (g[3] * q[7]).sum(), atol=1e-6)
    assert 0 <= recall_at_k(sims, sp.cap_to_img)["rsum"] <= 600
    with pytest.raises(ValueError, match=r"regions \(B, k, F\)"):
        model.encode_image(glob, reg[:, 0], keep)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_caption_vector_is_the_masked_mean_of_the_padded_words(bidirectional):
    """Pooling on the packed words equals the plain masked mean over SCAN's padded (B, L, d) words."""
    torch.manual_seed(0)
    enc = CaptionEncoder(20, 6, 8, bidirectional=bidirectional)
    lengths = torch.tensor([3, 7, 1, 7, 5, 2])
    tokens = torch.randint(1, 20, (6, 9)) * length_mask(lengths, 9)
    words = enc(tokens, lengths)                                           # (B, L, d), zero at padding
    m = length_mask(lengths, 9).float()[..., None]
    expected = (words * m).sum(1) / lengths[:, None]
    got = mean_words(enc.packed_words(tokens, lengths))
    assert got.shape == (6, 8)
    assert torch.allclose(got, expected, atol=1e-6)
    # Gradients reach the encoder the same way.
    g1 = torch.autograd.grad(l2norm(got).sum(), enc.gru.weight_hh_l0)[0]
    g2 = torch.autograd.grad(l2norm(expected).sum(), enc.gru.weight_hh_l0)[0]
    assert torch.allclose(g1, g2, atol=1e-5)
    # Captions already sorted by length give the same vectors.
    order = lengths.argsort(descending=True)
    got_sorted = mean_words(enc.packed_words(tokens[order], lengths[order]))
    assert torch.allclose(got_sorted, expected[order], atol=1e-6)
    with pytest.raises(ValueError, match="caption 2 is empty"):
        enc.packed_words(tokens, torch.tensor([3, 7, 0, 7, 5, 2]))


def test_conv_caption_tower_follows_its_definition():
    """Each word: ReLU(b + sum_o W[:, :, o] e_(t+o-1)) over its real neighbours, l2-normalised; the
    caption: the mean over its real words.  Computed here word by word from the layer's weights."""
    torch.manual_seed(0)
    enc = ConvCaptionEncoder(20, 6, 8, width=3)
    lengths = torch.tensor([3, 7, 1, 5])
    tokens = torch.randint(1, 20, (4, 7))
    got = enc(tokens, lengths)
    W, b, E = enc.conv.weight, enc.conv.bias, enc.embed.weight
    for i, n in enumerate(lengths.tolist()):
        feats = []
        for t in range(n):
            h = b.clone()
            for o in range(3):
                j = t + o - 1
                if 0 <= j < n:  # a neighbour outside the caption (padding or the edge) adds nothing
                    h = h + W[:, :, o] @ E[tokens[i, j]]
            feats.append(torch.nn.functional.normalize(torch.relu(h), dim=0))
        assert torch.allclose(got[i], torch.stack(feats).mean(0), atol=1e-6), i
    # padding with other (non-zero) token ids, and a longer batch, change nothing
    longer = torch.cat([tokens, torch.randint(1, 20, (4, 5))], dim=1)
    assert torch.allclose(enc(longer, lengths), got, atol=1e-6)
    with pytest.raises(ValueError, match="caption 2 is empty"):
        enc(tokens, torch.tensor([3, 7, 0, 5]))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, L\)"):
        enc(tokens[0], lengths)
    with pytest.raises(ValueError, match="width must be odd"):
        ConvCaptionEncoder(20, 6, 8, width=2)


@pytest.mark.parametrize("tower", ["conv", "bigru"])
def test_query_agnostic_text_towers(tower):
    torch.manual_seed(0)
    model = QueryAgnostic(6, 20, 4, 8, 2, text_tower=tower)
    lengths = torch.tensor([3, 5, 1])
    tokens = torch.randint(1, 20, (3, 5))
    got = model.encode_text(tokens, lengths)
    want = (model.txt(tokens, lengths) if tower == "conv"
            else mean_words(model.txt.packed_words(tokens, lengths)))
    assert isinstance(model.txt, ConvCaptionEncoder if tower == "conv" else CaptionEncoder)
    assert torch.allclose(got, l2norm(want), atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-6)
    with pytest.raises(ValueError, match="text_tower='lstm', expected one of"):
        QueryAgnostic(6, 20, 4, 8, 2, text_tower="lstm")


def _race_models(cfg):
    splits = build_captioned(cfg)
    n_feat, k = 12, int(cfg["k_fine"])
    g = torch.Generator().manual_seed(0)
    feats = {name: {"fine": torch.randn(len(sp), k, n_feat, generator=g),
                    "coarse": torch.randn(len(sp), 1, n_feat, generator=g),
                    "boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(len(sp), k, 1)}
             for name, sp in splits.items()}
    data = RetrievalData.build(splits, feats)
    torch.manual_seed(0)
    scan = SCAN(n_feat, len(data.vocab), 8, 16, variant_config("i2t", "lse", cfg))
    qa = QueryAgnostic(n_feat, len(data.vocab), 8, 16, 2)
    return data, scan, qa


def test_speed_table_times_both_models_the_same_way():
    cfg = get_config("smoke").retrieval
    data, scan, qa = _race_models(cfg)
    out = speed_table(scan, qa, data, cfg, repeats=3)
    n_img, n_cap = len(data.feats["test"]["fine"]), len(data.texts["test"]["coarse"][0])
    assert (out["n_images"], out["n_captions"], out["repeats"]) == (n_img, n_cap, 3)
    assert len(out["ratio_rounds"]) == 3
    secs = [v for k, v in out.items() if k.endswith("_s")]
    assert len(secs) == 7 and all(v > 0 for v in secs)
    assert out["ratio"] == pytest.approx(out["scan_s"] / out["query_agnostic_s"])
    assert out["scoring_ratio"] == pytest.approx(out["scan_scoring_s"] / out["qa_matrix_product_s"])
    assert out["scan_encode_s"] < out["scan_s"]


def test_speed_by_gallery_size_tiles_the_test_images():
    cfg = get_config("smoke").retrieval
    data, scan, qa = _race_models(cfg)
    n_img = len(data.feats["test"]["fine"])
    rows = speed_by_gallery_size(scan, qa, data, cfg, sizes=(n_img // 2, 3 * n_img))
    assert [r["n_images"] for r in rows] == [n_img // 2, 3 * n_img]
    assert all(r["ratio"] == pytest.approx(r["scan_s"] / r["query_agnostic_s"]) for r in rows)


def test_matchmap_scores_by_hand():
    mm = torch.zeros(1, 2, 2, 2)
    mm[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mm[0, 1] = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(matchmap_score(mm, "sisa"), torch.tensor([(0.25 + 0.75) / 2]))
    assert torch.allclose(matchmap_score(mm, "misa"), torch.tensor([2.0]))
    assert torch.allclose(matchmap_score(mm, "sima"), torch.tensor([1.0]))  # cells: 1, 0, 0, 3
    m = torch.tensor([[True, False]])
    assert torch.allclose(matchmap_score(mm, "misa", m), torch.tensor([1.0]))
    assert torch.allclose(matchmap_score(mm, "sima", m), torch.tensor([0.25]))
    assert matchmap(torch.ones(4, 3, 5), torch.ones(2, 4)).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="agg must be"):
        matchmap_score(mm, "mean")


def test_phrase_spans():
    assert phrase_spans("a big x left of a y and a big x", ["a big x", "a y", "a big x"]) == [(0, 3), (5, 7), (8, 11)]
    with pytest.raises(ValueError, match="not found"):
        phrase_spans("a red circle", ["a blue square"])


def test_matchmap_training_and_pointing_game():
    cfg = get_config("smoke").retrieval
    sp = build_captioned(cfg)["train"]
    vocab = CaptionVocabulary()
    torch.manual_seed(0)
    model = MatchmapModel(Backbone(4), len(vocab), 8, 8)
    before = [p.clone() for p in model.backbone.parameters()]
    losses = train_matchmap(model, sp, vocab, epochs=1, batch_size=8)
    assert len(losses) == 1 and losses[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))  # frozen
    pg = pointing_game(model, sp, vocab, max_captions=10)
    assert pg["n"] > 0 and 0 <= pg["accuracy"] <= 100 and 0 < pg["chance"] < 100
    cells, words = torch.randn(4, 8, 3, 3), torch.randn(4, 5, 8)
    loss = impostor_ranking_loss(cells, words, torch.tensor([5, 3, 4, 2]), "misa",
                                 generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss >= 0
    with pytest.raises(ValueError, match="at least 2"):
        impostor_ranking_loss(cells[:1], words[:1], torch.tensor([5]), "misa")


def test_checks_accept_the_reference_and_reject_a_wrong_function(capsys):
    from course_utils import matchmap as mm_ref
    from course_utils import query_agnostic, scan

    assert nb04.check_attend(scan.attend) is scan.attend
    assert nb04.check_matchmap_score(mm_ref.matchmap_score) is mm_ref.matchmap_score
    assert nb05.check_decoder_block(query_agnostic.decoder_block) is query_agnostic.decoder_block
    assert nb05.check_keep_regions(query_agnostic.keep_regions) is query_agnostic.keep_regions

    def no_clip(q, c, lam, context_mask=None):
        return torch.softmax(lam * (q @ c.T), dim=1) @ c

    assert nb04.check_attend(no_clip) is attend
    out = capsys.readouterr().out
    assert "4.1 attend" in out and "values differ" in out

    def not_done(*a, **k):
        raise NotImplementedError

    assert nb05.check_contrastive_loss(not_done) is query_agnostic.contrastive_loss
    assert "not implemented yet" in capsys.readouterr().out
    lse, avg = nb04.check_pooling(scan.pool_lse, lambda r, mask=None: r.sum(-1))
    assert lse is scan.pool_lse and avg is scan.pool_avg
    assert nb04.check_triplet_loss(scan.hardest_negative_triplet_loss) is scan.hardest_negative_triplet_loss
    assert nb04.check_recall_at_k(scan.recall_at_k) is scan.recall_at_k
    assert nb05.check_contrastive_loss(query_agnostic.contrastive_loss) is query_agnostic.contrastive_loss


def test_contrastive_matchmap_loss_matches_its_definition():
    from course_utils.matchmap import batch_scores, contrastive_matchmap_loss, pair_scores

    g = torch.Generator().manual_seed(1)
    cells, words = torch.randn(3, 8, 2, 2, generator=g), torch.randn(3, 4, 8, generator=g)
    lengths = torch.tensor([4, 2, 3])
    for agg in ("sisa", "misa", "sima"):
        S = batch_scores(cells, words, lengths, agg)
        assert S.shape == (3, 3)
        torch.testing.assert_close(S.diag(), pair_scores(cells, words, lengths, agg))
        # entry (i, c): image i against caption c, by hand
        torch.testing.assert_close(S[2, 0], pair_scores(cells[2:3], words[0:1], lengths[0:1], agg)[0])
        logits = S / 0.1
        want = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(3))
                      + torch.nn.functional.cross_entropy(logits.T, torch.arange(3)))
        torch.testing.assert_close(contrastive_matchmap_loss(cells, words, lengths, agg, 0.1), want)
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_matchmap_loss(cells[:1], words[:1], lengths[:1], "misa")


def test_ranking_loss_keeps_the_hardest_sampled_impostor():
    g = torch.Generator().manual_seed(2)
    cells, words, lengths = torch.randn(4, 8, 3, 3, generator=g), torch.randn(4, 5, 8, generator=g), torch.tensor([5, 3, 4, 2])
    one = impostor_ranking_loss(cells, words, lengths, "misa", generator=torch.Generator().manual_seed(0))
    many = impostor_ranking_loss(cells, words, lengths, "misa", generator=torch.Generator().manual_seed(0), impostors=6)
    assert many >= one - 1e-6  # the max over draws that include the first draw
    with pytest.raises(ValueError, match="at least one impostor"):
        impostor_ranking_loss(cells, words, lengths, "misa", impostors=0)


def test_train_matchmap_with_either_loss():
    cfg = get_config("smoke").retrieval
    sp = build_captioned(cfg)["train"]
    vocab = CaptionVocabulary()
    for kind in ("contrastive", "ranking"):
        torch.manual_seed(0)
        model = MatchmapModel(Backbone(4), len(vocab), 8, 8)
        losses = train_matchmap(model, sp, vocab, epochs=1, batch_size=8, loss=kind)
        assert len(losses) == 1 and losses[0] > 0
        cells = model.cells(torch.rand(1, 3, 16, 16))
        torch.testing.assert_close(cells.norm(dim=1), torch.ones(1, *cells.shape[2:]))  # cosine matchmaps
    with pytest.raises(ValueError, match="ranking"):
        train_matchmap(model, sp, vocab, epochs=1, loss="hinge")


def test_train_matchmap_reads_the_captions_of_each_image_from_the_split(tmp_path):
    """Images with 2 captions each: every training pair must be an image with one of its own."""
    cfg = get_config("smoke").retrieval
    scenes = [make_scene(k, np.random.default_rng([0, k]), int(cfg["image_size"]), int(cfg["min_objects"]),
                         int(cfg["max_objects"]), tuple(cfg["small_size"]), tuple(cfg["large_size"]), n_captions=2)
              for k in range(12)]
    sp = CaptionedSplit(scenes)
    assert [list(sp.caption_range(i)) for i in (0, 5)] == [[0, 1], [10, 11]]
    assert all(int(sp.cap_to_img[c]) == i for i in range(len(sp)) for c in sp.caption_range(i))
    vocab = CaptionVocabulary()
    torch.manual_seed(0)
    model = MatchmapModel(Backbone(4), len(vocab), 8, 8)
    seen_images, seen_tokens = [], []
    cells, words = model.cells, model.words

    def spy_cells(images):
        seen_images.append(images.clone())
        return cells(images)

    def spy_words(tokens, lengths):
        seen_tokens.append(tokens.clone())
        return words(tokens, lengths)

    model.cells, model.words = spy_cells, spy_words
    losses = train_matchmap(model, sp, vocab, epochs=1, batch_size=4)
    assert len(losses) == 1 and losses[0] > 0
    rendered = torch.stack([torch.from_numpy(sp.image(i).copy()).permute(2, 0, 1).float() / 255 for i in range(len(sp))])
    tokens, _ = vocab.batch(sp.texts)
    pairs = 0
    for images, toks in zip(seen_images, seen_tokens):
        for img, tok in zip(images, toks):
            i = next(i for i in range(len(sp)) if torch.equal(rendered[i], img))
            own = [tokens[c][tokens[c] > 0].tolist() for c in sp.caption_range(i)]
            assert tok[tok > 0].tolist() in own, f"image {i} was paired with a caption of another image"
            pairs += 1
    assert pairs == len(sp)
    with pytest.raises(ValueError, match="no caption"):
        train_matchmap(model, CaptionedSplit(scenes[:2] + [make_scene(99, np.random.default_rng(9), 48, 1, 2,
                                                                      (6, 9), (12, 16), n_captions=0)]),
                       vocab, epochs=1)


def test_query_agnostic_checkpoints_depend_on_its_own_knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    cfg = dict(get_config("smoke").retrieval)
    root = run_dir("05_query_agnostic", query_agnostic_knobs(cfg, 0))
    assert root.parent == tmp_path / "runs" and root.name.startswith("05_query_agnostic_")
    for knob, value in (("qa_lr", 0.5), ("qa_epochs", 7), ("qa_alpha", 0.3), ("k_fine", 5), ("qa_layers", 2),
                        ("qa_ffn_norm", True), ("qa_loss", "triplet-hardest"), ("qa_text_tower", "bigru")):
        assert run_dir("05_query_agnostic", query_agnostic_knobs(dict(cfg, **{knob: value}), 0)) != root, knob
    assert run_dir("05_query_agnostic", query_agnostic_knobs(cfg, 1)) != root


def test_qa_ablation_rows_change_one_knob_each():
    cfg = dict(get_config("cpu").retrieval)
    rows = qa_ablation_rows(cfg)
    assert rows[0]["knobs"] == {} and rows[0]["text_level"] == "fine"
    groups = {r["group"] for r in rows}
    assert {"training length", "region count and alpha", "decoder", "embedding size", "loss", "text tower"} <= groups
    for r in rows[1:]:
        assert len(r["knobs"]) + (r["text_level"] != "fine") == 1, r
        assert all(cfg[k] != v for k, v in r["knobs"].items()), r
    assert {r["knobs"].get("qa_loss") for r in rows} >= {"triplet-hardest", "triplet-sum"}
    # every row is its own checkpoint folder
    folders = {str(query_agnostic_knobs({**cfg, **r["knobs"]}, 0)) + r["text_level"] for r in rows}
    assert len(folders) == len(rows)


@pytest.mark.parametrize("loss", ["infonce", "triplet-hardest", "triplet-sum"])
def test_query_agnostic_trains_with_each_loss(loss):
    torch.manual_seed(0)
    n, k, f = 12, 3, 6
    g, r, keep = torch.randn(n, f), torch.randn(n, k, f), torch.ones(n, k, dtype=torch.bool)
    tok = torch.randint(2, 20, (n, 5))
    ln = torch.full((n,), 5)
    model = QueryAgnostic(f, 20, 4, 8, 2)
    hist = train_query_agnostic(model, g, r, keep, tok, ln, torch.arange(n), epochs=3, batch_size=6, lr=1e-2,
                                progress=False, loss=loss)
    losses = hist.train["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="expected one of"):
        train_query_agnostic(model, g, r, keep, tok, ln, torch.arange(n), epochs=1, batch_size=6, lr=1e-2,
                             progress=False, loss="mse")
