"""Public functions refuse bad input with the course's own clear errors (one test per user report).

Each test checks the exception type and that the message names the argument, file, image or
element at fault; the "still accepted" tests pin the valid edge cases the checks must not refuse.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from course_utils import boxes as B
from course_utils import registry
from course_utils.checkpoints import CheckpointError
from course_utils.clip import data as svt_data
from course_utils.clip import loading, small
from course_utils.scan import ScanConfig, recall_at_k, scan_scores
from course_utils.svt import SVTFormatError, load_svt, parse_svt_xml
from course_utils.train import fit

# --------------------------------------------------------------------------------------------
# 1-3. boxes
# --------------------------------------------------------------------------------------------


def test_sample_anchors_rejects_2d_labels():
    with pytest.raises(ValueError, match=r"sample_anchors: labels must be a 1-D int tensor .*shape \(4, 5\)"):
        B.sample_anchors(torch.zeros(4, 5, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match=r"sample_anchors: labels .*dtype torch.float32"):
        B.sample_anchors(torch.zeros(20), 8)
    with pytest.raises(ValueError, match="positive_fraction"):
        B.sample_anchors(torch.zeros(20, dtype=torch.int64), 8, positive_fraction=0.0)


def test_anchor_grid_rejects_stride_zero_and_nonpositive_sizes():
    with pytest.raises(ValueError, match=r"anchor_grid: feature_size \(128, 128\) is larger than image_size \(64, 64\)"):
        B.anchor_grid((128, 128), (64, 64), 8)
    with pytest.raises(ValueError, match=r"anchor_grid: feature_size must be positive, got \(0, 4\)"):
        B.anchor_grid((0, 4), (64, 64), 8)
    with pytest.raises(ValueError, match=r"anchor_grid: image_size must be positive"):
        B.anchor_grid((4, 4), (-64, 64), 8)
    with pytest.raises(ValueError, match=r"anchor_grid: anchor_size must be a positive number"):
        B.anchor_grid((4, 4), (64, 64), 0)
    with pytest.raises(ValueError, match=r"anchor_grid: feature_size must be a pair of ints"):
        B.anchor_grid((4, 4, 4), (64, 64), 8)
    assert B.anchor_grid((1, 1), (32, 32), 8).shape == (1, 4)  # feature map == one cell: fine


@pytest.mark.parametrize("call, match", [
    (lambda: B.box_iou(torch.tensor([[10.0, 0.0, 5.0, 10.0]]), torch.zeros(1, 4)),
     r"box_iou: boxes1: box 0 = \[10.0, 0.0, 5.0, 10.0\] has x2 < x1"),
    (lambda: B.box_iou(torch.zeros(2, 4), torch.zeros(3, 5)), r"box_iou: boxes2: expected shape \(N, 4\).*\(3, 5\)"),
    (lambda: B.box_iou(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(1, 4)),
     r"box_iou: boxes1: expected a floating dtype, got torch.int64"),
    (lambda: B.box_iou(torch.tensor([[0.0, 0.0, float("inf"), 1.0]]), torch.zeros(1, 4)),
     r"box_iou: boxes1: contains NaN or inf"),
    (lambda: B.encode_boxes(torch.zeros(3, 4), torch.zeros(5, 4)),
     r"encode_boxes: gt_boxes has 3 rows but anchors has 5"),
    (lambda: B.encode_boxes(torch.tensor([[0.0, 5.0, 4.0, 1.0]]), torch.zeros(1, 4)),
     r"encode_boxes: gt_boxes: box 0 .* y2 < y1"),
    (lambda: B.decode_boxes(torch.zeros(4, 3), torch.zeros(4, 4)),
     r"decode_boxes: deltas: expected a float tensor of shape \(N, 4\).*got shape \(4, 3\)"),
    (lambda: B.decode_boxes(torch.zeros(4, 4), torch.zeros(2, 4)), r"decode_boxes: deltas has 4 rows but anchors has 2"),
    (lambda: B.label_anchors(torch.zeros(4, 4), torch.tensor([[5.0, 5.0, 1.0, 9.0]])),
     r"label_anchors: gt_boxes: box 0"),
])
def test_box_functions_reject_bad_boxes_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_box_functions_still_accept_empty_and_degenerate_boxes():
    # nb01's hidden case _random_boxes(4, 64, g, 0.0) may give x2 == x1: degenerate, not inverted
    flat = torch.tensor([[3.0, 3.0, 3.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    iou = B.box_iou(flat, torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert iou.shape == (2, 1) and torch.equal(iou, torch.zeros(2, 1))
    assert B.box_iou(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)
    labels, matched = B.label_anchors(B.anchor_grid((4, 4), (64, 64), 16), torch.zeros(0, 4))
    assert (labels == 0).all() and (matched == -1).all()
    assert B.encode_boxes(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert B.decode_boxes(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# 4-5. SCAN scores and R@K
# --------------------------------------------------------------------------------------------


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_scan_scores_rejects_an_empty_caption_naming_it(direction):
    g = torch.Generator().manual_seed(0)
    img, cap = _l2(torch.randn(2, 3, 8, generator=g)), _l2(torch.randn(3, 4, 8, generator=g))
    cfg = ScanConfig(direction=direction)
    assert torch.isfinite(scan_scores(img, cap, torch.tensor([4, 1, 2]), cfg)).all()
    with pytest.raises(ValueError, match=r"scan_scores: lengths: caption 1 is empty \(length 0\)"):
        scan_scores(img, cap, torch.tensor([4, 0, 2]), cfg)
    with pytest.raises(ValueError, match=r"scan_scores: lengths: caption 2 has length 5 .* only 4"):
        scan_scores(img, cap, torch.tensor([4, 1, 5]), cfg)
    with pytest.raises(ValueError, match=r"scan_scores: lengths: expected shape \(3,\)"):
        scan_scores(img, cap, torch.tensor([4, 1]), cfg)


def test_scan_scores_rejects_other_dims_and_2d_regions():
    cfg = ScanConfig()
    img, cap, lengths = torch.randn(2, 3, 8), torch.randn(3, 4, 6), torch.tensor([4, 1, 2])
    with pytest.raises(ValueError, match=r"scan_scores: img has embedding dim D=8 but cap has D=6"):
        scan_scores(img, cap, lengths, cfg)
    with pytest.raises(ValueError, match=r"scan_scores: img must be \(N_img, R, D\) .*got shape \(2, 8\)"):
        scan_scores(torch.randn(2, 8), torch.randn(3, 4, 8), lengths, cfg)
    with pytest.raises(ValueError, match=r"scan_scores: cap must be \(N_cap, L, D\)"):
        scan_scores(torch.randn(2, 3, 8), torch.randn(3, 8), lengths, cfg)


def test_recall_at_k_rejects_an_image_index_out_of_range():
    sims = torch.rand(3, 6)
    with pytest.raises(ValueError, match=r"recall_at_k: cap_to_img\[5\] = 3 is not an image index .*3 images"):
        recall_at_k(sims, torch.tensor([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"recall_at_k: cap_to_img\[0\] = -1"):
        recall_at_k(sims, torch.tensor([-1, 0, 1, 1, 2, 2]))  # would wrap to the last image
    with pytest.raises(ValueError, match=r"recall_at_k: cap_to_img must be a 1-D integer tensor"):
        recall_at_k(sims, torch.zeros(6))


# --------------------------------------------------------------------------------------------
# 6. fit: resuming with other optimizer settings
# --------------------------------------------------------------------------------------------


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _step(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"loss": nn.functional.cross_entropy(model(x), y)}


def _fit(ckpt_dir: Path, make_opt, epochs: int, sched=None, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = make_opt(model.parameters())
    scheduler = sched(opt) if sched is not None else None
    fit(model, _step, _data(), epochs=epochs, batch_size=8, optimizer=opt, scheduler=scheduler,
        ckpt_dir=ckpt_dir, progress=False, track_dir=None, **kw)
    return model, opt


def test_resume_with_another_learning_rate_names_it(tmp_path, capsys):
    _fit(tmp_path, lambda p: torch.optim.Adam(p, lr=1e-2), 1)
    with pytest.raises(CheckpointError, match=r"epoch_001\.pt: the optimizer differs .*lr 0\.01 -> 0\.1.*override_hparams=True"):
        _fit(tmp_path, lambda p: torch.optim.Adam(p, lr=0.1), 2)
    with pytest.raises(CheckpointError, match=r"epoch_001\.pt: .*betas \[0\.9, 0\.999\] -> \[0\.5, 0\.999\]"):
        _fit(tmp_path, lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.5, 0.999)), 2)
    _, opt = _fit(tmp_path, lambda p: torch.optim.Adam(p, lr=0.1), 2, override_hparams=True)
    out = capsys.readouterr().out
    assert "override_hparams=True: continuing with the new optimizer settings (lr 0.01 -> 0.1)" in out
    assert opt.param_groups[0]["lr"] == 0.1 and opt.state  # the new rate, the old Adam moments
    # the new values are the run's now: resuming with them again is no change
    _fit(tmp_path, lambda p: torch.optim.Adam(p, lr=0.1), 3)


def test_resume_with_another_optimizer_class_is_a_checkpoint_error(tmp_path, capsys):
    _fit(tmp_path, lambda p: torch.optim.Adam(p, lr=1e-2), 1)
    # before: KeyError: 'momentum' from deep inside SGD.step
    with pytest.raises(CheckpointError, match=r"epoch_001\.pt: .*optimizer class Adam -> SGD"):
        _fit(tmp_path, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), 2)
    _, opt = _fit(tmp_path, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), 2, override_hparams=True)
    assert "its state starts afresh" in capsys.readouterr().out
    assert opt.param_groups[0]["momentum"] == 0.9


def test_checkpoint_without_the_record_still_detects_another_class(tmp_path):
    _fit(tmp_path, lambda p: torch.optim.Adam(p, lr=1e-2), 1)
    path = tmp_path / "epoch_001.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["extra"]["fit"]["optimizer"]  # as written before the record existed
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"optimizer class another optimizer -> SGD"):
        _fit(tmp_path, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), 2)


@pytest.mark.parametrize("sched", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0),
])
def test_a_scheduler_moving_lr_is_not_a_change(tmp_path, sched):
    full, _ = _fit(tmp_path / "full", lambda p: torch.optim.Adam(p, lr=1e-2), 3, sched)
    _fit(tmp_path / "cut", lambda p: torch.optim.Adam(p, lr=1e-2), 3, sched, max_steps=6)
    resumed, _ = _fit(tmp_path / "cut", lambda p: torch.optim.Adam(p, lr=1e-2), 3, sched)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_the_same_optimizer_object_can_train_on(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0)
    for epochs in (2, 3):  # a notebook calling fit again with more epochs, same objects
        fit(model, _step, _data(), epochs=epochs, batch_size=8, optimizer=opt, scheduler=sched,
            ckpt_dir=tmp_path, progress=False, track_dir=None)
    assert opt.param_groups[0]["lr"] < 1e-2


# --------------------------------------------------------------------------------------------
# 7-8. SVT files
# --------------------------------------------------------------------------------------------


def _xml(name: str, res: str = '<Resolution x="64" y="48"/>',
         rect: str = '<taggedRectangle height="10" width="20" x="5" y="6"><tag>JOINT</tag></taggedRectangle>') -> str:
    return (f'<?xml version="1.0"?><tagset><image><imageName>{name}</imageName><lex>JOINT,JONES</lex>'
            f"{res}<taggedRectangles>{rect}</taggedRectangles></image></tagset>")


def _svt_folder(root: Path, xml: str, size=(64, 48)) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(root / "img/a.png")
    (root / "test.xml").write_text(xml)
    return root


@pytest.mark.parametrize("name", ["../outside.png", "img/../../outside.png", "/etc/passwd"])
def test_image_name_never_leaves_the_dataset_folder(tmp_path, name):
    root = tmp_path / "svt"
    Image.new("RGB", (64, 48)).save(tmp_path / "outside.png")
    _svt_folder(root, _xml(name))
    for strict in (True, False):
        with pytest.raises(SVTFormatError, match=r"test\.xml: image #0 .*<imageName> .* points outside the dataset folder"):
            load_svt(root, "test", strict=strict)
    with pytest.raises(SVTFormatError, match="points outside"):
        parse_svt_xml(_xml(name), root, source="test.xml", check_images=False)
    assert len(load_svt(_svt_folder(tmp_path / "ok", _xml("img/./a.png")), "test")) == 1


def test_resolution_that_is_not_the_image_size(tmp_path):
    root = _svt_folder(tmp_path, _xml("img/a.png", res='<Resolution x="640" y="480"/>'))
    with pytest.raises(SVTFormatError, match=r"test\.xml: image #0 \(img/a\.png\): <Resolution> says 640x480 but .*a\.png is 64x48"):
        load_svt(root, "test")
    split = load_svt(root, "test", strict=False)
    assert len(split) == 0 and len(split.issues) == 1 and "image skipped" in split.issues[0]


def test_box_outside_the_image_names_file_and_image(tmp_path):
    outside = '<taggedRectangle height="10" width="20" x="100" y="6"><tag>FAR</tag></taggedRectangle>'
    inside = '<taggedRectangle height="10" width="20" x="5" y="6"><tag>JOINT</tag></taggedRectangle>'
    root = _svt_folder(tmp_path, _xml("img/a.png", rect=outside + inside))
    with pytest.raises(SVTFormatError, match=r"test\.xml: image #0 \(img/a\.png\): taggedRectangle #0: .*entirely outside the 64x48 image"):
        load_svt(root, "test")
    split = load_svt(root, "test", strict=False)
    assert split[0].tags == ["JOINT"] and len(split.issues) == 1 and "box skipped" in split.issues[0]
    # crop_word on a record built by hand names the image too
    split[0].words.append(split[0].words[0].__class__(100, 6, 20, 10, "FAR", "FAR"))
    with pytest.raises(SVTFormatError, match=r"a\.png: image #0 \(img/a\.png\): word 'FAR'"):
        split[0].crops()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR (with its CRC) claiming ``width x height``, one empty IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_an_svt_error_naming_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/bomb.png").write_bytes(_png_claiming(30000, 30000))
    (tmp_path / "test.xml").write_text(_xml("img/bomb.png", res=""))  # size read from the header
    with pytest.raises(SVTFormatError, match=r"test\.xml: image #0 \(img/bomb\.png\): .*bomb\.png is not a readable image"):
        load_svt(tmp_path, "test")
    (tmp_path / "test.xml").write_text(_xml("img/bomb.png", res='<Resolution x="30000" y="30000"/>'))
    split = load_svt(tmp_path, "test")  # an unreadable header is left to load(), as before
    with pytest.raises(SVTFormatError, match=r"image #0 \(img/bomb\.png\): .*bomb\.png is not a readable image"):
        split[0].load()


def _truncated_svt_zip(tmp_path: Path) -> Path:
    """An archive whose directory is intact but whose member data is cut: namelist() works,
    unpacking fails (BadZipFile / a CRC error)."""
    path = tmp_path / "svt.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("svt1/train.xml", "x" * 5000)
        zf.writestr("svt1/test.xml", "y" * 5000)
    raw = bytearray(path.read_bytes())
    raw[40:60] = b"\0" * 20  # inside the first member's compressed data
    path.write_bytes(bytes(raw))
    return path


def test_corrupt_svt_archive_is_a_checksum_error_naming_it(tmp_path):
    path = _truncated_svt_zip(tmp_path)
    with pytest.raises(registry.ChecksumError, match=re.escape(str(path)) + ": the SVT archive cannot be unpacked"):
        svt_data._extract_svt(path)
    assert not (tmp_path / "svt").exists()  # no half extraction left behind


def test_corrupt_svt_archive_falls_back_to_synthsvt(tmp_path, monkeypatch, capsys):
    from course_utils.profiles import get_config

    path = _truncated_svt_zip(tmp_path)
    monkeypatch.setattr(registry, "cached_copy", lambda name: path)  # as if it passed the registry
    data = svt_data.load_svt_data(get_config("smoke").svt, verbose=False)
    out = capsys.readouterr().out
    assert not data.real and "cannot be unpacked" in data.source
    assert str(path) in out and "Using SynthSVT instead" in out


# --------------------------------------------------------------------------------------------
# 9. small-CLIP weight files
# --------------------------------------------------------------------------------------------

SHIPPED = small.SMALL_CLIP_DIR / small.SMALL_CLIP_WEIGHTS


def test_truncated_small_clip_weights_are_a_checkpoint_error(tmp_path):
    bad = tmp_path / small.SMALL_CLIP_WEIGHTS
    raw = SHIPPED.read_bytes()
    for cut in (raw[: len(raw) // 2], raw[:5], b""):
        bad.write_bytes(cut)
        with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ": cannot read the small CLIP weights .*truncated"):
            small.load_small_clip_state(bad)
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            loading.load_clip("small", weights_dir=tmp_path, verbose=False)


def test_git_lfs_pointer_says_run_git_lfs_pull(tmp_path):
    pointer = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 4532684\n")
    (tmp_path / small.SMALL_CLIP_WEIGHTS).write_bytes(pointer)
    with pytest.raises(CheckpointError, match=r"small_clip\.safetensors: this is a git-LFS pointer .*git lfs pull"):
        loading.load_clip("small", weights_dir=tmp_path, verbose=False)
    (tmp_path / "tuned.pt").write_bytes(pointer)
    with pytest.raises(CheckpointError, match=r"tuned\.pt: this is a git-LFS pointer"):
        loading.load_clip_weights(small.build_small_clip(), tmp_path / "tuned.pt")


def test_weights_of_another_config_name_keys_and_shapes(tmp_path):
    state = small.load_small_clip_state(SHIPPED)
    state.pop("token_embedding.weight")
    state["visual.proj"] = torch.zeros(3, 5)
    state.pop("ln_final.bias")
    state["extra.layer"] = torch.zeros(2)
    rows = torch.tensor([0, 1], dtype=torch.int64)
    save_file({**state, "token_embedding.rows": rows, "token_embedding.values": torch.zeros(2, 128),
               "token_embedding.shape": torch.tensor([49408, 128])}, str(tmp_path / small.SMALL_CLIP_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"small_clip\.safetensors: weights do not fit SmallCLIP: "
                                              r"missing keys \[ln_final\.bias\]; unexpected keys \[extra\.layer\]; "
                                              r"shape mismatches \[visual\.proj: checkpoint \(3, 5\)"):
        loading.load_clip("small", weights_dir=tmp_path, verbose=False)


def test_load_clip_weights_truncated_pt_names_the_file(tmp_path):
    model = small.build_small_clip()
    torch.save(model.state_dict(), tmp_path / "tuned.pt")
    raw = (tmp_path / "tuned.pt").read_bytes()
    (tmp_path / "tuned.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match=r"load_clip_weights: cannot read .*tuned\.pt .*truncated"):
        loading.load_clip_weights(model, tmp_path / "tuned.pt")
    torch.save({"visual.proj": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: weights do not fit SmallCLIP: missing keys"):
        loading.load_clip_weights(model, tmp_path / "other.pt")
