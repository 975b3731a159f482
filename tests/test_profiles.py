"""Profiles change sizes only: same sections and knobs everywhere, clear errors."""

from __future__ import annotations

import pytest

from course_utils import profiles


def test_every_profile_has_the_same_knobs():
    all_cfg = profiles.all_profiles()
    ref = all_cfg["full"]
    for name, cfg in all_cfg.items():
        assert set(cfg) == set(ref), name
        for section in ref:
            if section == "name":
                continue
            assert set(cfg[section]) == set(ref[section]), f"{name}.{section}"
            for knob, value in ref[section].items():
                assert type(cfg[section][knob]) is type(value), f"{name}.{section}.{knob}"


def test_selection_from_environment(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "cpu")
    assert profiles.get_config().name == "cpu"
    monkeypatch.setenv("COURSE_PROFILE", "auto")
    assert profiles.get_config().name in ("cpu", "full")
    monkeypatch.delenv("COURSE_PROFILE")
    import torch
    assert profiles.get_config().name == ("full" if torch.cuda.is_available() else "cpu")


def test_unknown_profile_and_knob_errors(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "gpu")
    with pytest.raises(ValueError, match="COURSE_PROFILE='gpu' is not a profile"):
        profiles.get_config()
    cfg = profiles.get_config("smoke")
    with pytest.raises(AttributeError, match="no knob 'imagesize'"):
        _ = cfg.shapes.imagesize


def test_config_is_a_copy():
    a = profiles.get_config("smoke")
    a.shapes["image_size"] = 1
    assert profiles.get_config("smoke").shapes.image_size != 1
