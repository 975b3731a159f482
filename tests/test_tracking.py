"""The local tracker: TensorBoard event files written by Tracker, read back by TensorBoard itself."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from course_utils.resources import ResourceMonitor
from course_utils.tracking import Tracker, read_log, weights_sha256


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


# --------------------------------------------------------------------------------------------
# weights_sha256
# --------------------------------------------------------------------------------------------


def test_weights_sha256_is_stable_and_sensitive() -> None:
    a, b = make_model(0), make_model(0)
    h = weights_sha256(a)
    assert len(h) == 64 and int(h, 16) >= 0
    assert weights_sha256(b) == h == weights_sha256(a)  # same weights, separate modules
    assert weights_sha256(copy.deepcopy(a)) == h
    assert weights_sha256(make_model(1)) != h
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6  # one weight, barely moved
    assert weights_sha256(b) != h
    with torch.no_grad():
        b[0].weight[0, 0] -= 1e-6
    b[1].running_mean += 1.0  # buffers count too
    assert weights_sha256(b) != h


def test_weights_sha256_sees_dtype_and_shape() -> None:
    a = make_model(0)
    assert weights_sha256(copy.deepcopy(a).double()) != weights_sha256(a)
    # same bytes, other shape: (2, 3) vs (3, 2) of the same six zeros
    m1, m2 = nn.Module(), nn.Module()
    m1.w = nn.Parameter(torch.zeros(2, 3))
    m2.w = nn.Parameter(torch.zeros(3, 2))
    assert weights_sha256(m1) != weights_sha256(m2)


def test_weights_sha256_handles_bfloat16_and_non_contiguous() -> None:
    m = nn.Module()
    m.w = nn.Parameter(torch.arange(12.0).reshape(3, 4).t())  # a transposed, strided view
    m2 = nn.Module()
    m2.w = nn.Parameter(torch.arange(12.0).reshape(3, 4).t().contiguous())
    assert weights_sha256(m) == weights_sha256(m2)
    assert len(weights_sha256(copy.deepcopy(m).to(torch.bfloat16))) == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_weights_sha256_is_device_independent() -> None:
    a = make_model(0)
    assert weights_sha256(copy.deepcopy(a).cuda()) == weights_sha256(a)


def test_weights_sha256_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got dict"):
        weights_sha256({})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Tracker and read_log
# --------------------------------------------------------------------------------------------


def test_tracker_writes_what_read_log_reads(tmp_path: Path) -> None:
    model = make_model(0)
    init_hash = weights_sha256(model)
    info = {"lr": 5e-5, "epochs": 2, "betas": (0.9, 0.98), "ckpt_dir": tmp_path / "ckpt",
            "device": torch.device("cpu")}
    log_dir = tmp_path / "tb"
    monitor = ResourceMonitor("cpu")
    with Tracker(log_dir) as tracker:
        tracker.log_run(info, init_hash)
        for step in range(1, 5):
            tracker.log_step(step, {"loss": 1.0 / step, "loss_image": torch.tensor(0.5)})
            tracker.log_resources(step, monitor.sample())
            if step % 2 == 0:
                epoch = step // 2
                val = {"loss": 2.0 / epoch} if epoch == 2 else None
                tracker.log_epoch(epoch, {"loss": 0.9 / epoch}, val, lr=5e-5 * epoch)
    log = read_log(log_dir)
    s = log["scalars"]
    assert s["train_step/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]
    assert [v for _, v in s["train_step/loss_image"]] == [0.5] * 4
    # epoch scalars written after larger step numbers are all kept (no "orphan" purging)
    assert s["train/loss"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.45))]
    assert s["val/loss"] == [(2, 1.0)]
    assert [(e, pytest.approx(lr, rel=1e-6)) for e, lr in s["lr"]] == [(1, 5e-5), (2, 1e-4)]
    # resources: NaN GPU readings skipped, the rest one point per step
    assert [step for step, _ in s["resources/rss_gb"]] == [1, 2, 3, 4]
    assert all(v > 0 for _, v in s["resources/rss_gb"])
    assert "resources/gpu_util" not in s and "resources/gpu_mem_gb" not in s
    # text: the init hash verbatim, the settings as JSON
    assert log["text"]["run/init_weights_sha256"] == init_hash
    back = json.loads(log["text"]["run/info"])
    assert back["lr"] == 5e-5 and back["epochs"] == 2 and back["betas"] == [0.9, 0.98]
    assert back["ckpt_dir"] == str(tmp_path / "ckpt") and back["device"] == "cpu"


def test_non_finite_values_are_skipped(tmp_path: Path) -> None:
    with Tracker(tmp_path) as tracker:
        tracker.log_step(1, {"loss": math.nan, "acc": 0.5})
        tracker.log_step(2, {"loss": math.inf, "acc": np.float32(0.75)})
        tracker.log_step(3, {"loss": 0.1, "acc": 1})
    s = read_log(tmp_path)["scalars"]
    assert s["train_step/loss"] == [(3, pytest.approx(0.1))]
    assert s["train_step/acc"] == [(1, 0.5), (2, 0.75), (3, 1.0)]


def test_a_resumed_run_adds_a_second_event_file(tmp_path: Path) -> None:
    with Tracker(tmp_path) as tracker:
        tracker.log_epoch(1, {"loss": 1.0}, None, lr=0.1)
    with Tracker(tmp_path) as tracker:
        tracker.log_epoch(2, {"loss": 0.5}, None, lr=0.1)
    assert len(list(tmp_path.glob("events.out.tfevents*"))) == 2
    assert read_log(tmp_path)["scalars"]["train/loss"] == [(1, 1.0), (2, 0.5)]


def test_flush_makes_events_readable_before_close(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path)
    tracker.log_step(7, {"loss": 0.25})
    tracker.flush()
    assert read_log(tmp_path)["scalars"]["train_step/loss"] == [(7, 0.25)]
    tracker.close()
    tracker.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="the tracker is closed"):
        tracker.log_step(8, {"loss": 0.2})


def test_log_dir_must_be_a_folder(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        Tracker(a_file)
    with pytest.raises(ValueError, match="log_dir is empty"):
        Tracker("")
    with pytest.raises(TypeError, match="log_dir must be a str or pathlib.Path, got int"):
        Tracker(3)  # type: ignore[arg-type]
    nested = tmp_path / "a" / "b"
    Tracker(nested).close()
    assert nested.is_dir()


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    with Tracker(tmp_path) as tracker:
        with pytest.raises(ValueError, match="log_step: step must be an int >= 0"):
            tracker.log_step(-1, {"loss": 1.0})
        with pytest.raises(ValueError, match="log_epoch: step must be an int >= 0"):
            tracker.log_epoch(1.0, {"loss": 1.0}, None, lr=0.1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="train_step/loss: expected a number, got str"):
            tracker.log_step(1, {"loss": "low"})
        with pytest.raises(TypeError, match="a tensor of shape \\(2,\\)"):
            tracker.log_step(1, {"loss": torch.zeros(2)})
        with pytest.raises(ValueError, match="64 lower-case hex digits"):
            tracker.log_run({}, "abc")
        with pytest.raises(TypeError, match="string keys"):
            tracker.log_run({1: 2}, "0" * 64)  # type: ignore[dict-item]


def test_read_log_needs_event_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no folder"):
        read_log(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no TensorBoard event file"):
        read_log(tmp_path)


def test_fit_records_resources_and_logs_to_the_tracker(tmp_path):
    """fit: one resource sample per optimizer step in the history; with ``track_dir`` a log that
    TensorBoard's reader opens, with the run's settings and the initial weights' sha256."""
    from course_utils.train import fit

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    init = weights_sha256(net)
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
    step = lambda m, b: {"loss": ((m(b[0]) - b[1]) ** 2).mean()}  # noqa: E731
    hist = fit(net, step, data, epochs=2, batch_size=4, optimizer=torch.optim.SGD(net.parameters(), 0.1),
               progress=False, track_dir=tmp_path / "tb", ckpt_dir=tmp_path / "ckpt")
    assert hist.resources["step"] == [1, 2, 3, 4, 5, 6]  # 3 steps an epoch
    assert all(r > 0 for r in hist.resources["rss_gb"])
    log = read_log(tmp_path / "tb")
    assert log["text"]["run/init_weights_sha256"].strip() == init != weights_sha256(net)
    assert [s for s, _ in log["scalars"]["train/loss"]] == [1, 2]
    assert [v for _, v in log["scalars"]["train/loss"]] == pytest.approx(hist.train["loss"], rel=1e-6)
    assert [s for s, _ in log["scalars"]["resources/rss_gb"]] == [1, 2, 3, 4, 5, 6]
    # a run with no tracker writes no log, and its numbers are the tracked run's
    torch.manual_seed(0)
    net2 = torch.nn.Linear(3, 1)
    hist2 = fit(net2, step, data, epochs=2, batch_size=4, optimizer=torch.optim.SGD(net2.parameters(), 0.1),
                progress=False)
    assert hist2.numbers() == hist.numbers()
