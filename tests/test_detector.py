"""Tests of course_utils.detector and course_utils.detection_metrics (notebook 03)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils.cache import run_dir
from course_utils.detection_metrics import (
    PAPER_TABLE1,
    DetectionReport,
    _score_image,
    format_table1,
    match_greedy,
    proposal_recall,
    table1_rows,
)
from course_utils.detector import (
    AlignmentHead,
    Detections,
    ProposalEncoder,
    QueryEncoder,
    QueryVocabulary,
    SemanticDetector,
    alignment_loss,
    build_detector,
    clean_targets,
    detector_step,
    score_proposals,
)
from course_utils.profiles import get_config
from course_utils.recipes.detection import (
    detector_knobs,
    rpn_knobs,
    step_lr_optimizer,
    train_detector,
)
from course_utils.rpn import RPN, SmallBackbone
from course_utils.shapes import QUERY_WORDS, build_shapes, collate_scenes

# ---------------------------------------------------------------------------- encoders


def test_proposal_encoder_pools_each_box_and_normalises():
    torch.manual_seed(0)
    enc = ProposalEncoder(in_channels=4, spatial_scale=1 / 4, roi_size=2, hidden_channels=8,
                          hidden_dim=16, embed_dim=6)
    feats = torch.randn(2, 4, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 32.0]]), torch.tensor([[4.0, 4.0, 20.0, 12.0]])]
    out = enc(feats, boxes)
    assert out.shape == (3, 6)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    # The embedding of a box depends on its image only: encoding it alone gives the same vector.
    alone = enc(feats[1:], [boxes[1]])
    assert torch.allclose(alone, out[2:], atol=1e-6)
    # Fig. 3 starts with torchvision's ROI pooling at 1/stride.
    from torchvision.ops import roi_pool
    pooled = roi_pool(feats, boxes, 2, 1 / 4)
    x = F.relu(enc.conv(pooled)).flatten(1)
    assert torch.allclose(F.normalize(enc.fc2(F.relu(enc.fc1(x))), dim=1), out, atol=1e-6)


def test_vocabulary_tokenises_pads_and_warns_on_unknown_words():
    vocab = QueryVocabulary()
    assert len(vocab) == len(QUERY_WORDS) + 2
    ids, pad = vocab.encode(["the red circles", "Blue squares and green triangles!"])
    assert ids.shape == (2, 5) and pad.shape == (2, 5)
    assert pad[0].tolist() == [False, False, False, True, True] and not pad[1].any()
    assert ids[0, 1] == vocab.stoi["red"]
    with pytest.warns(UserWarning, match=r"unknown word\(s\) \['purple'\]"):
        ids, _ = vocab.encode(["purple circles"])
    assert ids[0, 0] == vocab.stoi["<unk>"]
    with pytest.raises(ValueError, match="no words"):
        vocab.encode(["  !! "])
    with pytest.raises(TypeError, match="list of queries"):
        vocab.encode("red circles")


def test_text_encoder_reads_the_enc_token_and_ignores_padding():
    torch.manual_seed(0)
    vocab = QueryVocabulary()
    enc = QueryEncoder(len(vocab), embed_dim=16, num_heads=2, num_layers=1, ff_dim=32).eval()
    ids, pad = vocab.encode(["red circles", "all the blue squares"])
    out = enc(ids, pad)
    assert out.shape == (2, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    alone = enc(*vocab.encode(["red circles"]))
    assert torch.allclose(alone, out[:1], atol=1e-5), "padding must not change a query's encoding"
    # Word order matters (positions) and the ⟨ENC⟩ token is a parameter that gets gradients.
    a = enc(*vocab.encode(["red circles and blue squares"]))
    b = enc(*vocab.encode(["blue circles and red squares"]))
    assert not torch.allclose(a, b)
    # Not a.sum(): the encoder ends in LayerNorm, whose outputs sum to a constant, so that
    # objective has an exactly zero gradient; a fixed random projection does not.
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    (a * weights).sum().backward()
    assert enc.enc_token.grad is not None and enc.enc_token.grad.abs().sum() > 1e-4


def test_alignment_head_is_eq3_and_loss_is_eq4():
    torch.manual_seed(0)
    head = AlignmentHead(4, 3, 5)
    r, t = torch.randn(6, 4), torch.randn(6, 3)
    logits = head(r, t)
    z = torch.cat([r, t], 1)
    want = torch.relu(z @ head.fc1.weight.T + head.fc1.bias) @ head.fc2.weight.T + head.fc2.bias
    assert torch.allclose(logits, want.squeeze(1), atol=1e-6)
    y = torch.tensor([1, 0, 1, 1, 0, 0])
    p = torch.sigmoid(logits)
    eq4 = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert alignment_loss(logits, y).item() == pytest.approx(eq4.item(), rel=1e-5)
    empty = alignment_loss(torch.zeros(0, requires_grad=True), torch.zeros(0))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="one row per"):
        head(r, t[:2])


def test_score_is_conf_times_align_with_threshold_and_top_k():
    conf = torch.tensor([0.9, 0.99, 0.6, 0.95])
    align = torch.tensor([0.9, 0.2, 0.95, 0.7])
    keep, scores = score_proposals(conf, align, threshold=0.5)
    assert keep.tolist() == [0, 3, 2]
    assert torch.allclose(scores, torch.tensor([0.81, 0.665, 0.57]))
    keep, _ = score_proposals(conf, align, threshold=0.5, top_k=1)
    assert keep.tolist() == [0]
    keep, scores = score_proposals(conf, torch.zeros(4))
    assert keep.numel() == 0 and scores.numel() == 0


# ---------------------------------------------------------------------------- the model


def _tiny_detector() -> SemanticDetector:
    torch.manual_seed(0)
    rpn = RPN(SmallBackbone((8, 16), stride=4), anchor_size=8, batch_per_image=32, head_channels=16,
              post_nms_top_n=20)
    return SemanticDetector(rpn, QueryVocabulary(), embed_dim=8, proposal_channels=8, proposal_hidden=16,
                            text_ff_dim=16, align_hidden=8)


def _batch() -> dict:
    images = torch.rand(2, 3, 32, 32)
    return {"image": images,
            "boxes": [torch.tensor([[4.0, 4.0, 12.0, 12.0], [18.0, 18.0, 28.0, 26.0]]), torch.zeros(0, 4)],
            "aligned": [torch.tensor([True, False]), torch.zeros(0, dtype=torch.bool)],
            "query": ["red circles", "blue squares"], "image_id": [0, 1]}


def test_detector_step_trains_with_an_empty_image():
    model = _tiny_detector()
    out = detector_step(model, _batch())
    assert set(out) == {"loss", "rpn", "align"}
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert out["loss"].item() == pytest.approx(out["rpn"].item() + out["align"].item(), rel=1e-5)
    out["loss"].backward()
    for name in ("proposal_encoder.fc2.weight", "text_encoder.enc_token", "alignment.fc1.weight",
                 "rpn.head.cls_logits.weight", "rpn.backbone.body.0.0.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all(), name


def test_detector_step_with_a_batch_of_empty_images():
    model = _tiny_detector()
    batch = _batch()
    batch["boxes"][0], batch["aligned"][0] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)
    out = detector_step(model, batch)
    assert out["align"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_detector_drops_zero_area_boxes_and_rejects_mismatched_labels():
    model = _tiny_detector()
    batch = _batch()
    batch["boxes"][0] = torch.tensor([[4.0, 4.0, 12.0, 12.0], [18.0, 18.0, 18.0, 26.0]])
    with pytest.warns(UserWarning, match=r"image_id 0.*zero-area"):
        out = detector_step(model, batch)
    assert torch.isfinite(out["loss"])
    batch["aligned"][0] = torch.tensor([True])
    with pytest.raises(ValueError, match="2 boxes but 1 alignment labels"):
        detector_step(model, batch)


def _with_extras(batch: dict, queries: list[list[str]], labels: list[torch.Tensor]) -> dict:
    return dict(batch, extra_queries=queries, extra_aligned=labels)


def test_extra_queries_share_the_boxes_and_enter_the_alignment_loss():
    torch.manual_seed(0)
    model = _tiny_detector()
    base = _batch()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - same anchor sample in every call
    boxes, aligned, _ = clean_targets(base)
    plain = model(base["image"], base["query"], boxes, aligned, gen())["align"]
    # The primary query repeated as the extras: the same pairs twice, so the same mean BCE.
    same = model(base["image"], base["query"], boxes, aligned, gen(),
                 extra_queries=[[q, q] for q in base["query"]],
                 extra_aligned=[torch.stack([a, a]) for a in aligned])["align"]
    assert same.item() == pytest.approx(plain.item(), rel=1e-5)
    # Different labels for an extra query change the loss; an image may have no extras.
    other = model(base["image"], base["query"], boxes, aligned, gen(),
                  extra_queries=[["green triangles"], []],
                  extra_aligned=[~aligned[0][None], torch.zeros((0, 0), dtype=torch.bool)])["align"]
    assert other.item() != pytest.approx(plain.item(), rel=1e-3)
    with pytest.raises(ValueError, match="image 0: 1 extra queries but 2 rows"):
        model(base["image"], base["query"], boxes, aligned, extra_queries=[["x"], []],
              extra_aligned=[torch.stack([aligned[0], aligned[0]]), torch.zeros((0, 0), dtype=torch.bool)])


def test_detector_step_drops_zero_area_columns_of_the_extra_labels():
    model = _tiny_detector()
    batch = _batch()
    batch["boxes"][0] = torch.tensor([[4.0, 4.0, 12.0, 12.0], [18.0, 18.0, 18.0, 26.0]])
    batch = _with_extras(batch, [["green shapes"], ["red shapes"]],
                         [torch.tensor([[True, False]]), torch.zeros((1, 0), dtype=torch.bool)])
    with pytest.warns(UserWarning, match="zero-area"):
        out = detector_step(model, batch)
    assert torch.isfinite(out["loss"])
    batch["extra_aligned"][0] = torch.tensor([[True]])
    with pytest.raises(ValueError, match=r"extra_aligned'\]\[0\]: expected shape \(k, 2\)"):
        with pytest.warns(UserWarning):
            detector_step(model, batch)


def _described(query: str, shape: str, color: str) -> bool:
    """Read a shapes query by hand: does it describe a ``color`` ``shape``?"""
    words = query.split()
    while words and words[0] not in ("red", "green", "blue", "circles", "squares", "triangles"):
        words = words[1:]  # the prefix ("find the", "show me the", ...)
    for term in " ".join(words).split(" and "):
        t = term.split()
        c, s = (t[0], t[1]) if len(t) == 2 else (None, t[0])
        if (c is None or c == color) and (s == "shapes" or s == shape + "s"):
            return True
    return False


def test_training_split_carries_extra_queries_labelled_like_the_scene_query(tmp_path, monkeypatch):
    from course_utils.shapes import extra_queries

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    cfg = get_config("smoke").shapes
    data = build_shapes(cfg, seed=0)
    k = cfg.extra_train_queries
    assert k > 0
    item = data["train"][0]
    assert len(item["extra_queries"]) == k and item["extra_aligned"].shape == (k, len(item["boxes"]))
    assert "extra_queries" not in data["val"][0] and "extra_queries" not in data["test"][0]
    scene = data["train"].scenes[0]
    assert extra_queries(scene, k)[0] == item["extra_queries"]  # deterministic
    for i in range(len(data["train"])):
        it = data["train"][i]
        for q, row in zip(it["extra_queries"], it["extra_aligned"].tolist()):
            assert row == [_described(q, s, c) for s, c in zip(it["shapes"], it["colors"])], q
        # the scene's own query is untouched by the extras
        assert it["query"] == data["train"].scenes[i].query
        assert it["aligned"].tolist() == [_described(it["query"], s, c) for s, c in zip(it["shapes"], it["colors"])]
    batch = collate_scenes([data["train"][i] for i in range(4)])
    out = detector_step(build_detector(get_config("smoke")), batch)
    assert torch.isfinite(out["loss"])


def test_detect_and_search_handle_unknown_words_and_no_match(capsys):
    model = _tiny_detector().eval()
    with torch.no_grad():  # make every alignment probability ~0: nothing can match
        model.alignment.fc2.bias.fill_(-20.0)
    dets = model.detect(torch.rand(2, 3, 32, 32), ["red circles", "green triangles"])
    assert len(dets) == 2
    for d in dets:
        k = len(d.boxes)
        assert d.conf.shape == d.align.shape == d.score.shape == (k,)
        assert torch.allclose(d.score, d.conf * d.align)
    with pytest.warns(UserWarning, match="unknown word"):
        boxes, scores = model.search(torch.rand(3, 32, 32), "purple hexagons")
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    assert "no object matches 'purple hexagons'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no words"):
        model.search(torch.rand(3, 32, 32), "")
    with pytest.raises(ValueError, match="one query per image"):
        model.detect(torch.rand(2, 3, 32, 32), ["red circles"])


def test_profiles_build_the_detector():
    for name in ("smoke", "cpu"):
        cfg = get_config(name)
        model = build_detector(cfg)
        assert model.proposal_encoder.fc2.out_features == cfg.detector.embed_dim
        assert model.text_encoder.encoder.layers[0].self_attn.num_heads == cfg.detector.text_heads
    full = get_config("full").detector
    # §4.2-4.3, unchanged in the full profile.
    assert (full.embed_dim, full.roi_size, full.text_heads, full.text_layers, full.align_hidden) == (64, 2, 2, 1, 64)
    assert (full.lr, full.momentum, full.weight_decay, full.lr_step, full.lr_gamma, full.epochs,
            full.batch_size) == (1e-2, 0.9, 1e-5, 3, 0.9, 10, 32)
    assert get_config("full").rpn.backbone == "mobilenet_v2"


def test_smoke_profile_trains_end_to_end_with_fit(tmp_path):
    from course_utils.detection_metrics import evaluate_detector
    from course_utils.train import fit

    cfg = get_config("smoke")
    data = build_shapes(cfg.shapes, seed=0, cache=False)
    torch.manual_seed(0)
    model = build_detector(cfg)
    opt, sched = step_lr_optimizer(model, cfg.detector)
    hist = fit(model, detector_step, data["train"], epochs=1, batch_size=8, optimizer=opt,
               scheduler=sched, val_set=data["val"], collate_fn=collate_scenes, ckpt_dir=tmp_path,
               progress=False)
    assert {"loss", "rpn", "align"} <= set(hist.train) and len(hist.val["align"]) == 1
    report, kept = evaluate_detector(model, data["test"], batch_size=4, progress=False, keep_detections=2)
    m = report.metrics()
    assert report.n_images == len(data["test"]) and len(kept) == 2
    assert set(m["aligned"]) == {"precision", "recall", "iou", "align_acc"}


# ---------------------------------------------------------------------------- metrics


def test_match_greedy_is_one_to_one_by_score():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    preds = torch.tensor([[0.0, 0.0, 10.0, 9.0],    # IoU 0.9 with gt 0
                          [0.0, 0.0, 10.0, 10.0],   # IoU 1.0 with gt 0, but lower score
                          [21.0, 21.0, 30.0, 30.0],  # IoU 0.81 with gt 1
                          [50.0, 50.0, 60.0, 60.0]])
    pi, gi, iou = match_greedy(preds, torch.tensor([0.9, 0.8, 0.7, 0.95]), gt)
    assert pi.tolist() == [0, 2] and gi.tolist() == [0, 1]
    assert iou.tolist() == pytest.approx([0.9, 0.81])
    # At IoU >= 0.95 only the exact box (second by score) is good enough.
    pi, gi, _ = match_greedy(preds, torch.tensor([0.9, 0.8, 0.7, 0.95]), gt, iou_thresh=0.95)
    assert pi.tolist() == [1] and gi.tolist() == [0]
    assert match_greedy(preds[:0], torch.zeros(0), gt)[0].numel() == 0
    assert match_greedy(preds, torch.ones(4), gt[:0])[0].numel() == 0


def test_table1_metrics_on_a_hand_made_image():
    report = DetectionReport()
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 0.0, 50.0, 10.0]])
    aligned = torch.tensor([True, False, True])
    det = Detections(boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0],
                                         [60.0, 60.0, 70.0, 70.0], [40.0, 0.0, 50.0, 10.0]]),
                     conf=torch.tensor([0.9, 0.9, 0.8, 0.3]),
                     align=torch.tensor([0.9, 0.1, 0.9, 0.9]),
                     score=torch.tensor([0.81, 0.09, 0.72, 0.27]))
    _score_image(report, det, gt, aligned, 0.5, 0.5, 0.5)
    m = report.metrics()
    # All: 3 confident boxes, 2 hit objects; 3 objects -> P 2/3, R 2/3.
    assert m["all"]["precision"] == pytest.approx(2 / 3) and m["all"]["recall"] == pytest.approx(2 / 3)
    assert m["all"]["iou"] == pytest.approx(1.0)
    # Aligned: boxes 0 and 2 score > 0.5; one hits an aligned object; 2 aligned objects.
    assert m["aligned"]["precision"] == pytest.approx(0.5) and m["aligned"]["recall"] == pytest.approx(0.5)
    # Both matched boxes have the right alignment (0.9 for the aligned one, 0.1 for the other).
    assert m["aligned"]["align_acc"] == pytest.approx(1.0)
    # A query matching nothing: no aligned objects, no aligned prediction -> left out of the means.
    _score_image(report, Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), torch.zeros(0)),
                 gt[:0], aligned[:0], 0.5, 0.5, 0.5)
    assert report.metrics()["aligned"]["recall"] == pytest.approx(0.5) and report.n_images == 2


def test_table1_printing_and_rows_carry_the_paper():
    m = {"all": {"precision": 0.5, "recall": 0.25, "iou": 0.7},
         "aligned": {"precision": 0.9, "recall": 0.8, "iou": 0.75, "align_acc": float("nan")}}
    text = format_table1(m, "cpu")
    assert "0.932" in text and "0.996" in text and "N/A" in text and "cpu" in text
    rows = table1_rows(m)
    assert len(rows) == 7 and rows[0]["paper"] == PAPER_TABLE1["all"]["precision"]
    assert {r["experiment"] for r in rows} == {"all proposals", "aligned proposals"}


def test_proposal_recall_grows_with_the_number_of_proposals():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])]
    props = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [20.0, 20.0, 29.0, 30.0]])]
    assert proposal_recall(props, gt, [1, 2, 3]) == {1: 0.5, 2: 0.5, 3: 1.0}
    assert math.isnan(proposal_recall([torch.zeros(0, 4)], [torch.zeros(0, 4)], [1])[1])


def test_nb03_checks_accept_the_reference_and_fall_back_on_mistakes(capsys):
    from course_utils.checks import RESULTS, nb03

    # A student's copies of the reference pass.
    class MyEncoder(ProposalEncoder):
        pass

    class MyText(QueryEncoder):
        pass

    class MyHead(AlignmentHead):
        pass

    def my_loss(logits, labels):
        return alignment_loss(logits, labels)

    def my_score(*args, **kwargs):
        return score_proposals(*args, **kwargs)

    assert nb03.check_proposal_encoder(MyEncoder) is MyEncoder
    assert nb03.check_query_encoder(MyText) is MyText
    assert nb03.check_alignment(MyHead, my_loss) == (MyHead, my_loss)
    assert nb03.check_score_proposals(my_score) is my_score
    assert all(RESULTS[e].passed for e in nb03.EXERCISES)

    class NoNorm(ProposalEncoder):  # forgets the L2 normalisation of Fig. 3
        def forward(self, features, boxes):
            from torchvision.ops import roi_pool
            x = F.relu(self.conv(roi_pool(features, boxes, self.roi_size, self.spatial_scale))).flatten(1)
            return self.fc2(F.relu(self.fc1(x)))

    assert nb03.check_proposal_encoder(NoNorm) is ProposalEncoder
    assert not RESULTS["3.1 ProposalEncoder"].passed

    def unsorted(conf, align, threshold=0.5, top_k=None):
        s = conf * align
        keep = torch.nonzero(s > threshold).flatten()[:top_k]
        return keep, s[keep]

    assert nb03.check_score_proposals(unsorted) is score_proposals
    assert "3.4 score_proposals: " in capsys.readouterr().out


def test_alignment_head_init_suits_unit_norm_inputs_and_optimizer_knob():
    torch.manual_seed(0)
    head = AlignmentHead(64, 64, 64)
    region = F.normalize(torch.randn(512, 64), dim=1)
    text = F.normalize(torch.randn(512, 64), dim=1)
    pre = head.fc1(torch.cat([region, text], 1))
    # Pre-activations of order 1 (not ~0.07 as with PyTorch's default on unit vectors).
    assert 0.7 < pre.std().item() < 2.0
    for name, cls in (("smoke", torch.optim.AdamW), ("full", torch.optim.SGD)):
        section = get_config(name).detector
        opt, sched = step_lr_optimizer(head, section)
        assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == section.lr
        assert sched.step_size == section.lr_step and sched.gamma == section.lr_gamma
    with pytest.raises(ValueError, match="optimizer must be"):
        step_lr_optimizer(head, dict(get_config("full").detector, optimizer="lbfgs"))


def test_query_kinds_and_alignment_by_kind(tmp_path, monkeypatch):
    from course_utils.detection_metrics import alignment_by_query_kind, query_kind

    assert query_kind([("red", "circle")]) == "one term"
    assert query_kind([("red", None), (None, "circle")]) == "two terms, no binding"
    assert query_kind([("red", "circle"), ("blue", None)]) == "two terms, binding"
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    cfg = get_config("smoke")
    test = build_shapes(cfg.shapes, seed=0)["test"]
    model = build_detector(cfg)
    by_kind = alignment_by_query_kind(model, test, batch_size=3)
    assert sum(v["queries"] for v in by_kind.values()) == len(test)
    assert sum(v["objects"] for v in by_kind.values()) == sum(len(s.objects) for s in test.scenes)
    # an alignment head that says "no" to everything scores the share of negatives
    with torch.no_grad():
        model.alignment.fc2.bias.fill_(-1e4)
    by_kind = alignment_by_query_kind(model, test)
    for kind, v in by_kind.items():
        scenes = [s for s in test.scenes if query_kind(s.terms) == kind]
        negatives = sum(not a for s in scenes for a in s.aligned)
        assert v["accuracy"] == pytest.approx(negatives / v["objects"]), kind


def test_train_detector_recipe_resumes_the_run_of_its_folder(tmp_path, monkeypatch, capsys):
    """Notebook 03 and benchmarks/detector.py train in one folder: the second finds the finished run."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    cfg = get_config("smoke")
    data = build_shapes(cfg.shapes, seed=0, cache=False)
    ckpt = run_dir(f"03_detector_{cfg.name}", detector_knobs(cfg, 0))
    assert ckpt.parent == tmp_path / "runs" and ckpt.name.startswith("03_detector_smoke_")
    torch.manual_seed(0)
    model, hist = train_detector(cfg, data, model=build_detector(cfg), ckpt_dir=ckpt, device="cpu", progress=False)
    assert len(hist) == cfg.detector.epochs and {"loss", "rpn", "align"} <= set(hist.val)
    assert "AdamW lr" in capsys.readouterr().out
    again, hist2 = train_detector(cfg, data, ckpt_dir=ckpt, device="cpu", progress=False)
    assert "already done" in capsys.readouterr().out
    assert hist2.numbers() == hist.numbers()
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # The folder changes with any section that shapes the run, and with the seed.
    assert detector_knobs(cfg, 1) != detector_knobs(cfg, 0)
    changed = get_config("smoke")
    changed.detector["lr"] = 0.5
    assert run_dir("03_detector_smoke", detector_knobs(changed, 0)) != ckpt
    assert rpn_knobs(changed, 0) == rpn_knobs(cfg, 0)   # the RPN run of notebook 02 does not see it


def test_matcher_labels_are_torchvision_rpn_labels_and_equal_ours():
    from torchvision.models.detection._utils import Matcher

    from course_utils.boxes import anchor_grid, label_anchors
    from course_utils.recipes.detection import matcher_labels

    anchors = anchor_grid((8, 8), (64, 64), 16)
    matcher = Matcher(0.6, 0.1, allow_low_quality_matches=True)
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 5):
        xy = torch.rand(n, 2, generator=g) * 40
        gt = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 16], dim=1)
        labels, matched = matcher_labels(anchors, gt, matcher)
        ours, ours_matched = label_anchors(anchors, gt, 0.6, 0.1)
        assert labels.dtype == torch.int64 and torch.equal(labels, ours)
        pos = labels == 1
        assert torch.equal(matched[pos], ours_matched[pos])
        if n == 0:
            assert (labels == 0).all() and (matched == Matcher.BELOW_LOW_THRESHOLD).all()
        else:
            assert set(labels.unique().tolist()) <= {-1, 0, 1} and pos.any()
