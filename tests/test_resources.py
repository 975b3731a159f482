"""ResourceMonitor readings, and History's per-step resource records (Fig. 2.5)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import matplotlib
import pytest
import torch
from torch import nn

from course_utils.checkpoints import load_checkpoint, save_checkpoint
from course_utils.history import RESOURCE_SERIES, History
from course_utils.resources import RESOURCE_KEYS, ResourceMonitor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# The docstring states ~50 us on a shared 2-core VM; the bound leaves room for a loaded runner.
MAX_SAMPLE_US = 500.0


def cpu_history(steps: int = 6, monitor: ResourceMonitor | None = None) -> History:
    """A two-epoch history with one real CPU sample per step (GPU fields NaN)."""
    monitor = monitor or ResourceMonitor("cpu")
    hist = History()
    for step in range(1, steps + 1):
        sum(i * i for i in range(2000))  # a little CPU work between samples
        hist.record_resources(step, monitor.sample())
        if step % (steps // 2) == 0:
            epoch = step // (steps // 2)
            hist.append(epoch, {"loss": 1.0 / epoch}, {"loss": 1.5 / epoch}, lr=1e-3, wall_s=0.1)
    return hist


# --------------------------------------------------------------------------------------------
# ResourceMonitor
# --------------------------------------------------------------------------------------------


def test_sample_keys_and_ranges_on_cpu() -> None:
    monitor = ResourceMonitor(torch.device("cpu"))
    first = monitor.sample()
    # busy for a while: process CPU times tick in 10 ms steps, and a fast machine ran a fixed
    # loop in less than one tick (cpu_percent read 0.0)
    start = time.perf_counter()
    while time.perf_counter() - start < 0.3:
        sum(i * i for i in range(10_000))
    second = monitor.sample()
    for s in (first, second):
        assert tuple(s) == RESOURCE_KEYS
        assert all(isinstance(v, float) for v in s.values())
        assert s["rss_gb"] > 0.01  # a Python process with torch loaded holds well over 10 MB
        assert s["cpu_percent"] >= 0.0
        assert math.isnan(s["gpu_util"]) and math.isnan(s["gpu_mem_gb"])
    assert 0.0 <= first["time_s"] < second["time_s"]
    assert second["cpu_percent"] > 0.0  # the loop above kept a core busy
    assert monitor.gpu_util_error == "not a CUDA device"


def test_sample_cost_is_small() -> None:
    monitor = ResourceMonitor("cpu")
    costs = []
    for _ in range(300):
        t0 = time.perf_counter()
        monitor.sample()
        costs.append(time.perf_counter() - t0)
    median_us = sorted(costs)[len(costs) // 2] * 1e6
    assert median_us < MAX_SAMPLE_US, f"median sample cost {median_us:.0f} us"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", ""])
def test_bad_device_name_is_named_in_the_error(bad: str) -> None:
    with pytest.raises(ValueError, match=f"device {bad!r} is not a device name"):
        ResourceMonitor(bad)


def test_device_of_wrong_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match="torch.device or a string, got int 0"):
        ResourceMonitor(0)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="'cuda:0' is CUDA but this process has no usable GPU"):
        ResourceMonitor("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_sample_reads_gpu_memory() -> None:
    monitor = ResourceMonitor("cuda")
    assert monitor.device.index is not None
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=monitor.device)  # 64 MiB
    s = monitor.sample()
    assert s["gpu_mem_gb"] >= x.numel() / 1e9
    # gpu_util is a percentage, or NaN with the reason kept (e.g. no pynvml).
    assert (0.0 <= s["gpu_util"] <= 100.0) or monitor.gpu_util_error


def test_gpu_util_interval_is_validated() -> None:
    with pytest.raises(ValueError, match="gpu_util_every_s"):
        ResourceMonitor("cpu", gpu_util_every_s=-1)


# --------------------------------------------------------------------------------------------
# History.resources
# --------------------------------------------------------------------------------------------


def test_record_resources_fills_every_series() -> None:
    hist = cpu_history(steps=6)
    assert tuple(hist.resources) == RESOURCE_SERIES
    assert hist.resources["step"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert all(len(v) == 6 for v in hist.resources.values())
    assert all(math.isnan(x) for x in hist.resources["gpu_util"])
    # a sample lacking a key stores NaN there
    hist.record_resources(7, {"time_s": 9.0})
    assert hist.resources["time_s"][-1] == 9.0 and math.isnan(hist.resources["rss_gb"][-1])


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_record_resources_rejects_bad_steps(step) -> None:
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        History().record_resources(step, {})


def test_record_resources_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['gpu_temp'\]"):
        History().record_resources(1, {"time_s": 0.0, "gpu_temp": 40.0})


def test_resources_round_trip_through_dict_and_json() -> None:
    hist = cpu_history()
    d = hist.to_dict()
    assert d["resources"]["gpu_util"] == [None] * 6  # NaN written as None: strict JSON
    again = History.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert again == hist
    assert math.isnan(again.resources["gpu_mem_gb"][0])
    assert again.resources["rss_gb"] == hist.resources["rss_gb"]


def test_older_dicts_without_resources_still_load() -> None:
    old = History()
    old.append(1, {"loss": 0.5}, None, lr=0.1, wall_s=1.0)
    d = old.to_dict()
    del d["resources"]
    loaded = History.from_dict(d)
    assert loaded.resources == {} and loaded == old


def test_resources_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    hist = cpu_history()
    model = nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "epoch_002.pt", model=model, epoch=2, history=hist)
    raw = torch.load(path, weights_only=True)
    assert raw["history"]["resources"]["step"] == hist.resources["step"]
    loaded = load_checkpoint(path, model=nn.Linear(3, 2))["history"]
    assert loaded == hist
    assert loaded.resources["cpu_percent"] == hist.resources["cpu_percent"]
    assert all(math.isnan(x) for x in loaded.resources["gpu_util"])


def test_numbers_exclude_resources() -> None:
    a, b = cpu_history(), cpu_history()
    assert a.resources["time_s"] != b.resources["time_s"]  # two runs never time alike
    assert a.numbers() == b.numbers()
    assert "resources" not in a.numbers() and "wall_s" not in a.numbers()
    assert a != b  # == still compares everything


# --------------------------------------------------------------------------------------------
# plot_resources (Fig. 2.5)
# --------------------------------------------------------------------------------------------


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_plot_resources_on_cpu_draws_four_panels(tmp_path: Path) -> None:
    hist = cpu_history()
    axes = hist.plot_resources()
    assert axes.shape == (4,)
    cpu, gpu, rss, gpu_mem = axes
    assert len(cpu.lines) == 1 and len(rss.lines) == 1
    assert _texts(gpu) == ["no GPU in this run"] and _texts(gpu_mem) == ["no GPU in this run"]
    assert not gpu.lines and not gpu_mem.lines
    assert cpu.get_xlabel() == "training time (min)"
    x = cpu.lines[0].get_xdata()
    assert x[-1] == pytest.approx(hist.resources["time_s"][-1] / 60)
    fig = cpu.figure
    out = tmp_path / "fig2_5.png"
    fig.savefig(out)
    plt.close(fig)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000


def test_plot_resources_draws_gpu_panels_when_there_is_data() -> None:
    hist = History()
    for step in range(1, 5):
        hist.record_resources(step, {"time_s": 30.0 * step, "cpu_percent": 80.0, "rss_gb": 2.5,
                                     "gpu_util": 25.0 * step, "gpu_mem_gb": 1.2})
    axes = hist.plot_resources()
    assert all(len(ax.lines) == 1 and not ax.texts for ax in axes)
    assert list(axes[1].lines[0].get_ydata()) == [25.0, 50.0, 75.0, 100.0]
    assert list(axes[1].lines[0].get_xdata()) == [0.5, 1.0, 1.5, 2.0]
    plt.close(axes[0].figure)


def test_plot_resources_joins_a_resumed_run_in_time() -> None:
    # The second monitor (after a resume) restarts its clock at 0.
    hist = History()
    for step, t in enumerate([60.0, 120.0, 30.0, 90.0], start=1):
        hist.record_resources(step, {"time_s": t, "cpu_percent": 50.0, "rss_gb": 1.0})
    axes = hist.plot_resources()
    assert list(axes[0].lines[0].get_xdata()) == [1.0, 2.0, 2.5, 3.5]
    plt.close(axes[0].figure)


def test_plot_resources_into_given_axes_and_errors() -> None:
    fig, grid = plt.subplots(1, 4)
    axes = cpu_history().plot_resources(grid)
    assert list(axes) == list(grid)
    with pytest.raises(ValueError, match="draws 4 panels, got 2 axes"):
        cpu_history().plot_resources(grid[:2])
    plt.close(fig)
    with pytest.raises(ValueError, match="no resource records"):
        History().plot_resources()
