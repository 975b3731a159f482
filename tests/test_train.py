"""Tests of the shared training loop: determinism, exact resume, checkpoint files."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from course_utils.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from course_utils.loaders import WORKER_START_METHOD, make_loader, worker_context
from course_utils.train import (
    History,
    batch_size_of,
    evaluate,
    fit,
)

EPOCHS = 3
BATCH = 8
N_TRAIN = 64  # 8 steps per epoch


def make_data(n: int = N_TRAIN, seed: int = 123) -> TensorDataset:
    """A tiny 2-class problem: x (n, 6) float32, y (n,) int64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def make_model(init_seed: int = 0) -> nn.Module:
    # Dropout makes the global torch RNG part of the result, so resume must restore it.
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def step_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model(x)
    ce = nn.functional.cross_entropy(logits, y)
    reg = 1e-3 * sum((p**2).sum() for p in model.parameters())
    return {"loss": ce + reg, "ce": ce, "reg": reg}


def run(ckpt_dir: Path | None, *, seed: int = 0, init_seed: int = 0, val: bool = True,
        **kw) -> tuple[nn.Module, History]:
    """Build model, optimizer and scheduler from scratch and call fit."""
    model = make_model(init_seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hist = fit(model, step_fn, make_data(), epochs=kw.pop("epochs", EPOCHS), batch_size=BATCH,
               optimizer=opt, scheduler=sched, val_set=make_data(24, seed=7) if val else None,
               ckpt_dir=ckpt_dir, seed=seed, progress=False, **kw)
    return model, hist


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), f"parameter {name} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, History, Path]:
    """One uninterrupted 3-epoch run, shared by the tests that compare against it."""
    d = tmp_path_factory.mktemp("ref")
    model, hist = run(d)
    return model, hist, d


def test_uninterrupted_run_records_history(reference) -> None:
    _, hist, d = reference
    assert hist.epochs == [1, 2, 3]
    assert set(hist.train) == {"loss", "ce", "reg"}
    assert set(hist.val) == {"loss", "ce", "reg"}
    assert all(len(v) == EPOCHS for v in [*hist.train.values(), *hist.val.values()])
    assert hist.lr == pytest.approx([1e-2, 5e-3, 2.5e-3])  # StepLR stepped once per epoch
    assert len(hist.wall_s) == EPOCHS
    assert [p.name for p in sorted(d.glob("epoch_*.pt"))] == [
        "epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    assert latest_checkpoint(d) == d / "epoch_003.pt"


def test_interrupted_then_resumed_is_bit_identical(reference, tmp_path: Path, capsys) -> None:
    ref_model, ref_hist, _ = reference
    # 12 steps = all of epoch 1 (8 steps) and half of epoch 2: only epoch_001.pt exists.
    _, partial = run(tmp_path, max_steps=12)
    assert partial.epochs == [1]
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_001.pt"
    # A new process would build a fresh model with another init: resume must overwrite it all.
    model, hist = run(tmp_path, init_seed=99)
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(model, ref_model)
    assert hist.numbers() == ref_hist.numbers()


def test_same_seed_identical_different_seed_differs(reference) -> None:
    ref_model, ref_hist, _ = reference
    model, hist = run(None)
    assert_same_weights(model, ref_model)
    assert hist.numbers() == ref_hist.numbers()
    other, other_hist = run(None, seed=1)
    assert other_hist.train["loss"] != ref_hist.train["loss"]
    assert any(not torch.equal(a, b) for a, b in
               zip(other.state_dict().values(), ref_model.state_dict().values(), strict=True))


def test_finished_run_returns_stored_history_without_training(reference, capsys) -> None:
    ref_model, ref_hist, d = reference
    files_before = {p: p.stat().st_mtime_ns for p in d.glob("epoch_*.pt")}

    def must_not_train(model, batch):
        raise AssertionError("fit trained although every epoch was done")

    model = make_model(init_seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = fit(model, must_not_train, make_data(), epochs=EPOCHS, batch_size=BATCH,
               optimizer=opt, ckpt_dir=d, progress=False)
    assert "already done" in capsys.readouterr().out
    assert hist.to_dict() == ref_hist.to_dict()
    assert_same_weights(model, ref_model)  # the trained weights are loaded
    assert {p: p.stat().st_mtime_ns for p in d.glob("epoch_*.pt")} == files_before


def test_checkpoint_loads_with_weights_only(reference) -> None:
    ref_model, ref_hist, d = reference
    raw = torch.load(d / "epoch_003.pt", weights_only=True)
    assert raw["epoch"] == 3 and raw["format_version"] == 1
    assert {"model", "optimizer", "scheduler", "history", "rng", "extra"} <= set(raw)
    assert set(raw["rng"]) >= {"torch", "numpy", "python"}
    model = make_model(init_seed=42)
    ckpt = load_checkpoint(d / "epoch_003.pt", model=model)
    assert_same_weights(model, ref_model)
    assert ckpt["history"].numbers() == ref_hist.numbers()


def test_keep_epochs_keeps_listed_and_latest(tmp_path: Path) -> None:
    run(tmp_path, epochs=4, val=False, keep_epochs=[2])
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_002.pt", "epoch_004.pt"]


def test_history_without_validation_and_roundtrip(tmp_path: Path) -> None:
    _, hist = run(None, epochs=1, val=False)
    assert hist.val == {}
    assert History.from_dict(hist.to_dict()) == hist
    assert hist.best("loss")[0] == 1  # falls back to the training loss


def test_truncated_checkpoint_raises_clear_error(reference, tmp_path: Path) -> None:
    _, _, d = reference
    data = (d / "epoch_002.pt").read_bytes()
    bad = tmp_path / "epoch_002.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="epoch_002.pt") as info:
        load_checkpoint(bad)
    assert "Delete it and rerun" in str(info.value)
    # fit on a folder whose latest checkpoint is truncated says the same, not a torch traceback.
    with pytest.raises(CheckpointError, match="epoch_002.pt"):
        run(tmp_path)


def test_garbage_and_foreign_files_raise_checkpoint_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "plain_state_dict.pt"
    torch.save(make_model().state_dict(), foreign)
    with pytest.raises(CheckpointError, match="plain_state_dict.pt.*not a checkpoint"):
        load_checkpoint(foreign)


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "epoch_001.pt", model=make_model(), epoch=1,
                           history=History())
    other = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 2))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=other)
    msg = str(info.value)
    assert "epoch_001.pt" in msg
    assert "missing keys [2.weight, 2.bias]" in msg
    assert "shape mismatches [3.weight: checkpoint (2, 16) vs model (2, 3)]" in msg


