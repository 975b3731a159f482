"""``COURSE_OFFLINE=1`` opens no socket anywhere a download could start.

Data (real SVT or SynthSVT), the CLIP (ViT-B/32 or the small one), the CLIP ODITS starts from,
the mask source (SAM or boxes) and the RPN's MobileNetV2 backbone are all loaded with downloads
allowed, as the ``full`` and ``fullpath`` profiles do; with ``COURSE_OFFLINE=1`` every one of them
must fall back without touching the network.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest

from course_utils.clip.data import load_svt_data
from course_utils.clip.loading import load_clip
from course_utils.clip.masks import BoxMaskSource, load_mask_source
from course_utils.profiles import get_config
from course_utils.recipes.odits import load_start_clip
from course_utils.rpn import build_backbone

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way Python opens a connection records the attempt and fails."""
    attempts: list[str] = []

    def refuse(name: str):
        def blocked(*args, **kwargs):
            attempts.append(f"{name}{args[1:] if name.startswith('socket.') else args}")
            raise OSError(f"test: {name} called with COURSE_OFFLINE=1")
        return blocked

    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    return attempts


def test_the_guard_sees_a_connection(no_sockets: list[str]) -> None:
    # the guard itself must be able to fail: a real attempt is recorded
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))
    with socket.socket() as s, pytest.raises(OSError):
        s.connect(("127.0.0.1", 9))
    assert len(no_sockets) == 2


@pytest.fixture
def offline_empty_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """``COURSE_OFFLINE=1``, an empty course cache, and neither of open_clip's caches (the Hugging
    Face hub's, read from ``huggingface_hub.constants`` at call time, and ``~/.cache/clip``)."""
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_course_offline_opens_no_socket_in_06_08_loading(no_sockets: list[str], offline_empty_caches: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    svt_cfg = get_config("smoke").svt
    data = load_svt_data(svt_cfg, allow_download=True)
    assert not data.real and "SynthSVT" in data.source and "COURSE_OFFLINE=1" in data.source
    clip = load_clip("full")
    assert clip.kind == "small"
    start = load_start_clip("full", "smoke")
    assert start.kind == "small" and not start.info.get("finetuned")
    source, line = load_mask_source("sam", max_objects=4)
    assert isinstance(source, BoxMaskSource) and "fallback" in line
    out = capsys.readouterr().out
    assert "COURSE_OFFLINE=1 is set" in out
    assert no_sockets == []


def test_course_offline_opens_no_socket_for_the_rpn_backbone(no_sockets: list[str], offline_empty_caches: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    # (the random-weights fallbacks of load_clip / load_mask_source take the same fetch as above;
    # tests/test_downloads.py builds them)
    backbone = build_backbone("mobilenet_v2", 32, pretrained=True)
    assert backbone.out_channels == 1280
    assert capsys.readouterr().out.splitlines() == [
        "[offline] could not download mobilenet_v2_imagenet (COURSE_OFFLINE=1 is set); "
        "using MobileNetV2 from random initialisation instead."]
    assert no_sockets == []


def test_benchmarks_leave_the_network_to_the_registry() -> None:
    # benchmarks load data and weights through course_utils only, so COURSE_OFFLINE (decided in
    # registry.offline_mode) holds for them too: no socket, HTTP client or hub download of their own
    network = re.compile(r"\b(socket|urllib|requests|http\.client|hf_hub_download|create_connection)\b")
    hits = [f"{path.name}:{i}" for path in sorted(BENCHMARKS.glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if network.search(line) and not line.lstrip().startswith("#")]
    assert hits == []
