"""``COURSE_OFFLINE=1`` opens no socket anywhere in notebooks 06-08's loading path.

Data (real SVT or SynthSVT), the CLIP (ViT-B/32 or the small one), the CLIP ODITS starts from and
the mask source (SAM or boxes) are all loaded with downloads allowed, as the ``full`` profile
does; with ``COURSE_OFFLINE=1`` every one of them must fall back without touching the network.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from course_utils.clip.data import load_svt_data
from course_utils.clip.loading import load_clip
from course_utils.clip.masks import BoxMaskSource, load_mask_source
from course_utils.profiles import get_config
from course_utils.recipes.odits import load_start_clip


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


def test_course_offline_opens_no_socket_in_06_08_loading(no_sockets: list[str], monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached ViT-B/32 either
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
