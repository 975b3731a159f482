"""Tests of the SVT loader (course_utils.svt) and the SynthSVT generator (course_utils.synthsvt).

The loader is tested on hand-written XML strings, one quirk of the real SVT files per test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from course_utils.svt import (
    SVTFormatError,
    SVTWord,
    crop_word,
    lexicon_overlap,
    load_svt,
    load_svt_splits,
    normalise_word,
    parse_lexicon,
    parse_svt_xml,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _image_xml(name: str = "img/00_01.jpg", lex: str | None = "JOINT,JOHNS,JONES",
               rects: str = '<taggedRectangle height="10" width="20" x="5" y="6"><tag>JOINT</tag></taggedRectangle>',
               address: str | None = "1 Main St, Springfield",
               resolution: str | None = '<Resolution x="64" y="48"/>') -> str:
    parts = [f"<imageName>{name}</imageName>"]
    if address is not None:
        parts.append(f"<address>{address}</address>")
    if lex is not None:
        parts.append(f"<lex>{lex}</lex>")
    if resolution is not None:
        parts.append(resolution)
    parts.append(f"<taggedRectangles>{rects}</taggedRectangles>")
    return "<image>" + "".join(parts) + "</image>"


def _tagset(*images: str) -> str:
    return '<?xml version="1.0" encoding="utf-8"?>\n<tagset>' + "".join(images) + "</tagset>"


def _parse(*images: str, **kw):
    kw.setdefault("check_images", False)
    return parse_svt_xml(_tagset(*images), "/nonexistent", source="test.xml", **kw)


def _write_image(root: Path, name: str, size=(64, 48), mode="RGB", color=128) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode != "RGB" else (color, 20, 200)).save(path)
    return path


# --------------------------------------------------------------------------------------------
# words and lexicons
# --------------------------------------------------------------------------------------------


def test_normalise_word_case_whitespace_accents():
    assert normalise_word("  joint\n") == "JOINT"
    assert normalise_word("sotto   sopra") == "SOTTO SOPRA"
    assert normalise_word("café") == "CAFÉ"
    # decomposed "e" + combining acute equals the composed letter after NFC
    assert normalise_word("cafe\u0301") == normalise_word("caf\u00e9")
    assert normalise_word("Café", strip_accents=True) == "CAFE"


def test_parse_lexicon_dedupes_keeps_order_and_raw():
    norm, raw = parse_lexicon(" Joint, JOHNS,joint ,, JONES,JOHNS,")
    assert norm == ["JOINT", "JOHNS", "JONES"]
    assert raw == ["Joint", "JOHNS", "joint", "JONES", "JOHNS"]
    assert parse_lexicon(None) == ([], [])


# --------------------------------------------------------------------------------------------
# parsing: the happy path and every quirk
# --------------------------------------------------------------------------------------------


def test_parse_full_record():
    split = _parse(_image_xml())
    assert len(split) == 1 and split.n_words == 1
    im = split[0]
    assert im.index == 0 and im.image_name == "img/00_01.jpg"
    assert im.path == Path("/nonexistent/img/00_01.jpg").resolve()
    assert im.address == "1 Main St, Springfield"
    assert im.lexicon == ["JOINT", "JOHNS", "JONES"]
    assert im.resolution == (64, 48)
    assert im.words == [SVTWord(x=5, y=6, width=20, height=10, tag="JOINT", raw_tag="JOINT")]
    assert im.words[0].xyxy == (5, 6, 25, 16) and im.words[0].area == 200
    assert split.name == "test"


def test_duplicate_lexicon_words_are_removed():
    im = _parse(_image_xml(lex="JOINT,JOHNS,JOINT,Jones,JONES"))[0]
    assert im.lexicon == ["JOINT", "JOHNS", "JONES"]
    assert len(im.raw_lexicon) == 5


def test_case_and_accents_in_tags_and_lexicon():
    rects = '<taggedRectangle height="4" width="4" x="0" y="0"><tag> Café </tag></taggedRectangle>'
    im = _parse(_image_xml(lex="café,Bar", rects=rects))[0]
    assert im.words[0].tag == "CAFÉ" and im.words[0].raw_tag == " Café "
    assert im.lexicon == ["CAFÉ", "BAR"]
    assert im.tags_not_in_lexicon == []
    folded = _parse(_image_xml(lex="café,Bar", rects=rects), strip_accents=True)[0]
    assert folded.words[0].tag == "CAFE" and folded.lexicon == ["CAFE", "BAR"]


def test_whitespace_everywhere():
    xml = ("<image>\n  <imageName>\n   img/a.jpg  \n</imageName>\n  <address>  </address>\n"
           "  <lex>\n JOINT ,\n  JOHNS\n</lex>\n  <Resolution x=' 64 ' y='48.0'/>\n"
           "  <taggedRectangles>\n    <taggedRectangle height='10' width='20' x='5' y='6'>\n"
           "      <tag>\n joint \n</tag>\n    </taggedRectangle>\n  </taggedRectangles>\n</image>")
    im = _parse(xml)[0]
    assert im.image_name == "img/a.jpg"
    assert im.address is None  # whitespace-only address is a missing address
    assert im.lexicon == ["JOINT", "JOHNS"]
    assert im.resolution == (64, 48)
    assert im.words[0].tag == "JOINT"


def test_missing_address_and_resolution_without_images():
    im = _parse(_image_xml(address=None, resolution=None))[0]
    assert im.address is None and im.resolution is None


def test_missing_resolution_is_read_from_the_image(tmp_path):
    _write_image(tmp_path, "img/00_01.jpg", size=(70, 30))
    (tmp_path / "test.xml").write_text(_tagset(_image_xml(resolution=None)))
    split = load_svt(tmp_path, "test")
    assert split[0].resolution == (70, 30)


def test_image_without_words_is_kept():
    im = _parse(_image_xml(rects=""))[0]
    assert im.words == [] and im.lexicon


def test_multiple_images_and_vocabularies(capsys):
    rect = '<taggedRectangle height="3" width="3" x="0" y="0"><tag>{}</tag></taggedRectangle>'
    split = _parse(_image_xml(name="img/a.jpg", lex="A,B,C", rects=rect.format("A") + rect.format("B")),
                   _image_xml(name="img/b.jpg", lex="A,D", rects=rect.format("A")))
    assert len(split) == 2 and split.n_words == 3
    assert split.vocabulary() == ["A", "B", "C", "D"]
    assert split.tag_vocabulary() == ["A", "B"]
    assert split.tag_counts()["A"] == 2 and split.lexicon_word_counts()["A"] == 2
    info = split.summary()
    out = capsys.readouterr().out
    assert "2 images" in out and "3 tagged words" in out and "lexicon vocabulary 4 words" in out
    assert info["images"] == 2 and info["words"] == 3 and info["unique_tags"] == 2
    assert info["min_lexicon_size"] == 2 and info["max_lexicon_size"] == 3
    assert info["mean_lexicon_size"] == pytest.approx(2.5)
    assert split.summary(print_=False)["lexicon_vocabulary"] == 4
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------
# errors name the file, the element and what was expected
# --------------------------------------------------------------------------------------------


def test_malformed_xml_names_file_and_position():
    with pytest.raises(SVTFormatError, match=r"test\.xml: malformed XML at line 2, column \d+"):
        parse_svt_xml("<tagset>\n<image><imageName>a</image></tagset>", "/x", source="test.xml")


def test_wrong_root_element():
    with pytest.raises(SVTFormatError, match=r"test\.xml: root element is <images>, expected <tagset>"):
        parse_svt_xml("<images/>", "/x", source="test.xml")


def test_missing_image_name():
    xml = _image_xml().replace("<imageName>img/00_01.jpg</imageName>", "")
    with pytest.raises(SVTFormatError, match=r"test\.xml: image #1: <imageName> is missing"):
        _parse(_image_xml(), xml)


@pytest.mark.parametrize("lex", [None, "", " , ,"])
def test_empty_lexicon_is_an_error(lex):
    with pytest.raises(SVTFormatError,
                       match=r"test\.xml: image #0 \(img/00_01\.jpg\): <lex> is missing or empty"):
        _parse(_image_xml(lex=lex))


@pytest.mark.parametrize("attrs", ['height="0" width="20" x="5" y="6"', 'height="10" width="0" x="5" y="6"',
                                   'height="10" width="-3" x="5" y="6"'])
def test_zero_area_box_is_an_error(attrs):
    rects = f"<taggedRectangle {attrs}><tag>JOINT</tag></taggedRectangle>"
    with pytest.raises(SVTFormatError, match=r"image #0 \(img/00_01\.jpg\): taggedRectangle #0: .*zero-area box"):
        _parse(_image_xml(rects=rects))


def test_zero_area_box_skipped_when_not_strict():
    rects = ('<taggedRectangle height="0" width="20" x="5" y="6"><tag>BAD</tag></taggedRectangle>'
             '<taggedRectangle height="10" width="20" x="5" y="6"><tag>JOINT</tag></taggedRectangle>')
    split = _parse(_image_xml(rects=rects), strict=False)
    assert split[0].tags == ["JOINT"]
    assert len(split.issues) == 1 and "taggedRectangle #0" in split.issues[0]


@pytest.mark.parametrize("rect, what", [
    ('<taggedRectangle height="10" width="20" x="5"><tag>A</tag></taggedRectangle>', "'y' is missing"),
    ('<taggedRectangle height="ten" width="20" x="5" y="1"><tag>A</tag></taggedRectangle>', "height='ten' is not a number"),
    ('<taggedRectangle height="10.5" width="20" x="5" y="1"><tag>A</tag></taggedRectangle>', "not a whole number"),
    ('<taggedRectangle height="10" width="20" x="5" y="1"><tag> </tag></taggedRectangle>', "<tag> is missing or empty"),
    ('<taggedRectangle height="10" width="20" x="5" y="1"></taggedRectangle>', "<tag> is missing or empty"),
])
def test_bad_rectangles(rect, what):
    with pytest.raises(SVTFormatError, match=r"test\.xml: image #0 .*taggedRectangle #0: .*" + __import__("re").escape(what)):
        _parse(_image_xml(rects=rect))


def test_bad_resolution_attribute():
    with pytest.raises(SVTFormatError, match=r"<Resolution>: attribute 'y' is missing"):
        _parse(_image_xml(resolution='<Resolution x="10"/>'))


def test_missing_image_file(tmp_path):
    (tmp_path / "test.xml").write_text(_tagset(_image_xml()))
    with pytest.raises(SVTFormatError, match=r"test\.xml: image #0 \(img/00_01\.jpg\): image file .* does not exist"):
        load_svt(tmp_path, "test")
    split = load_svt(tmp_path, "test", strict=False)
    assert len(split) == 0 and "image skipped" in split.issues[0]


def test_missing_xml_file(tmp_path):
    with pytest.raises(SVTFormatError, match=r"train\.xml: file not found"):
        load_svt(tmp_path, "train")


def test_unreadable_image(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/00_01.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "test.xml").write_text(_tagset(_image_xml()))
    split = load_svt(tmp_path, "test")  # resolution is in the XML: an unreadable header is left to load()
    with pytest.raises(SVTFormatError, match=r"image #0 \(img/00_01\.jpg\): .* is not a readable image"):
        split[0].load()


# --------------------------------------------------------------------------------------------
# images and crops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "RGB"])
def test_images_load_as_rgb(tmp_path, mode):
    _write_image(tmp_path, "img/00_01.png", mode=mode)
    (tmp_path / "test.xml").write_text(_tagset(_image_xml(name="img/00_01.png")))
    split = load_svt(tmp_path)
    im = split[0].load()
    assert im.mode == "RGB" and im.size == (64, 48)
    crops = split[0].crops()
    assert len(crops) == 1 and crops[0].size == (20, 10) and crops[0].mode == "RGB"


def test_crops_cut_the_right_pixels(tmp_path):
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[6:16, 5:25] = 255  # exactly the box x=5, y=6, w=20, h=10
    Image.fromarray(arr).save(tmp_path / "a.png")
    (tmp_path / "test.xml").write_text(_tagset(_image_xml(name="a.png")))
    split = load_svt(tmp_path)
    crop = np.asarray(split[0].crops()[0])
    assert crop.shape == (10, 20, 3) and (crop == 255).all()
    padded = np.asarray(split[0].crops(pad=0.5)[0])
    assert padded.shape == (20, 30, 3)  # 5 px margin on every side
    (c, tag, rec), = split.word_crops()
    assert tag == "JOINT" and rec is split[0] and c.size == (20, 10)


def test_crop_is_clipped_and_outside_box_is_an_error():
    image = Image.new("RGB", (30, 20))
    assert crop_word(image, SVTWord(25, 15, 10, 10, "A", "A")).size == (5, 5)
    with pytest.raises(SVTFormatError, match="lies outside the 30x20 image"):
        crop_word(image, SVTWord(40, 0, 5, 5, "A", "A"))


def test_load_both_splits_and_overlap(tmp_path):
    _write_image(tmp_path, "img/a.jpg")
    (tmp_path / "train.xml").write_text(_tagset(_image_xml(name="img/a.jpg", lex="A,B,C")))
    (tmp_path / "test.xml").write_text(_tagset(_image_xml(name="img/a.jpg", lex="B,C,D,E")))
    splits = load_svt_splits(tmp_path)
    assert set(splits) == {"train", "test"} and splits["train"].name == "train"
    assert lexicon_overlap(splits["train"], splits["test"]) == {
        "train_unique": 3, "test_unique": 4, "common": 2, "all_unique": 5}


# --------------------------------------------------------------------------------------------
# SynthSVT
# --------------------------------------------------------------------------------------------

from course_utils import signs  # noqa: E402
from course_utils import synthsvt as ss  # noqa: E402
from course_utils.svt import word_spotting_vocabulary  # noqa: E402


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return ss.make_synthsvt(tmp_path_factory.mktemp("synth"), n_train=6, n_test=10,
                            image_size=(200, 150), seed=3)


def test_synthsvt_is_read_by_the_svt_loader(synth_root):
    splits = load_svt_splits(synth_root)
    assert len(splits["train"]) == 6 and len(splits["test"]) == 10
    for split in splits.values():
        assert split.issues == []
        for im in split:
            assert im.resolution == (200, 150) and im.load().size == (200, 150)
            assert 1 <= len(im.words) <= 3
            assert len(im.lexicon) == 50 and len(set(im.lexicon)) == 50
            assert im.tags_not_in_lexicon == []  # every tagged word is in its lexicon
            assert im.address
            for w in im.words:
                assert w.area > 0 and w.x >= 0 and w.y >= 0
                assert w.x + w.width <= 200 and w.y + w.height <= 150
    assert len(word_spotting_vocabulary(list(splits.values()))) > 50


def test_synthsvt_boxes_contain_ink(synth_root):
    split = load_svt(synth_root, "test")
    for crop, tag, _ in split.word_crops():
        arr = np.asarray(crop.convert("L"), dtype=np.float32)
        # rendered text on a sign: the crop is not flat (ink vs board contrast)
        assert arr.std() > 10, tag


def test_synthsvt_is_deterministic_to_the_byte(synth_root, tmp_path):
    again = ss.make_synthsvt(tmp_path / "a", n_train=6, n_test=10, image_size=(200, 150), seed=3)
    assert _digest(again) == _digest(synth_root)
    other = ss.make_synthsvt(tmp_path / "b", n_train=6, n_test=10, image_size=(200, 150), seed=4)
    assert _digest(other) != _digest(synth_root)


def test_synthsvt_reuses_a_matching_folder(synth_root):
    before = (synth_root / "test.xml").stat().st_mtime_ns
    ss.make_synthsvt(synth_root, n_train=6, n_test=10, image_size=(200, 150), seed=3)
    assert (synth_root / "test.xml").stat().st_mtime_ns == before


def test_synthsvt_for_profile_smoke(tmp_path):
    from course_utils.profiles import get_config

    cfg = get_config("smoke").svt
    root = ss.make_synthsvt_for_profile(tmp_path, cfg)
    split = load_svt(root, "test")
    assert len(split) == cfg.n_test and split[0].resolution == tuple(cfg.image_size)


def test_svt_profile_section_has_identical_keys():
    from course_utils.profiles import all_profiles

    keys = {name: set(cfg.svt) for name, cfg in all_profiles().items()}
    assert keys["smoke"] == keys["cpu"] == keys["full"]
    assert all_profiles()["cpu"].svt.n_train == 100 and all_profiles()["cpu"].svt.n_test == 249


def test_zipf_weights_are_long_tailed():
    p = ss.zipf_weights(200)
    assert p.shape == (200,) and p.sum() == pytest.approx(1.0)
    assert np.all(np.diff(p) < 0)
    assert p[:10].sum() > 0.3 and p[100:].sum() < 0.15


def test_word_frequencies_follow_the_vocabulary_rank():
    rng = np.random.default_rng(0)
    p = ss.zipf_weights(len(ss.STREET_WORDS))
    counts = {}
    for _ in range(400):
        for sign in ss._sample_words(rng, ss.STREET_WORDS, p, 3):
            for w in sign:
                counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=counts.get, reverse=True)
    assert "RESTAURANT" in ranked[:3]
    assert sum(c == 1 for c in counts.values()) > 20  # many words seen once: the long tail


def test_lookalikes_are_one_or_two_edits_away():
    rng = np.random.default_rng(1)
    out = ss.lookalikes("JOINT", 8, rng)
    assert len(out) == 8 and len(set(out)) == 8 and "JOINT" not in out
    assert all(1 <= ss._edit_distance(w, "JOINT") <= 2 for w in out)
    # real vocabulary neighbours come first
    near = ss.lookalikes("JOHNS", 1, np.random.default_rng(0))
    assert near[0] in ss.STREET_WORDS and ss._edit_distance(near[0], "JOHNS") <= 2


def test_edit_distance_hand_cases():
    assert ss._edit_distance("JOINT", "JOINT") == 0
    assert ss._edit_distance("JOHNS", "JONES") == 2
    assert ss._edit_distance("CAFE", "CAFES") == 1
    assert ss._edit_distance("", "ABC") == 3


def test_make_lexicon_contents():
    rng = np.random.default_rng(2)
    lex = ss.make_lexicon(["JOINT", "PIZZA"], rng, size=50)
    assert len(lex) == 50 and len(set(lex)) == 50
    assert {"JOINT", "PIZZA"} <= set(lex)
    close = [w for w in lex if w not in ("JOINT", "PIZZA")
             and min(ss._edit_distance(w, "JOINT"), ss._edit_distance(w, "PIZZA")) <= 2]
    assert len(close) >= 10  # many look-alike distractors


def test_all_fonts_render():
    rng = np.random.default_rng(0)
    for name in signs.FONT_NAMES:
        layer = signs._render_word("JOINT", name, 24, (0, 0, 0), rng, rotate=3.0, shear=0.1)
        assert layer.mode == "RGBA" and layer.width > layer.height > 5, name


def test_word_stream_is_deterministic_and_seekable():
    stream = ss.WordStream(["JOINT", "JOHNS", "JONES"], seed=5, lookalike_rate=0.5)
    a = [stream.sample(i) for i in range(6)]
    b = ss.WordStream(["JOINT", "JOHNS", "JONES"], seed=5, lookalike_rate=0.5).sample(4)
    assert np.array_equal(np.asarray(a[4][0]), np.asarray(b[0])) and a[4][1] == b[1]
    assert [stream.text(i) for i in range(6)] == [t for _, t in a]
    for im, _text in a:
        assert im.mode == "RGB" and im.width > im.height
    first = [t for _, t in zip(range(3), iter(stream))]
    assert [t for _, t in first] == [t for _, t in a[:3]]
    with pytest.raises(ValueError, match="words is empty"):
        ss.WordStream([])
    with pytest.raises(ValueError, match="weights must be 2"):
        ss.WordStream(["A", "B"], weights=[1.0])


def test_frontal_and_street_signs_differ_by_the_street_only():
    """The pretraining domain (frontal) and SynthSVT's (street) share fonts, palettes and texts;
    only the street adds perspective, grain, uneven light and occluders."""
    fronts = [signs._sample_style(np.random.default_rng(k), 24, signs.FONT_NAMES, street=False) for k in range(40)]
    streets = [signs._sample_style(np.random.default_rng(k), 24, signs.FONT_NAMES) for k in range(40)]
    assert all(s.far == 1.0 for s in fronts) and any(s.far < 1.0 for s in streets)
    assert [s.font for s in fronts] == [s.font for s in streets]
    style = fronts[0]
    flat, _ = signs._make_sign(["JOINT"], style, np.random.default_rng(1), street=False)
    worn, _ = signs._make_sign(["JOINT"], style, np.random.default_rng(1))
    # the same layout, weathered or not: the top row (the board's edge, no ink) is one or two flat
    # colours head-on, and many after grain and light
    colours = lambda im: len(np.unique(np.asarray(im)[0].reshape(-1, 3), axis=0))  # noqa: E731
    assert flat.size == worn.size and colours(flat) <= 2 < 10 < colours(worn)
    f = ss.WordStream(["JOINT", "PIZZA"], seed=2, domain="frontal")
    st = ss.WordStream(["JOINT", "PIZZA"], seed=2, domain="street")
    assert [f.text(i) for i in range(8)] == [st.text(i) for i in range(8)]
    assert not np.array_equal(np.asarray(f.sample(0)[0]), np.asarray(st.sample(0)[0]))
    with pytest.raises(ValueError, match=r"domain='clean', expected one of \('frontal', 'street'\)"):
        ss.WordStream(["A"], domain="clean")