def test_atomic_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "epoch_001.pt", model=make_model(), epoch=1, history=History())
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_001.pt"]


def test_resume_false_starts_over(tmp_path: Path, capsys) -> None:
    run(tmp_path, epochs=2, val=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, hist = run(tmp_path, epochs=1, val=False, resume=False)
    assert hist.epochs == [1]
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_001.pt"]


def test_step_fn_errors_are_explained() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="'loss'"):
        fit(model, lambda m, b: {"ce": m(b[0]).sum()}, make_data(), epochs=1, batch_size=BATCH,
            optimizer=opt, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        fit(model, lambda m, b: {"loss": m(b[0])}, make_data(), epochs=1, batch_size=BATCH,
            optimizer=opt, progress=False)


def test_history_plot_draws_train_solid_val_dashed(reference) -> None:
    import matplotlib

    matplotlib.use("Agg")
    _, hist, _ = reference
    ax = hist.plot(keys=["loss"])
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles == {"train loss": "-", "val loss": "--"}


def test_evaluate_weights_batches_by_size() -> None:
    # 20 examples in batches of 8, 8, 4: a plain mean of batch means would be biased.
    data = TensorDataset(torch.arange(20, dtype=torch.float32).unsqueeze(1))
    model = nn.Identity()
    metrics = evaluate(model, lambda m, b: {"loss": m(b[0]).mean()}, data, batch_size=8)
    assert metrics["loss"] == pytest.approx(9.5)


def test_batch_size_conventions() -> None:
    x, y = torch.zeros(5, 3), torch.zeros(5)
    assert batch_size_of([x, y]) == 5  # default_collate of (x, y) pairs
    assert batch_size_of({"image": x, "label": y}) == 5
    images = [torch.zeros(3, 8, 8), torch.zeros(3, 6, 6)]
    assert batch_size_of((images, [{"boxes": torch.zeros(4, 4)}] * 2)) == 2  # detection style
    assert batch_size_of([{"boxes": torch.zeros(4, 4)}] * 3) == 3  # list of examples
    assert batch_size_of(["a", "b"]) == 2


def test_only_the_latest_checkpoint_keeps_optimizer_state(reference) -> None:
    _, _, ckpt_dir = reference
    ckpts = list_checkpoints(ckpt_dir)
    states = {e: torch.load(p, weights_only=True)["optimizer"] for e, p in ckpts.items()}
    latest = max(states)
    assert states[latest] is not None and all(states[e] is None for e in states if e != latest)


def _two_epochs(model: nn.Module, **kw) -> History:
    return fit(model, step_fn, make_data(), epochs=2, batch_size=8, progress=False, seed=3,
               optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def test_mixed_precision_changes_nothing_on_the_cpu() -> None:
    plain, other = make_model(), make_model()  # with dropout: the global stream must not move
    assert _two_epochs(plain).train == _two_epochs(other, mixed_precision=True).train
    assert_same_weights(plain, other)


def test_loader_workers_give_a_repeatable_run() -> None:
    # Another order than in the main process (measured), but the same seed repeats it exactly.
    a, b, c = make_model(), make_model(), make_model()
    with_workers = _two_epochs(a, num_workers=1).train
    assert _two_epochs(b, num_workers=1).train == with_workers
    assert_same_weights(a, b)
    assert _two_epochs(c).train != with_workers


_HELD = threading.Lock()  # held by a thread of the test process while a loader's workers run


class _NeedsTheLock(torch.utils.data.Dataset):
    """Takes a module-level lock per item: a worker forked while another thread of the parent
    holds it would wait forever (the kernel's I/O threads hold locks like this one)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        with _HELD:
            return torch.tensor(float(i))


def test_loader_workers_start_from_a_forkserver_not_from_our_threads() -> None:
    assert worker_context(0) is None
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        worker_context(-1)
    loader = make_loader(_NeedsTheLock(), 2, None, shuffle_seed=None, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == WORKER_START_METHOD == "forkserver"
    loader.timeout = 60  # a worker stuck on the inherited lock raises instead of hanging the suite
    release = threading.Event()
    holder = threading.Thread(target=lambda: (_HELD.acquire(), release.wait(), _HELD.release()))
    holder.start()
    try:
        time.sleep(0.1)
        assert _HELD.locked()
        batches = [b.tolist() for b in loader]
    finally:
        release.set()
        holder.join()
    assert batches == [[0.0, 1.0], [2.0, 3.0]]
