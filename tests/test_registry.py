"""Tests of the download registry.  No network: every download goes through a local
``downloader`` that copies a file, as pooch's downloader protocol allows."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from course_utils import registry
from course_utils.registry import (
    ChecksumError,
    Entry,
    OfflineError,
    fetch,
    fetch_or_fallback,
    register,
    zip_contains,
)

PAYLOAD = b"course weights\n" * 1000


class CopyDownloader:
    """pooch downloader that copies ``source`` (or fails like a dead network) and counts calls."""

    def __init__(self, source: Path | None, fail: BaseException | None = None,
                 truncate: bool = False) -> None:
        self.source, self.fail, self.truncate, self.calls = source, fail, truncate, []

    def __call__(self, url: str, output_file: str, pooch_obj: Any) -> None:
        self.calls.append(url)
        if self.fail is not None:
            raise self.fail
        assert self.source is not None
        if self.truncate:  # an interrupted transfer
            data = self.source.read_bytes()
            Path(output_file).write_bytes(data[: len(data) // 2])
        else:
            shutil.copyfile(self.source, output_file)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Own cache folder, network allowed (the downloader is local), private registry copy."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return tmp_path


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    p = tmp_path / "upstream" / "tiny.bin"
    p.parent.mkdir()
    p.write_bytes(PAYLOAD)
    return p


def make_entry(sha256: str | None = hashlib.sha256(PAYLOAD).hexdigest(), **kw: Any) -> Entry:
    defaults: dict[str, Any] = dict(
        name="tiny", urls=["https://example.invalid/a/tiny.bin", "https://example.invalid/b/tiny.bin"],
        sha256=sha256, filename="tiny.bin",
        kind="weights", description="test file", fallback="the built-in tiny model")
    defaults.update(kw)
    return register(Entry(**defaults), overwrite=True)


def test_good_hash_is_cached_and_not_downloaded_twice(source: Path, isolated: Path) -> None:
    make_entry()
    dl = CopyDownloader(source)
    path = fetch("tiny", downloader=dl)
    assert path == isolated / "cache" / "weights" / "tiny.bin"  # COURSE_CACHE respected
    assert path.read_bytes() == PAYLOAD
    assert fetch("tiny", downloader=dl) == path
    assert len(dl.calls) == 1


def test_bad_hash_raises_error_naming_the_file(source: Path) -> None:
    entry = make_entry(sha256="0" * 64)
    dl = CopyDownloader(source)
    with pytest.raises(ChecksumError, match="tiny.bin"):
        fetch("tiny", downloader=dl)
    assert len(dl.calls) == 2  # every mirror was tried
    assert not entry.cached_path().exists()  # pooch deletes a download that fails the hash


def test_truncated_download_raises_error_naming_the_file(source: Path) -> None:
    make_entry()
    with pytest.raises(ChecksumError, match="tiny.bin"):
        fetch("tiny", downloader=CopyDownloader(source, truncate=True))


def test_size_mismatch_is_reported_as_truncated(source: Path) -> None:
    make_entry(sha256=None, sha256_note="test", size_bytes=len(PAYLOAD) * 2)
    with pytest.raises(ChecksumError, match=r"tiny.bin is truncated"):
        fetch("tiny", downloader=CopyDownloader(source))


def test_corrupted_cache_file_is_downloaded_again(source: Path) -> None:
    entry = make_entry()
    dl = CopyDownloader(source)
    path = fetch("tiny", downloader=dl)
    path.write_bytes(PAYLOAD[:100])  # e.g. a copy cut short
    assert fetch("tiny", downloader=dl) == path
    assert len(dl.calls) == 2
    assert entry.cached_path().read_bytes() == PAYLOAD


def test_offline_env_uses_fallback_and_prints_one_line(
    source: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_entry()
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    dl = CopyDownloader(source)
    obj, where = fetch_or_fallback("tiny", lambda: "tiny-model", downloader=dl)
    assert obj == "tiny-model"
    assert dl.calls == []  # the network was not even tried
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        "[offline] could not download tiny (COURSE_OFFLINE=1 is set); "
        "using the built-in tiny model instead."]
    assert "fallback" in where


def test_network_failure_uses_fallback_and_prints_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_entry()
    dl = CopyDownloader(None, fail=requests.exceptions.ConnectionError("Name resolution failed"))
    obj, _ = fetch_or_fallback("tiny", lambda: 42, downloader=dl)
    assert obj == 42 and len(dl.calls) == 2
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        "[offline] could not download tiny (no network connection); "
        "using the built-in tiny model instead."]
    with pytest.raises(OfflineError) as info:
        fetch("tiny", downloader=dl)
    assert info.value.reason == "no network connection"


def test_offline_env_still_uses_a_valid_cached_copy(
    source: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_entry()
    path = fetch("tiny", downloader=CopyDownloader(source))
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    dl = CopyDownloader(source)
    obj, where = fetch_or_fallback("tiny", lambda: None, downloader=dl)
    assert obj == path and dl.calls == [] and "sha256 verified" in where
    assert capsys.readouterr().out == ""
    path.write_bytes(b"corrupt")
    with pytest.raises(OfflineError, match="corrupt"):
        fetch("tiny", downloader=dl)


def test_offline_mode_is_the_one_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def connect(address, timeout=None):
        calls.append(address)
        raise OSError("unreachable")

    monkeypatch.setattr(registry.socket, "create_connection", connect)
    for value in ("1", "true", "yes"):
        monkeypatch.setenv("COURSE_OFFLINE", value)
        assert registry.offline_mode() and registry.offline_mode(probe_host="example.org")
    assert calls == []  # COURSE_OFFLINE: decided without a socket
    for value in ("", "0", "false", "no"):
        monkeypatch.setenv("COURSE_OFFLINE", value)
        assert not registry.offline_mode()
    assert calls == []  # no probe host: the network is allowed, nothing was tried
    assert registry.offline_mode(probe_host="example.org", timeout=0.5)
    assert calls == [("example.org", 443)]

    class Answer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(registry.socket, "create_connection", lambda address, timeout=None: Answer())
    assert not registry.offline_mode(probe_host="example.org")


def _zip(path: Path, members: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for m in members:
            zf.writestr(m, "<tagset/>")
    return path


def test_zip_verify_hook(tmp_path: Path) -> None:
    check = zip_contains("svt1/train.xml", "svt1/test.xml")
    check(_zip(tmp_path / "ok.zip", ["svt1/train.xml", "svt1/test.xml", "svt1/img/00_00.jpg"]))
    check(_zip(tmp_path / "nested.zip", ["svt/svt1/train.xml", "svt/svt1/test.xml"]))
    with pytest.raises(ChecksumError, match=r"half.zip lacks \['svt1/test.xml'\]"):
        check(_zip(tmp_path / "half.zip", ["svt1/train.xml"]))
    (tmp_path / "cut.zip").write_bytes((tmp_path / "ok.zip").read_bytes()[:40])
    with pytest.raises(ChecksumError, match="cut.zip is not a readable zip"):
        check(tmp_path / "cut.zip")


def test_verify_hook_failure_deletes_the_download(tmp_path: Path) -> None:
    bad_zip = _zip(tmp_path / "svt.zip", ["svt1/train.xml"])
    entry = make_entry(name="fake_svt", filename="svt.zip", kind="dataset", sha256=None,
                       sha256_note="test archive", verify=zip_contains("svt1/train.xml", "svt1/test.xml"))
    with pytest.raises(ChecksumError, match="svt.zip"):
        fetch("fake_svt", downloader=CopyDownloader(bad_zip))
    assert not entry.cached_path().exists()


def test_entry_validation() -> None:
    with pytest.raises(ValueError, match="sha256_note"):
        Entry(name="t", urls=["x"], sha256=None, filename="t.bin", kind="weights",
              description="", fallback="")
    with pytest.raises(ValueError, match="sha256 must be 64 hex"):
        make_entry(sha256="01ec64")
    with pytest.raises(ValueError, match="already has"):
        register(Entry(name="svt", urls=["x"], sha256=None, sha256_note="t", filename="s.zip",
                       kind="dataset", description="", fallback=""))
    with pytest.raises(KeyError, match="known entries"):
        fetch("no_such_entry")
    with pytest.raises(ValueError, match="at least one URL"):
        make_entry(urls=[])


def test_course_entries_are_registered() -> None:
    names = {e.name for e in registry.list_entries()}
    assert {"sam_vit_b", "svt", "mobilenet_v2_imagenet", "clip_vit_b32_openai"} <= names
    sam = registry.get_entry("sam_vit_b")
    assert sam.urls[0] == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert sam.sha256 is not None and sam.cached_path().parent.name == "weights"
    assert "box masks" in sam.fallback and "data/" not in sam.fallback  # what masks.py really does
    svt = registry.get_entry("svt")
    assert svt.filename == "svt.zip" and svt.verify is not None and svt.kind == "dataset"


def test_mobilenet_entry_is_torchvisions_imagenet1k_v1() -> None:
    from torchvision.models import MobileNet_V2_Weights

    entry = registry.get_entry("mobilenet_v2_imagenet")
    url = MobileNet_V2_Weights.IMAGENET1K_V1.url
    assert entry.urls == (url,) and entry.filename == url.rsplit("/", 1)[1]
    # torchvision's file names carry the first hex digits of the sha256 (torch.hub's check_hash)
    assert entry.sha256 is None and entry.filename == f"mobilenet_v2-{entry.sha256_prefix}.pth"
    assert entry.sha256_note and entry.verify is registry.mobilenet_v2_state_dict


def test_clip_entry_is_open_clips_quickgelu_openai_file() -> None:
    from open_clip.pretrained import get_pretrained_cfg

    entry = registry.get_entry("clip_vit_b32_openai")
    cfg = get_pretrained_cfg("ViT-B-32-quickgelu", "openai")
    assert entry.urls == (cfg["url"],) and cfg["quick_gelu"]
    assert entry.urls[0].split("/")[-2] == entry.sha256  # OpenAI's URLs carry the sha256
    # the description must not recommend plain ViT-B-32, which drops QuickGELU
    assert "'ViT-B-32-quickgelu'" in entry.description and "'ViT-B-32'," not in entry.description


def test_docstring_example_line_is_what_prints(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    doc = registry.__doc__.splitlines()
    example = doc[doc.index(next(d for d in doc if "nothing cached::" in d)) + 2].strip()
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    fetch_or_fallback("sam_vit_b", fallback=lambda: None)
    assert capsys.readouterr().out.splitlines() == [example]
    assert f"within {registry.HTTP_TIMEOUT_S:g} s" in registry.__doc__


def test_sha256_prefix_is_checked(source: Path) -> None:
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    entry = make_entry(sha256=None, sha256_note="test", sha256_prefix=digest[:8])
    assert fetch("tiny", downloader=CopyDownloader(source)) == entry.cached_path()
    _, where = fetch_or_fallback("tiny", lambda: None)
    assert f"sha256 prefix {digest[:8]} verified" in where
    entry.cached_path().unlink()
    other = "0" * 8 if digest[:8] != "0" * 8 else "1" * 8
    make_entry(sha256=None, sha256_note="test", sha256_prefix=other)
    with pytest.raises(ChecksumError, match="tiny.bin") as info:
        fetch("tiny", downloader=CopyDownloader(source))
    assert info.value.reason == "sha256 mismatch" and not entry.cached_path().exists()


def test_entry_validation_of_hashes() -> None:
    with pytest.raises(ValueError, match="sha256_prefix must be 4 to 63 hex"):
        make_entry(sha256=None, sha256_note="t", sha256_prefix="xyz1")
    with pytest.raises(ValueError, match="does not start with sha256_prefix"):
        make_entry(sha256="a" * 64, sha256_prefix="abcd")
    assert make_entry(sha256="A" * 64, sha256_prefix="AAAA").sha256_prefix == "aaaa"  # lower-cased


def test_corrupt_cached_copy_is_said_in_one_line(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = make_entry()
    fetch("tiny", downloader=CopyDownloader(source))
    entry.cached_path().write_bytes(b"corrupt")
    capsys.readouterr()
    assert fetch("tiny", downloader=CopyDownloader(source)).read_bytes() == PAYLOAD
    assert capsys.readouterr().out.splitlines() == [
        "[download] the cached tiny.bin is corrupt (sha256 mismatch); downloading tiny again."]
    assert registry.cached_copy("tiny") == entry.cached_path()
    entry.cached_path().write_bytes(b"corrupt")
    assert registry.cached_copy("tiny") is None  # checked, never downloaded


def test_short_reasons_name_the_failure() -> None:
    from urllib3.exceptions import IncompleteRead, ProtocolError

    cut = requests.exceptions.ChunkedEncodingError(ProtocolError("Connection broken", IncompleteRead(1024, 3072)))
    assert registry._short_reason(cut) == "the connection closed after 1024 of 4096 bytes"
    refused = requests.exceptions.ConnectionError(OSError("x"))
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert registry._short_reason(refused) == "connection refused"
    stalled = requests.exceptions.ConnectionError(TimeoutError("timed out"))
    assert registry._short_reason(stalled) == f"the server did not answer within {registry.HTTP_TIMEOUT_S:g} s"
    assert registry._short_reason(RuntimeError("x" * 200)).startswith("RuntimeError: xxx")
