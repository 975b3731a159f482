"""Every download path of the course, exercised for real against HTTP servers on 127.0.0.1.

Each registry entry (the SVT zip, SAM ViT-B, torchvision's MobileNetV2, OpenAI's ViT-B/32) is
pointed at a local server that serves a file made here, in the real file's format, with random
weights and the sha256 computed here; the course's own loader then downloads it through
:func:`course_utils.registry.fetch` and loads it.  Then every failure mode, for every entry: HTTP
404, a closed port, a server that accepts and never answers, a body cut short, a checksum
mismatch and a corrupt cached copy.  Each must print one clear line and give the documented
fallback within 30 s, without a traceback.

The tests of the online path unset ``COURSE_OFFLINE`` (CI sets it) with ``monkeypatch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import socket
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from segment_anything import sam_model_registry
from torch import nn
from torchvision.models import mobilenet_v2

from course_utils import registry
from course_utils.clip import loading
from course_utils.clip.data import load_svt_data
from course_utils.clip.loading import (
    load_clip,
    open_clip_cached_file,
    open_clip_pretrained_available,
)
from course_utils.clip.masks import BoxMaskSource, SamMaskSource, load_mask_source
from course_utils.profiles import get_config
from course_utils.rpn import build_backbone

ENTRIES = ("svt", "sam_vit_b", "mobilenet_v2_imagenet", "clip_vit_b32_openai")
SVT_CFG = get_config("smoke").svt
#: what a wrong server sends in the checksum-mismatch case
NOT_THE_FILE = b"this is not the registered file\n" * 64
#: bytes the server sends before cutting a response short
CUT_AFTER = 1024
#: the read timeout of the failure tests (the default, 10 s, is tested once)
SHORT_TIMEOUT_S = 1.0


# --------------------------------------------------------------------------------------------
# the local server
# --------------------------------------------------------------------------------------------


class FileServer:
    """A threading HTTP server on 127.0.0.1 whose first path segment picks the behaviour.

    ``/ok/<name>`` serves the published file, ``/missing/<name>`` answers 404, ``/hang/<name>``
    accepts and never answers, ``/cut/<name>`` promises the whole file (Content-Length) and
    closes after :data:`CUT_AFTER` bytes, ``/other/<name>`` serves :data:`NOT_THE_FILE`.
    """

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # no request log on stderr
                pass

            def do_GET(self) -> None:
                _, mode, name = self.path.split("/", 2)
                if mode == "hang":
                    server.released.wait(120)
                    return
                if mode == "missing" or (mode != "other" and name not in server.files):
                    self.send_error(404)
                    return
                body = io.BytesIO(NOT_THE_FILE) if mode == "other" else server.files[name].open("rb")
                size = len(NOT_THE_FILE) if mode == "other" else server.files[name].stat().st_size
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                with body:
                    if mode == "cut":
                        self.wfile.write(body.read(CUT_AFTER))
                    else:
                        shutil.copyfileobj(body, self.wfile, 1 << 20)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/{name}"

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    """A URL on a port nothing listens on: the connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file"


@pytest.fixture(scope="session")
def server() -> Iterator[FileServer]:
    srv = FileServer()
    yield srv
    srv.close()


# --------------------------------------------------------------------------------------------
# the files, in the real files' formats (built once per session, lazily)
# --------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class Upstream:
    """A file as its server publishes it."""

    path: Path
    sha256: str


SVT_IMAGES = {  # real SVT: train.xml and test.xml list images of one img/ folder
    "train": [("img/00_00.jpg", "JOINT", (4, 6, 30, 12)), ("img/00_01.jpg", "PIZZA", (10, 20, 40, 14))],
    "test": [("img/01_00.jpg", "HOTEL", (2, 3, 50, 20)), ("img/01_01.jpg", "CAFE", (8, 8, 24, 10))],
}
LEXICON = "JOINT,PIZZA,HOTEL,CAFE,BANK,SUBWAY"


