"""Seeding and the notebook banner."""

from __future__ import annotations

import random

import numpy as np
import torch

from course_utils.env import get_device, seed_everything, setup_notebook


def draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.nn.Linear(4, 2).weight.sum().item()


def test_same_seed_same_numbers():
    seed_everything(3)
    a = draw()
    seed_everything(3)
    assert draw() == a
    seed_everything(4)
    assert draw() != a


def test_returned_generator_is_seeded():
    g1, g2 = seed_everything(9), seed_everything(9)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_device_override(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")


def test_banner_names_profile_device_and_versions(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "smoke")
    env = setup_notebook("01 test", seed=5)
    out = capsys.readouterr().out
    assert env.profile == "smoke" and env.seed == 5
    for word in ("profile  : smoke", "device", "torch", "torchvision", "open_clip", "segment-anything"):
        assert word in out


def test_figures_go_to_one_folder(tmp_path, monkeypatch):
    from pathlib import Path

    import matplotlib.pyplot as plt

    from course_utils import figures

    monkeypatch.setenv("COURSE_FIGURES", str(tmp_path / "figs"))
    fig = plt.figure()
    assert figures.savefig(fig, "01_test") == tmp_path / "figs" / "01_test.png"
    assert (tmp_path / "figs" / "01_test.png").stat().st_size > 0
    monkeypatch.delenv("COURSE_FIGURES")
    monkeypatch.chdir(tmp_path)  # as a kernel running in solutions/ would
    assert figures.figures_dir() == Path(figures.__file__).resolve().parents[1] / "figures"
