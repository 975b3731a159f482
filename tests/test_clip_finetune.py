"""Tests of course_utils.clip.finetune and recipes.clip_finetune: Algorithm 1's step, resumable fine-tuning, Table 2.6 rows.

A randomly initialised small CLIP and in-memory tensors keep every test offline and fast.
"""

from __future__ import annotations

import math

import pytest
import torch

from course_utils.cache import run_dir
from course_utils.checkpoints import list_checkpoints
from course_utils.clip import data as svt_data
from course_utils.clip import evaluation, loading, small
from course_utils.clip import finetune as ft
from course_utils.clip import wordspotting as ws
from course_utils.env import seed_everything
from course_utils.profiles import get_config
from course_utils.recipes import clip_finetune as cf

WORDS = ["JOINT", "JOHNS", "JONES", "CAFE", "HOTEL", "BAR", "INN", "DELI"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these models are tiny, and on a busy 2-core machine two threads spend
    most of their time spin-waiting for each other (measured: 25x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**overrides) -> dict:
    cfg = dict(ft_epochs=3, ft_batch_size=4, ft_lr=5e-5, ft_betas=(0.9, 0.98), ft_eps=1e-6,
               ft_weight_decay=0.2, ft_checkpoints=(1, 2, 3, 4, 5, 7, 20, 40))
    cfg.update(overrides)
    return cfg


class _Pairs(torch.utils.data.Dataset):
    """8 (image, tokens) pairs: random 32x128 'crops', one word each."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(len(WORDS), 3, 32, 128, generator=g)
        self.tokens = small.small_clip_tokenizer()(WORDS)

    def __len__(self) -> int:
        return len(WORDS)

    def __getitem__(self, i: int):
        return self.x[i], self.tokens[i]


def _model() -> torch.nn.Module:
    return small.build_small_clip(seed=0, zero_token_embedding=False)


def test_training_step_lowers_the_loss_on_a_fixed_batch():
    model, data = _model(), _Pairs()
    batch = (data.x, data.tokens)
    optimizer = ft.finetune_optimizer(model, _cfg(ft_lr=1e-4))
    losses = [ft.training_step(model, batch, optimizer)["loss"] for _ in range(6)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_training_step_returns_the_losses_of_algorithm_1():
    model, data = _model(), _Pairs()
    with torch.no_grad():
        want = ft.clip_contrastive_loss(model.encode_image(data.x), model.encode_text(data.tokens),
                                        model.logit_scale.exp())
    before = [p.detach().clone() for p in model.parameters()]
    got = ft.training_step(model, (data.x, data.tokens), ft.finetune_optimizer(model, _cfg()))
    assert set(got) == {"loss", "loss_image", "loss_text"}
    for k in got:
        assert got[k] == pytest.approx(float(want[k]), rel=1e-5)
    assert got["loss"] == pytest.approx(0.5 * (got["loss_image"] + got["loss_text"]), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "no parameter moved"


def test_finetune_optimizer_uses_table_2_5():
    model = _model()
    opt = ft.finetune_optimizer(model, _cfg())
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (5e-5, (0.9, 0.98), 1e-6, 0.2)
    # without ft_logit_scale_lr the temperature learns at ft_lr, never decayed
    weights, scale = opt.param_groups
    assert len(scale["params"]) == 1 and scale["params"][0] is model.logit_scale
    assert (scale["lr"], scale["weight_decay"]) == (5e-5, 0.0)
    assert sum(p.numel() for p in weights["params"]) + 1 == sum(p.numel() for p in model.parameters())


def test_the_temperature_learns_at_its_own_rate_and_stops_at_the_cap():
    model, data = _model(), _Pairs()
    opt = ft.finetune_optimizer(model, _cfg(ft_logit_scale_lr=0.01))
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 0.01]
    start = model.logit_scale.item()
    ft.training_step(model, (data.x, data.tokens), opt)
    assert abs(model.logit_scale.item() - start) == pytest.approx(0.01, rel=0.05)  # Adam's first step: lr
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))  # above CLIP's cap: the next step clamps it first
    ft.training_step(model, (data.x, data.tokens), opt)
    assert model.logit_scale.item() <= math.log(ft.MAX_LOGIT_SCALE) + 0.0101


def test_distinct_pairs_keeps_the_first_pair_of_each_text():
    tokens = small.small_clip_tokenizer()(["THE", "INN", "THE", "BAR", "INN", "THE"])
    assert ft.distinct_pairs(tokens).tolist() == [True, True, False, True, False, False]
    assert ft.distinct_pairs(tokens[:0]).tolist() == []
    with pytest.raises(ValueError, match="tokens"):
        ft.distinct_pairs(tokens[0])


def test_a_repeated_word_is_not_its_own_negative():
    """contrastive_step drops the second THE: the loss equals Algorithm 1 on the distinct pairs."""
    model, data = _model(), _Pairs()
    x = torch.cat([data.x, data.x[:2]])
    tokens = torch.cat([data.tokens, data.tokens[:2]])
    with torch.no_grad():
        got = ft.contrastive_step(model, (x, tokens))
        want = ft.clip_contrastive_loss(model.encode_image(data.x), model.encode_text(data.tokens),
                                        model.logit_scale.exp())
        naive = ft.clip_contrastive_loss(model.encode_image(x), model.encode_text(tokens), model.logit_scale.exp())
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    assert float(naive["loss"]) != pytest.approx(float(want["loss"]), rel=1e-3)


def test_checkpoint_epochs_are_the_thesis_epochs_clipped_to_the_profile():
    assert ft.checkpoint_epochs(_cfg(ft_epochs=40)) == [1, 2, 3, 4, 5, 7, 20, 40]
    assert ft.checkpoint_epochs(_cfg(ft_epochs=6)) == [1, 2, 3, 4, 5]
    assert ft.checkpoint_epochs(_cfg(ft_epochs=1, ft_checkpoints=(1,))) == [1]


def test_finetune_resumes_exactly_and_keeps_the_thesis_checkpoints(tmp_path):
    cfg, data = _cfg(ft_epochs=3, ft_checkpoints=(1, 3)), _Pairs()
    straight = _model()
    h1 = ft.finetune(straight, data, cfg, tmp_path / "a", progress=False)

    interrupted = _model()
    ft.finetune(interrupted, data, cfg, tmp_path / "b", progress=False, max_steps=3)  # epoch 1 + 1 step
    assert sorted(list_checkpoints(tmp_path / "b")) == [1]
    resumed = _model()
    h2 = ft.finetune(resumed, data, cfg, tmp_path / "b", progress=False)

    assert h1.numbers() == h2.numbers()
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # epoch 2 is not a kept epoch: its checkpoint is pruned once epoch 3 exists
    assert sorted(list_checkpoints(tmp_path / "b")) == [1, 3]


def test_evaluate_and_table_rows_on_synthsvt(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    svt_cfg = dict(n_train=2, n_test=3, image_size=(160, 120), seed=0, lexicon_size=20, max_words=2)
    data = svt_data.load_svt_data(svt_cfg, verbose=False)
    assert not data.real and "SynthSVT" in data.source
    assert (len(data.train), len(data.test)) == (2, 3)
    model = _model()
    bundle = loading.ClipBundle(model, small.small_clip_preprocess, small.small_clip_tokenizer(), "small", "test")
    ev = evaluation.build_eval_set(data.test, bundle)
    assert ev.unit == "crop" and ev.Y.shape == (len(ev.x), len(ev.vocabulary))
    assert ev.Y.sum(1).tolist() == [20] * len(ev.x)  # each row's positives: its 20-word lexicon
    m = evaluation.evaluate_word_spotting(model, ev)
    for k in ("accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1"):
        assert 0.0 <= m[k] <= 1.0, (k, m[k])

    train_set = ft.pair_dataset(data.train, bundle)
    assert len(train_set) == data.train.n_words
    padded = ft.pair_dataset(data.train, bundle, pads=(0.0, 0.1, 0.2))
    assert len(padded) == 3 * data.train.n_words
    assert torch.equal(padded.x[: len(train_set)], train_set.x)  # pad 0 first: the plain crops
    assert not torch.equal(padded.x[len(train_set):2 * len(train_set)], train_set.x)
    assert padded.texts == 3 * train_set.texts
    cfg = _cfg(ft_epochs=2, ft_checkpoints=(1, 2), ft_batch_size=8)
    ft.finetune(model, train_set, cfg, tmp_path / "run", progress=False)
    rows = cf.evaluate_checkpoints(model, ev, tmp_path / "run", [1, 2], zero_shot=m, verbose=False)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"epoch", *ws.TABLE_COLUMNS, "logit_scale", "precision_at_zero_shot_scale"}
    assert rows[0]["precision_at_zero_shot_scale"] == rows[0]["precision"]
    # at its own temperature a checkpoint's precision is the one evaluate() reports
    again = evaluation.evaluate_word_spotting(model, ev, reference_scale=rows[-1]["logit_scale"])
    assert again["precision_at_reference_scale"] == pytest.approx(rows[-1]["precision"], rel=1e-9)


def test_ablation_rows_change_one_knob_each():
    cpu = dict(get_config("cpu").svt)
    rows = cf.ft_ablation_rows(cpu)
    assert rows[0]["knobs"] == {} and len({r["label"] for r in rows}) == len(rows)
    for r in rows[1:]:
        assert r["knobs"] and set(r["knobs"]) <= set(cpu)
        assert any(cpu[k] != v for k, v in r["knobs"].items()), r  # every row changes something
    assert {"ft_logit_scale_lr": 0.0} in [r["knobs"] for r in rows]
    assert {"ft_weight_decay": 0.2} in [r["knobs"] for r in rows]  # cpu's departures from Table 2.5 undone
    assert {"ft_crop_pads": (0.0,)} in [r["knobs"] for r in rows]
    # a profile already on Table 2.5 with a frozen temperature has no rows that would repeat its own run
    plain = cf.ft_ablation_rows(dict(cpu, ft_weight_decay=0.2, ft_crop_pads=(0.0,), ft_logit_scale_lr=0.0))
    assert [r["knobs"] for r in plain] == [{}, {"ft_lr": 4 * cpu["ft_lr"]}]


def test_ablation_rows_are_complete_runs_and_the_frozen_row_keeps_the_temperature(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    svt_cfg = dict(n_train=2, n_test=2, image_size=(160, 120), seed=0, lexicon_size=20, max_words=2,
                   ft_crop_pads=(0.0,), ft_logit_scale_lr=1e-1, **_cfg(ft_epochs=2, ft_checkpoints=(1, 2), ft_batch_size=8))
    data = svt_data.load_svt_data(svt_cfg, verbose=False)

    def load_bundle():
        return loading.ClipBundle(_model(), small.small_clip_preprocess, small.small_clip_tokenizer(), "small", "test")

    rows = cf.ft_ablation_rows(svt_cfg)[:2]
    assert rows[1]["knobs"] == {"ft_logit_scale_lr": 0.0}
    out = cf.run_ft_ablation(load_bundle, data.train, data.test, svt_cfg, rows, seed=0, verbose=False)
    # the first row is the profile's run, number for number
    seed_everything(0)
    direct = cf.finetune_and_select(load_bundle(), data.train, data.test, svt_cfg, tmp_path / "direct", seed=0)
    mine = cf.ablation_summary(rows[0], direct.zero_shot, direct.best, 0.0)
    for k in ("best_epoch", "precision", "precision_at_zero_shot_scale", "lexicon50_top1", "logit_scale"):
        assert out[0][k] == mine[k], k
    assert out[0]["logit_scale"] != pytest.approx(direct.zero_shot["logit_scale"], abs=1e-3)  # learnt: it moved
    # frozen: the temperature stays, so both precisions (and both gains) are the same number
    frozen = out[1]
    assert frozen["logit_scale"] == pytest.approx(direct.zero_shot["logit_scale"], rel=1e-6)
    assert frozen["precision"] == pytest.approx(frozen["precision_at_zero_shot_scale"], rel=1e-6)
    assert frozen["precision_gain"] == pytest.approx(frozen["precision"] / direct.zero_shot["precision"] - 1)
    with pytest.raises(ValueError, match="ablation row 0.*ft_lrr"):
        cf.run_ft_ablation(load_bundle, data.train, data.test, svt_cfg, [{"label": "typo", "knobs": {"ft_lrr": 1.0}}])
    with pytest.raises(ValueError, match="precision_at_zero_shot_scale"):
        cf.ablation_summary(rows[0], direct.zero_shot, {"epoch": 1, "precision": 0.5}, 0.0)


def test_best_by_precision_ignores_zero_shot_and_prefers_the_earlier_tie():
    rows = [{"epoch": 0, "precision": 0.9}, {"epoch": 1, "precision": 0.3},
            {"epoch": 2, "precision": 0.5}, {"epoch": 5, "precision": 0.5}]
    assert cf.best_by(rows)["epoch"] == 2
    assert cf.best_by(rows, include_zero_shot=True)["epoch"] == 0
    with pytest.raises(ValueError):
        cf.best_by(rows[:1])


def test_table_2_6_is_the_thesis_table():
    assert sorted(ws.TABLE_2_6) == [0, 1, 2, 3, 4, 5, 7, 20, 40]
    best = max((e for e in ws.TABLE_2_6 if e), key=lambda e: ws.TABLE_2_6[e]["precision"])
    assert best == 20  # §2.4.3: "+20 achieves the highest Precision"


# --------------------------------------------------------------------------------------------
# the exercise checks of notebooks 06-07
# --------------------------------------------------------------------------------------------


def test_nb06_nb07_checks_accept_own_code_and_fall_back_otherwise():
    import torch.nn.functional as F

    from course_utils import checks

    def word_image_probabilities(i, t, s):
        return (s * i @ t.T).softmax(-1)

    def soft_confusion(P, Y):
        P = P.double()

        def ratios(mask):
            v = P.masked_fill(~mask, 0.0)
            peak = v.max(1, keepdim=True).values
            return torch.where(peak > 0, v / peak.clamp_min(1e-300), torch.zeros_like(v))

        tp, fp = ratios(Y).sum(1), ratios(~Y).sum(1)
        return {"tp": tp, "fn": Y.sum(1) - tp, "fp": fp, "tn": (~Y).sum(1) - fp}

    def clip_contrastive_loss(a, b, s):
        S = s * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        target = torch.arange(len(S))
        li, lt = F.cross_entropy(S, target), F.cross_entropy(S.T, target)
        return {"loss": (li + lt) / 2, "loss_image": li, "loss_text": lt}

    def training_step(model, batch, optimizer):
        out = clip_contrastive_loss(model.encode_image(batch[0]), model.encode_text(batch[1]), model.logit_scale.exp())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in out.items()}

    def no_update(model, batch, optimizer):
        with torch.no_grad():
            out = clip_contrastive_loss(model.encode_image(batch[0]), model.encode_text(batch[1]), model.logit_scale.exp())
        return {k: float(v) for k, v in out.items()}

    def unfinished(*args):
        raise NotImplementedError

    assert checks.nb06.check_word_image_probabilities(word_image_probabilities) is word_image_probabilities
    assert checks.nb06.check_soft_confusion(soft_confusion) is soft_confusion
    assert checks.nb06.check_normalised_similarity_entropy(unfinished) is ws.normalised_similarity_entropy
    assert checks.nb07.check_clip_contrastive_loss(clip_contrastive_loss) is clip_contrastive_loss
    assert checks.nb07.check_training_step(training_step) is training_step
    assert checks.nb07.check_training_step(no_update) is ft.training_step
    assert "did not change" in " ".join(checks.RESULTS["7.2 training_step"].messages)
    # the package's own implementation never earns the point
    assert checks.nb07.check_training_step(ft.training_step) is ft.training_step
    assert not checks.RESULTS["7.2 training_step"].passed
    assert checks.nb06.check_word_image_probabilities(ws.word_image_probabilities) is ws.word_image_probabilities
    assert not checks.RESULTS["6.1 word_image_probabilities"].passed


def test_run_dir_names_the_weights_the_data_and_the_fine_tuning_knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    svt_cfg = dict(n_train=2, n_test=1, image_size=(160, 120), seed=0, lexicon_size=20, max_words=2)
    train = svt_data.load_svt_data(svt_cfg, verbose=False).train
    other = svt_data.load_svt_data(dict(svt_cfg, seed=1), verbose=False).train
    bundle = loading.ClipBundle(_model(), small.small_clip_preprocess, small.small_clip_tokenizer(), "small", "test",
                                {"sha256": "ab" * 32})

    def folder(b, cfg, split=train):
        return run_dir("07_clip_svt_cpu", cf.finetune_knobs(b, cfg, split))

    a = folder(bundle, _cfg())
    assert a.parent == tmp_path / "runs" and a.name.startswith("07_clip_svt_cpu_")
    assert cf.finetune_knobs(bundle, _cfg(), train)["start"] == "ab" * 6
    assert a == folder(bundle, dict(_cfg(), n_train=5))  # not a fine-tuning knob
    assert a == folder(bundle, dict(_cfg(), ft_ablation_live=3))  # how many ablation rows, not a knob
    assert a != folder(bundle, _cfg(ft_logit_scale_lr=1e-2))
    assert a != folder(bundle, _cfg(ft_epochs=4))
    # other training data (another seed, or one image file changed in place) is another run
    assert a != folder(bundle, _cfg(), other)
    assert cf.split_fingerprint(train) == cf.split_fingerprint(svt_data.load_svt_data(svt_cfg, verbose=False).train)
    picture = train[0].path
    picture.write_bytes(picture.read_bytes() + b"\0")
    assert a != folder(bundle, _cfg())
    with pytest.raises(ValueError, match="SVTSplit"):
        cf.split_fingerprint([train[0]])
    random = loading.ClipBundle(_model(), small.small_clip_preprocess, small.small_clip_tokenizer(), "small", "test",
                                {"random_init": True})
    assert a != folder(random, _cfg()) and cf.finetune_knobs(random, _cfg(), train)["start"] == "random"


# --------------------------------------------------------------------------------------------
# devices: the model on the (virtual) GPU, batches from a CPU dataset (notebook 07 on Colab)
# --------------------------------------------------------------------------------------------


def test_training_step_moves_a_cpu_batch_to_the_model():
    from course_utils.device_guard import is_on_virtual_cuda, virtual_cuda

    data = _Pairs()
    batch = (data.x[:4], data.tokens[:4])
    want_model = _model()
    want = ft.training_step(want_model, batch, ft.finetune_optimizer(want_model, _cfg()))
    with virtual_cuda() as dev:
        model = _model().to(dev)
        got = ft.training_step(model, batch, ft.finetune_optimizer(model, _cfg()))  # batch stays on the CPU
        assert all(is_on_virtual_cuda(p) for p in model.parameters())
        keep = ft.distinct_pairs(batch[1].to(dev))
        assert is_on_virtual_cuda(keep) and keep.tolist() == ft.distinct_pairs(batch[1]).tolist()
    assert got == want  # the same numbers as on the CPU (training mode: the same kernels)
    for a, b in zip(model.state_dict().values(), want_model.state_dict().values()):
        assert torch.equal(a.cpu(), b)


def test_notebook_07_bug_comes_back_without_the_batch_move(monkeypatch):
    """The bug notebook 07's one-batch demo had on a GPU: a CPU batch reaches a model on the GPU.

    The checks' toy CLIP, like open_clip's ViT-B/32, does not move its inputs: only
    ``training_step`` (through ``contrastive_step``) does, and without that move it fails."""
    from course_utils.checks.nb07 import ToyClip
    from course_utils.device_guard import DeviceMismatchError, virtual_cuda

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 20, (4, 5), generator=g))
    with virtual_cuda() as dev:
        toy = ToyClip().to(dev)
        opt = torch.optim.Adam(toy.parameters(), lr=1e-3)
        assert math.isfinite(ft.training_step(toy, batch, opt)["loss"])
        monkeypatch.setattr(ft, "_batch_on_model", lambda model, b: tuple(b))  # the move, taken away
        with pytest.raises(DeviceMismatchError, match="move the cpu one"):
            ft.training_step(toy, batch, opt)


def test_training_step_names_a_malformed_batch():
    model = _model()
    opt = ft.finetune_optimizer(model, _cfg())
    with pytest.raises(ValueError, match="batch: expected"):
        ft.training_step(model, _Pairs().x, opt)
    with pytest.raises(ValueError, match=r"batch: expected two tensors .*\(8, 3, 32, 128\) and \(3, 16\)"):
        ft.training_step(model, (_Pairs().x, _Pairs().tokens[:3]), opt)


def test_evaluate_word_spotting_on_the_gpu_matches_the_cpu():
    from course_utils.device_guard import virtual_cuda

    words, lexicons = WORDS[:4], [WORDS[:4]] * 4
    tok = small.small_clip_tokenizer()
    ev = evaluation.EvalSet(_Pairs().x[:4], words, lexicons, WORDS[:4], tok(WORDS[:4]),
                            ws.positives_matrix(lexicons, WORDS[:4]), "crop")
    want = evaluation.evaluate_word_spotting(_model(), ev, return_matrices=True)
    with virtual_cuda() as dev:
        got = evaluation.evaluate_word_spotting(_model().to(dev), ev, return_matrices=True)  # ev on the CPU
    # equal up to float rounding: with the guard on, eval-mode attention skips PyTorch's fused kernel
    for k in ("accuracy", "precision", "recall", "f1", "entropy", "lexicon50_top1", "logit_scale"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    assert got["P"].device.type == "cpu"
    torch.testing.assert_close(got["P"], want["P"], rtol=1e-4, atol=1e-6)