def _svt_xml(split: str) -> str:
    images = []
    for name, tag, (x, y, w, h) in SVT_IMAGES[split]:
        images.append(
            f"<image><imageName>{name}</imageName><address>1 Main St, Springfield</address>"
            f"<lex>{LEXICON}</lex><Resolution x=\"64\" y=\"48\"/><taggedRectangles>"
            f"<taggedRectangle height=\"{h}\" width=\"{w}\" x=\"{x}\" y=\"{y}\"><tag>{tag}</tag>"
            "</taggedRectangle></taggedRectangles></image>")
    return '<?xml version="1.0" encoding="utf-8"?>\n<tagset>' + "".join(images) + "</tagset>\n"


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (40 * seed % 256, 90, 200)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="session")
def svt_zip(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    """An archive in the real SVT's layout: svt1/train.xml, svt1/test.xml, svt1/img/*.jpg."""
    path = tmp_path_factory.mktemp("upstream") / "svt.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"svt1/{split}.xml", _svt_xml(split))
            for i, (name, _, _) in enumerate(SVT_IMAGES[split]):
                zf.writestr(f"svt1/{name}", _jpeg(i + (2 if split == "test" else 0)))
    return Upstream(path, sha256_of(path))


@pytest.fixture(scope="session")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """The state dict of a randomly initialised SAM ViT-B, saved like the official one (375 MB)."""
    path = tmp_path_factory.mktemp("upstream") / "sam_vit_b.pth"
    torch.manual_seed(1)
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    yield Upstream(path, sha256_of(path))
    path.unlink()


@pytest.fixture(scope="session")
def mobilenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    """A torchvision-format MobileNetV2 state dict (random weights)."""
    path = tmp_path_factory.mktemp("upstream") / "mobilenet_v2.pth"
    torch.manual_seed(2)
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    return Upstream(path, sha256_of(path))


def _as_torchscript(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript archive holding ``state`` under the same names, as OpenAI's release does."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for p in parents:
            if not hasattr(module, p):
                module.add_module(p, nn.Module())
            module = getattr(module, p)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(key, torch.tensor(value))  # OpenAI's archive has them; open_clip drops them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        return torch.jit.script(root)


@pytest.fixture(scope="session")
def clip_state() -> dict[str, torch.Tensor]:
    """Random ViT-B-32-quickgelu weights in float16, the precision of OpenAI's release."""
    torch.manual_seed(3)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    return {k: v.detach().half() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory, clip_state: dict[str, torch.Tensor]
                    ) -> Iterator[Upstream]:
    """``clip_state`` as OpenAI's ViT-B-32.pt: a TorchScript archive (300 MB)."""
    path = tmp_path_factory.mktemp("upstream") / "ViT-B-32.pt"
    _as_torchscript(clip_state).save(str(path))
    yield Upstream(path, sha256_of(path))
    path.unlink()


UPSTREAM = {"svt": "svt_zip", "sam_vit_b": "sam_checkpoint",
            "mobilenet_v2_imagenet": "mobilenet_checkpoint", "clip_vit_b32_openai": "clip_checkpoint"}


# --------------------------------------------------------------------------------------------
# the registry pointed at the local server
# --------------------------------------------------------------------------------------------


@pytest.fixture
def online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Network allowed, an empty course cache, a private copy of the registry (restored after
    the test), and neither open_clip cache (Hugging Face hub, ~/.cache/clip) visible."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("COURSE_CACHE", str(cache))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # downloads of several hundred MB each


def point(name: str, url: str, sha256: str) -> registry.Entry:
    """Entry ``name`` with its one URL at ``url`` and the sha256 of the file made here."""
    entry = dataclasses.replace(registry.get_entry(name), urls=[url], sha256=sha256,
                                sha256_prefix=None, size_bytes=None)
    return registry.register(entry, overwrite=True)


def run_loader(name: str) -> Any:
    """The course's own loader of entry ``name``, as a notebook calls it."""
    if name == "svt":  # verbose: its source line is the one saying why
        return load_svt_data(SVT_CFG, allow_download=True)
    if name == "sam_vit_b":
        return load_mask_source("sam")[0]
    if name == "mobilenet_v2_imagenet":
        return build_backbone("mobilenet_v2", 32, pretrained=True)
    return load_clip("full", verbose=False)


def used_fallback(name: str, got: Any, upstream: Upstream) -> bool:
    """Whether the loader's result is the entry's documented fallback, not the served file."""
    if name == "svt":
        return not got.real and "SynthSVT" in got.source
    if name == "sam_vit_b":
        return isinstance(got, BoxMaskSource)
    if name == "mobilenet_v2_imagenet":  # random initialisation: other weights than the file's
        saved = torch.load(upstream.path, map_location="cpu", weights_only=True)
        return not torch.equal(got.features[0][0].weight, saved["features.0.0.weight"])
    return got.kind == "small"


def report_lines(out: str) -> list[str]:
    """The printed lines, without the split summaries ``load_svt_data`` always adds."""
    return [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("SVT ")]


def fallback_line(name: str, reason: str) -> str:
    """The one line each loader prints when entry ``name`` cannot be had."""
    if name == "svt":
        return f"data: SynthSVT (real SVT unavailable: {reason}), "
    entry = registry.get_entry(name)
    return f"[offline] could not download {name} ({reason}); using {entry.fallback} instead."


# --------------------------------------------------------------------------------------------
# downloaded and loaded end to end
# --------------------------------------------------------------------------------------------


def test_svt_zip_is_fetched_and_loaded(online: Path, server: FileServer, svt_zip: Upstream,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    server.files["svt.zip"] = svt_zip.path
    point("svt", server.url("ok", "svt.zip"), svt_zip.sha256)
    data = load_svt_data(SVT_CFG, allow_download=True)
    assert data.real and data.root.name == "svt1"
    assert capsys.readouterr().out.splitlines()[0] == f"data: real SVT from {online / 'dataset' / 'svt.zip'}"
    for split, records in (("train", data.train), ("test", data.test)):
        assert [r.image_name for r in records.images] == [n for n, _, _ in SVT_IMAGES[split]]
        assert [w.tag for r in records.images for w in r.words] == [t for _, t, _ in SVT_IMAGES[split]]
        assert records.images[0].lexicon == LEXICON.split(",")
        assert records.images[0].load().size == (64, 48)


def test_svt_without_download_skips_a_corrupt_cached_copy(online: Path, svt_zip: Upstream,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cached = point("svt", "http://127.0.0.1:9/never-used", svt_zip.sha256).cached_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(svt_zip.path.read_bytes()[:CUT_AFTER])
    data = load_svt_data(SVT_CFG, allow_download=False)  # the cpu profile: the cache only
    assert not data.real
    assert report_lines(capsys.readouterr().out)[0].startswith(
        f"data: SynthSVT (real SVT unavailable: the cached copy at {cached} is corrupt), ")


def test_sam_checkpoint_is_fetched_and_loaded(online: Path, server: FileServer, sam_checkpoint: Upstream,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    server.files["sam.pth"] = sam_checkpoint.path
    point("sam_vit_b", server.url("ok", "sam.pth"), sam_checkpoint.sha256)
    source, line = load_mask_source("sam", max_objects=2)
    assert isinstance(source, SamMaskSource) and "sha256 verified" in line
    assert capsys.readouterr().out == ""
    saved = torch.load(sam_checkpoint.path, map_location="cpu", weights_only=True, mmap=True)
    loaded = source.generator.predictor.model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_mobilenet_weights_are_fetched_and_loaded(online: Path, server: FileServer,
                                                  mobilenet_checkpoint: Upstream,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    server.files["mobilenet.pth"] = mobilenet_checkpoint.path
    point("mobilenet_v2_imagenet", server.url("ok", "mobilenet.pth"), mobilenet_checkpoint.sha256)
    backbone = build_backbone("mobilenet_v2", 32, pretrained=True)
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("backbone: MobileNetV2 with ImageNet weights (mobilenet_v2_imagenet from ")
    saved = torch.load(mobilenet_checkpoint.path, map_location="cpu", weights_only=True)
    loaded = backbone.features.state_dict()
    assert all(torch.equal(v, saved[f"features.{k}"]) for k, v in loaded.items())


def test_mobilenet_entry_checks_prefix_and_structure(online: Path, server: FileServer,
                                                     mobilenet_checkpoint: Upstream, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # the real entry has no full sha256: its prefix and the keys/shapes hook do the checking
    server.files["mobilenet.pth"] = mobilenet_checkpoint.path
    real = registry.get_entry("mobilenet_v2_imagenet")
    registry.register(dataclasses.replace(real, urls=[server.url("ok", "mobilenet.pth")],
                                          sha256_prefix=mobilenet_checkpoint.sha256[:8]), overwrite=True)
    assert registry.fetch("mobilenet_v2_imagenet", progressbar=False).is_file()
    other = tmp_path / "resnet_like.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, other)
    server.files["other.pth"] = other
    registry.register(dataclasses.replace(real, urls=[server.url("ok", "other.pth")], sha256_prefix=None),
                      overwrite=True)
    real.cached_path().unlink()
    capsys.readouterr()
    build_backbone("mobilenet_v2", 32, pretrained=True)
    assert capsys.readouterr().out.splitlines() == [fallback_line("mobilenet_v2_imagenet",
                                                                  "not a MobileNetV2 state dict")]
    assert not real.cached_path().exists()  # a file that fails its checks is not kept


def test_clip_checkpoint_is_fetched_and_loaded_by_open_clip(online: Path, server: FileServer,
                                                            clip_checkpoint: Upstream,
                                                            clip_state: dict[str, torch.Tensor],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    server.files["ViT-B-32.pt"] = clip_checkpoint.path
    point("clip_vit_b32_openai", server.url("ok", "ViT-B-32.pt"), clip_checkpoint.sha256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected TorchScript warnings are filtered where they arise
        bundle = load_clip("full")
    out, err = capsys.readouterr()
    assert out.splitlines() == [bundle.weights] and "Traceback" not in err
    assert bundle.kind == "full" and bundle.info["pretrained"] == "openai"
    assert bundle.weights.startswith("weights: open_clip ViT-B-32-quickgelu pretrained=openai "
                                     "(clip_vit_b32_openai from ")
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k].half(), v) for k, v in clip_state.items())
    assert bundle.encode_texts(["JOINT"]).shape == (1, 512)


def test_open_clips_own_cache_is_used_first(online: Path, tmp_path: Path, clip_state: dict[str, torch.Tensor],
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # the Hugging Face hub layout of timm/vit_base_patch32_clip_224.openai, with a safetensors state dict
    snapshot = tmp_path / "hf" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(clip_state, str(snapshot / "open_clip_model.safetensors"))
    monkeypatch.setattr(registry, "fetch_or_fallback", lambda *a, **k: pytest.fail("used the registry"))
    bundle = load_clip("full", verbose=False)
    assert bundle.info["checkpoint"] == str(snapshot / "open_clip_model.safetensors")
    assert "open_clip's cache" in bundle.weights and capsys.readouterr().out == ""
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k].half(), v) for k, v in clip_state.items())


def test_open_clip_cache_lookup_reads_only_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    monkeypatch.setattr(requests.Session, "request",
                        lambda *a, **k: pytest.fail("open_clip_cached_file used the network"))
    hf = tmp_path / "hf"
    assert not open_clip_pretrained_available("ViT-B-32", "openai", cache_dir=hf)
    assert open_clip_cached_file("ViT-B-32", "no-such-tag", cache_dir=hf) is None
    repo = hf / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors").write_bytes(b"x")
    assert open_clip_pretrained_available("ViT-B-32", "openai", cache_dir=hf)
    # open_clip's other cache: the file of the config's URL (OpenAI's ViT-B-32.pt) in cache_dir
    url_cache = tmp_path / "clip"
    url_cache.mkdir()
    (url_cache / "ViT-B-32.pt").write_bytes(b"x")
    assert open_clip_cached_file("ViT-B-32-quickgelu", "openai", cache_dir=url_cache) == url_cache / "ViT-B-32.pt"


# --------------------------------------------------------------------------------------------
# failure modes, for every entry
# --------------------------------------------------------------------------------------------

FAILURES = {  # mode: (URL maker, the reason printed)
    "http_404": (lambda s, f: s.url("missing", f), "HTTP 404"),
    "connection_refused": (lambda s, f: closed_port_url(), "connection refused"),
    "server_never_answers": (lambda s, f: s.url("hang", f), f"the server did not answer within {SHORT_TIMEOUT_S:g} s"),
    "body_cut_short": (lambda s, f: s.url("cut", f), None),  # the reason names the sizes
    "checksum_mismatch": (lambda s, f: s.url("other", f), "sha256 mismatch"),
}


@pytest.mark.parametrize("mode", list(FAILURES))
@pytest.mark.parametrize("name", ENTRIES)
def test_failure_gives_one_line_and_the_fallback(name: str, mode: str, online: Path, server: FileServer,
                                                 request: pytest.FixtureRequest,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    upstream: Upstream = request.getfixturevalue(UPSTREAM[name])
    server.files[name] = upstream.path
    make_url, reason = FAILURES[mode]
    reason = reason or f"the connection closed after {CUT_AFTER} of {upstream.path.stat().st_size} bytes"
    monkeypatch.setattr(registry, "HTTP_TIMEOUT_S", SHORT_TIMEOUT_S)
    entry = point(name, make_url(server, name), upstream.sha256)
    start = time.perf_counter()
    got = run_loader(name)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert elapsed < 30, f"{name}/{mode} took {elapsed:.1f} s"
    assert used_fallback(name, got, upstream)
    assert "Traceback" not in out + err
    lines = report_lines(out)
    assert len(lines) == 1 and lines[0].startswith(fallback_line(name, reason)), out
    folder = entry.cached_path().parent
    assert not folder.exists() or not any(folder.iterdir()), "a failed download left a file behind"


@pytest.mark.parametrize("name", ENTRIES)
def test_corrupt_cached_copy_is_downloaded_again(name: str, online: Path, server: FileServer,
                                                 request: pytest.FixtureRequest,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    upstream: Upstream = request.getfixturevalue(UPSTREAM[name])
    server.files[name] = upstream.path
    entry = point(name, server.url("ok", name), upstream.sha256)
    entry.cached_path().parent.mkdir(parents=True)
    entry.cached_path().write_bytes(upstream.path.read_bytes()[:CUT_AFTER])  # an earlier download cut short
    start = time.perf_counter()
    got = run_loader(name)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert elapsed < 30 and "Traceback" not in out + err
    assert not used_fallback(name, got, upstream)
    assert report_lines(out)[0] == (f"[download] the cached {entry.filename} is corrupt (sha256 mismatch); "
                                    f"downloading {name} again.")
    assert not any(ln.startswith(("[offline]", "data: SynthSVT")) for ln in report_lines(out))
    assert sha256_of(entry.cached_path()) == upstream.sha256


def test_default_downloader_gives_up_on_a_hang_within_30_s(online: Path, server: FileServer,
                                                           svt_zip: Upstream,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # every real entry, with all its mirrors hanging, gives up within 30 s ...
    assert all(registry.HTTP_TIMEOUT_S * len(e.urls) <= 30 for e in registry.list_entries())
    # ... because the default downloader waits HTTP_TIMEOUT_S (the hang tests above show that the
    # wait is what ends a hang; waiting the real 10 s here would only slow the suite down)
    made: list[dict[str, Any]] = []
    real = registry.pooch.HTTPDownloader

    def recording(**kwargs: Any) -> Any:
        made.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(registry.pooch, "HTTPDownloader", recording)
    server.files["svt.zip"] = svt_zip.path
    point("svt", server.url("ok", "svt.zip"), svt_zip.sha256)
    registry.fetch("svt", progressbar=False)
    assert [m["timeout"] for m in made] == [registry.HTTP_TIMEOUT_S] and registry.HTTP_TIMEOUT_S <= 15


# --------------------------------------------------------------------------------------------
# what the fullpath profile asks for: the same architecture with random weights
# --------------------------------------------------------------------------------------------


def test_when_unavailable_random_says_so_once(online: Path, server: FileServer,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("sam_vit_b", "clip_vit_b32_openai"):
        point(name, server.url("missing", name), "0" * 64)
    bundle = load_clip("full", when_unavailable="random")
    source, how = load_mask_source("sam", when_unavailable="random")
    out = capsys.readouterr().out.splitlines()
    assert bundle.kind == "full" and bundle.info["random_init"] and bundle.info["arch"] == "ViT-B-32-quickgelu"
    assert isinstance(source, SamMaskSource) and "RANDOM" in source.name and "RANDOM" in how
    assert [ln for ln in out if "RANDOM" in ln] == [
        "[offline] could not download clip_vit_b32_openai (HTTP 404); "
        "using open_clip ViT-B-32-quickgelu with RANDOM weights instead.",
        "[offline] could not download sam_vit_b (HTTP 404); "
        "using SAM ViT-B with RANDOM weights (its masks mean nothing) instead."]
    assert out == [out[0], bundle.weights, out[2]]  # plus load_clip's usual weights line


def test_when_unavailable_is_validated() -> None:
    with pytest.raises(ValueError, match=r"when_unavailable='tiny', expected one of \('fallback', 'random'\)"):
        load_clip("full", when_unavailable="tiny")
    with pytest.raises(ValueError, match=r"when_unavailable='small', expected one of \('fallback', 'random'\)"):
        load_mask_source("sam", when_unavailable="small")


def test_loaders_know_the_entries() -> None:
    # every registry entry is exercised above, and nothing more is registered unseen
    assert {e.name for e in registry.list_entries()} == set(ENTRIES)
    assert loading.FULL_CLIP_ENTRY == "clip_vit_b32_openai"

