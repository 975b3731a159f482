"""Street View Text (SVT) in its original XML layout: typed records, word crops, lexicons.

Notebooks 06-07 (seed 004 Ch. 2).  The real SVT release is a folder with ``train.xml``,
``test.xml`` and ``img/``; every ``<image>`` element of an XML file looks like::

    <image>
      <imageName>img/14_03.jpg</imageName>
      <address>1234 Main St ...</address>
      <lex>JOINT,JOHNS,JONES,...</lex>                 (about 50 words, comma separated)
      <Resolution x="1280" y="880"/>
      <taggedRectangles>
        <taggedRectangle height="42" width="120" x="310" y="205"><tag>JOINT</tag></taggedRectangle>
      </taggedRectangles>
    </image>

:func:`load_svt` turns one such file into an :class:`SVTSplit` of :class:`SVTImage` records.
The synthetic set of :mod:`course_utils.synthsvt` writes the same schema, so one loader serves
both.

How the real quirks are handled (each one is covered by ``tests/test_svt.py``):

* **case** — words are compared in upper case, like SVT's own tags; the text as written in the
  file stays available as ``raw_tag`` / ``raw_lexicon``.
* **accents** — kept (``CAFÉ`` stays ``CAFÉ``), but Unicode-normalised (NFC) so that a composed
  and a decomposed ``É`` are the same word.  ``strip_accents=True`` folds them to ASCII.
* **whitespace** — stripped at both ends and collapsed inside a word; empty lexicon entries
  (``A,,B`` or a trailing comma) are dropped.
* **duplicate lexicon words** — removed, first occurrence kept, order otherwise unchanged.
* **missing** ``<address>`` → ``None``; missing ``<Resolution>`` → read from the image header
  (or ``None`` when the image is not checked).
* **grayscale / palette / CMYK images** → converted to RGB by :meth:`SVTImage.load`.
* **malformed XML, a missing or unreadable image (a decompression bomb included), an empty
  lexicon, a zero-area box or one entirely outside the image, a missing tag, a**
  ``<Resolution>`` **that is not the image's size** → an :class:`SVTFormatError` that names the
  file, the image (index and ``imageName``), the element and what was expected.  With
  ``strict=False`` a missing image, a wrong resolution or a bad box is skipped instead and the
  reason is recorded in :attr:`SVTSplit.issues`; malformed XML is always an error, and so is an
  ``imageName`` that leaves the dataset folder (``../x.jpg``, an absolute path).
"""

from __future__ import annotations

import os
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from PIL import Image

__all__ = ["SVTFormatError", "SVTWord", "SVTImage", "SVTSplit", "normalise_word", "parse_lexicon",
           "parse_svt_xml", "load_svt", "load_svt_splits", "crop_word", "lexicon_overlap",
           "word_spotting_vocabulary"]

SPLIT_FILES = {"train": "train.xml", "test": "test.xml"}


class SVTFormatError(ValueError):
    """An SVT file or image that does not match the expected layout.

    The message always starts with the file, then names the element at fault and says what
    was expected, e.g. ``"test.xml: image #3 (img/14_03.jpg): taggedRectangle #1: width=0 ..."``.
    """


# --------------------------------------------------------------------------------------------
# words and lexicons
# --------------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalise_word(text: str, *, strip_accents: bool = False) -> str:
    """Return ``text`` as SVT compares words: NFC, trimmed, inner spaces collapsed, upper case.

    >>> normalise_word("  café\\n")
    'CAFÉ'
    >>> normalise_word("Café", strip_accents=True)
    'CAFE'
    """
    # NFC first so that "E" + combining acute and the single code point "É" compare equal.
    text = unicodedata.normalize("NFC", text)
    text = _SPACES.sub(" ", text).strip().upper()
    if strip_accents:
        decomposed = unicodedata.normalize("NFD", text)
        text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return text


def parse_lexicon(text: str | None, *, strip_accents: bool = False) -> tuple[list[str], list[str]]:
    """Split a ``<lex>`` string into ``(normalised, raw)`` word lists.

    Empty entries are dropped; normalised duplicates are removed keeping the first occurrence
    (so ``"Joint,JOINT,joint "`` gives ``["JOINT"]``); ``raw`` keeps every non-empty entry as
    written, duplicates included, so nothing in the file is lost.
    """
    raw = [w.strip() for w in (text or "").split(",")]
    raw = [w for w in raw if w]
    # dict preserves insertion order: a cheap ordered de-duplication.
    normalised = list(dict.fromkeys(normalise_word(w, strip_accents=strip_accents) for w in raw))
    return normalised, raw


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SVTWord:
    """One ``taggedRectangle``: a word box in pixel coordinates and its text.

    Attributes:
        x, y, width, height: the box as SVT writes it (top-left corner and size, pixels).
        tag: the word, normalised (upper case, trimmed, NFC).
        raw_tag: the word exactly as written in the XML.
    """

    x: int
    y: int
    width: int
    height: int
    tag: str
    raw_tag: str

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        """The box as ``(x1, y1, x2, y2)``, the convention of ``torchvision.ops``."""
        return (self.x, self.y, self.x + self.width, self.y + self.height)

    @property
    def area(self) -> int:
        return self.width * self.height


@dataclass
class SVTImage:
    """One ``<image>`` element: the picture, where it was taken, its lexicon and its words.

    Attributes:
        index: position of the element in its XML file (0-based), used in error messages.
        image_name: ``imageName`` as written, relative to the dataset root (``img/14_03.jpg``).
        path: absolute path of the image file.
        address: the street address, or ``None`` when the element is missing or empty.
        lexicon: the normalised, de-duplicated lexicon (about 50 words in SVT).
        raw_lexicon: the lexicon entries as written (duplicates and case kept).
        resolution: ``(width, height)`` in pixels, from ``<Resolution>`` or the image header;
            ``None`` when neither was available.
        words: the tagged word boxes, in file order.
    """

    index: int
    image_name: str
    path: Path
    address: str | None
    lexicon: list[str]
    raw_lexicon: list[str]
    resolution: tuple[int, int] | None
    words: list[SVTWord] = field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        """The normalised words of the image, in file order (duplicates kept)."""
        return [w.tag for w in self.words]

    @property
    def tags_not_in_lexicon(self) -> list[str]:
        """Tags missing from the lexicon (SVT guarantees none; handy to check a new file)."""
        lex = set(self.lexicon)
        return [t for t in self.tags if t not in lex]

    def load(self) -> Image.Image:
        """Open the image as RGB (grayscale, palette and CMYK files are converted).

        Raises:
            SVTFormatError: the file is missing or is not an image PIL can read.
        """
        return _open_rgb(self.path, where=f"image #{self.index} ({self.image_name})")

    def crops(self, pad: float = 0.0) -> list[Image.Image]:
        """Return one RGB crop per word box (see :func:`crop_word` for ``pad``)."""
        image = self.load()
        where = f"{self.path}: image #{self.index} ({self.image_name})"
        return [crop_word(image, w, pad=pad, where=where) for w in self.words]


@dataclass
class SVTSplit:
    """All images of one SVT XML file (``train.xml`` or ``test.xml``).

    Attributes:
        name: ``"train"``, ``"test"`` or the file's stem.
        xml_path: the file that was read.
        root: the dataset folder that ``imageName`` paths are relative to.
        images: one :class:`SVTImage` per kept ``<image>`` element.
        issues: what ``strict=False`` skipped, one human-readable line each.
    """

    name: str
    xml_path: Path
    root: Path
    images: list[SVTImage]
    issues: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[SVTImage]:
        return iter(self.images)

    def __getitem__(self, i: int) -> SVTImage:
        return self.images[i]

    @property
    def n_words(self) -> int:
        """Number of tagged word boxes over all images."""
        return sum(len(im.words) for im in self.images)

    def vocabulary(self) -> list[str]:
        """Sorted unique words over all lexicons of the split (the thesis's ``W``)."""
        return sorted({w for im in self.images for w in im.lexicon})

    def tag_vocabulary(self) -> list[str]:
        """Sorted unique tagged words (the words that are really written in the images)."""
        return sorted({w.tag for im in self.images for w in im.words})

    def lexicon_word_counts(self) -> Counter[str]:
        """How many lexicons each word appears in (the frequencies of the thesis's Fig. 2.2-2.3)."""
        return Counter(w for im in self.images for w in im.lexicon)

    def tag_counts(self) -> Counter[str]:
        """How often each word is tagged in an image."""
        return Counter(w.tag for im in self.images for w in im.words)

    def word_crops(self, pad: float = 0.0) -> list[tuple[Image.Image, str, SVTImage]]:
        """Every word box of the split as ``(rgb_crop, tag, image_record)``, in file order."""
        out: list[tuple[Image.Image, str, SVTImage]] = []
        for im in self.images:
            out.extend((crop, w.tag, im) for crop, w in zip(im.crops(pad=pad), im.words))
        return out

    def summary(self, print_: bool = True) -> dict[str, float | int | str]:
        """Count images, words, lexicon sizes and vocabularies; print them unless ``print_=False``.

        Returns:
            a dict with ``split, images, words, unique_tags, lexicon_vocabulary,
            mean_lexicon_size, min_lexicon_size, max_lexicon_size, images_without_resolution,
            issues``.
        """
        sizes = [len(im.lexicon) for im in self.images] or [0]
        info: dict[str, float | int | str] = {
            "split": self.name,
            "images": len(self.images),
            "words": self.n_words,
            "unique_tags": len(self.tag_vocabulary()),
            "lexicon_vocabulary": len(self.vocabulary()),
            "mean_lexicon_size": sum(sizes) / len(sizes),
            "min_lexicon_size": min(sizes),
            "max_lexicon_size": max(sizes),
            "images_without_resolution": sum(im.resolution is None for im in self.images),
            "issues": len(self.issues),
        }
        if print_:
            print(
                f"SVT {self.name} ({self.xml_path.name}): {info['images']} images, "
                f"{info['words']} tagged words ({info['unique_tags']} unique), "
                f"lexicon vocabulary {info['lexicon_vocabulary']} words, lexicon size "
                f"{info['min_lexicon_size']}-{info['max_lexicon_size']} "
                f"(mean {info['mean_lexicon_size']:.1f})"
                + (f", {info['issues']} skipped item(s)" if self.issues else "")
            )
        return info


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


def _open_rgb(path: Path, where: str) -> Image.Image:
    """Open ``path`` fully and return it as RGB; errors name ``where`` and the file."""
    if not path.is_file():
        raise SVTFormatError(f"{where}: image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            # SVT is RGB JPEG, but a grayscale ("L"), palette ("P") or CMYK file would give the
            # model a tensor with the wrong number of channels: convert instead of failing.
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except (OSError, Image.DecompressionBombError) as err:
        raise SVTFormatError(f"{where}: {path} is not a readable image ({err})") from err


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """``(width, height)`` from the header alone (PIL opens lazily); errors name ``where``."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, Image.DecompressionBombError) as err:  # e.g. a header claiming 30000x30000
        raise SVTFormatError(f"{where}: {path} is not a readable image ({err})") from err


def _inside_root(name: str, where: str) -> None:
    """``imageName`` must stay inside the dataset folder: no absolute path, no ``..`` above it.
    Checked on the name, not the resolved path, so an ``img/`` symlinked into a cache still loads."""
    normal = os.path.normpath(name.replace("\\", "/"))
    if os.path.isabs(normal) or PureWindowsPath(name).drive or normal == ".." or normal.startswith("../"):
        raise SVTFormatError(f"{where}: <imageName> {name!r} points outside the dataset folder "
                             "(expected a path relative to it, such as img/14_03.jpg)")


def _text(elem: ET.Element | None) -> str | None:
    """Stripped text of ``elem``; ``None`` when the element is missing or empty."""
    if elem is None or elem.text is None:
        return None
    text = elem.text.strip()
    return text or None


def _int_attr(elem: ET.Element, name: str, where: str) -> int:
    """Read integer attribute ``name`` (SVT sometimes writes ``"12.0"``; accept whole floats)."""
    value = elem.get(name)
    if value is None:
        raise SVTFormatError(f"{where}: attribute {name!r} is missing (expected an integer)")
    try:
        number = float(value.strip())
    except ValueError:
        raise SVTFormatError(f"{where}: attribute {name}={value!r} is not a number") from None
    if number != int(number):
        raise SVTFormatError(f"{where}: attribute {name}={value!r} is not a whole number of pixels")
    return int(number)


def _parse_word(rect: ET.Element, where: str, strip_accents: bool,
                resolution: tuple[int, int] | None = None) -> SVTWord:
    """One ``taggedRectangle`` → :class:`SVTWord`; errors for a missing tag, zero area or a box
    with no pixel inside the image (when its ``resolution`` is known: crop_word clips the rest)."""
    x, y = _int_attr(rect, "x", where), _int_attr(rect, "y", where)
    w, h = _int_attr(rect, "width", where), _int_attr(rect, "height", where)
    if w <= 0 or h <= 0:
        raise SVTFormatError(
            f"{where}: width={w}, height={h} is a zero-area box (expected width > 0 and height > 0)"
        )
    if resolution is not None and (x >= resolution[0] or y >= resolution[1] or x + w <= 0 or y + h <= 0):
        raise SVTFormatError(f"{where}: box x={x}, y={y}, width={w}, height={h} lies entirely "
                             f"outside the {resolution[0]}x{resolution[1]} image")
    raw = rect.findtext("tag")
    tag = normalise_word(raw or "", strip_accents=strip_accents)
    if not tag:
        raise SVTFormatError(f"{where}: <tag> is missing or empty (expected the word in the box)")
    return SVTWord(x=x, y=y, width=w, height=h, tag=tag, raw_tag=raw if raw is not None else "")


def _parse_image(
    elem: ET.Element,
    index: int,
    root: Path,
    src: str,
    *,
    check_images: bool,
    strict: bool,
    strip_accents: bool,
    issues: list[str],
) -> SVTImage | None:
    """One ``<image>`` element → :class:`SVTImage` (``None`` when skipped with ``strict=False``)."""
    name = _text(elem.find("imageName"))
    if name is None:
        raise SVTFormatError(
            f"{src}: image #{index}: <imageName> is missing or empty "
            "(expected a path such as img/14_03.jpg)"
        )
    where = f"{src}: image #{index} ({name})"
    _inside_root(name, where)
    path = (root / name).resolve()

    if check_images and not path.is_file():
        msg = f"{where}: image file {path} does not exist (imageName is relative to {root})"
        if strict:
            raise SVTFormatError(msg)
        issues.append(msg + " -> image skipped")
        return None

    lexicon, raw_lexicon = parse_lexicon(elem.findtext("lex"), strip_accents=strip_accents)
    if not lexicon:
        # Without a lexicon the image cannot be scored by word spotting: always an error.
        raise SVTFormatError(f"{where}: <lex> is missing or empty (expected comma-separated words)")

    resolution: tuple[int, int] | None = None
    res = elem.find("Resolution")
    if res is not None:
        resolution = (_int_attr(res, "x", f"{where}: <Resolution>"),
                      _int_attr(res, "y", f"{where}: <Resolution>"))
        try:  # an unreadable image is reported by SVTImage.load(), as before
            real = _image_size(path, where) if check_images else resolution
        except SVTFormatError:
            real = resolution
        if real != resolution:
            msg = (f"{where}: <Resolution> says {resolution[0]}x{resolution[1]} but {path} is "
                   f"{real[0]}x{real[1]} pixels (expected the image's size)")
            if strict:
                raise SVTFormatError(msg)
            issues.append(msg + " -> image skipped")
            return None
    elif check_images:
        resolution = _image_size(path, where)

    words: list[SVTWord] = []
    rects = elem.find("taggedRectangles")
    for k, rect in enumerate(rects.findall("taggedRectangle") if rects is not None else []):
        try:
            words.append(_parse_word(rect, f"{where}: taggedRectangle #{k}", strip_accents, resolution))
        except SVTFormatError as err:
            if strict:
                raise
            issues.append(f"{err} -> box skipped")

    return SVTImage(index=index, image_name=name, path=path, address=_text(elem.find("address")),
                    lexicon=lexicon, raw_lexicon=raw_lexicon, resolution=resolution, words=words)


def parse_svt_xml(
    xml: str | bytes,
    root: str | Path,
    *,
    source: str = "<string>",
    name: str | None = None,
    check_images: bool = True,
    strict: bool = True,
    strip_accents: bool = False,
) -> SVTSplit:
    """Parse the text of an SVT XML file.

    Args:
        xml: the file's content.
        root: the folder that ``imageName`` paths are relative to.
        source: the file name used in error messages.
        name: the split's name (default: the stem of ``source``).
        check_images: check that every image exists and read missing resolutions from its
            header.  ``False`` parses the XML alone (tests, or a quick look without images).
        strict: raise on a missing image or a bad word box; ``False`` skips them and records
            why in ``SVTSplit.issues``.
        strip_accents: fold accented letters to ASCII (``CAFÉ`` → ``CAFE``).

    Raises:
        SVTFormatError: malformed XML, a root that is not ``<tagset>``, an ``<image>`` without
            ``imageName`` or lexicon, a bad box or a missing image (when ``strict``).
    """
    try:
        tree = ET.fromstring(xml)
    except ET.ParseError as err:
        line, col = err.position
        raise SVTFormatError(
            f"{source}: malformed XML at line {line}, column {col} ({err}); "
            "expected <tagset><image>...</image>...</tagset>"
        ) from err
    if tree.tag != "tagset":
        raise SVTFormatError(f"{source}: root element is <{tree.tag}>, expected <tagset>")
    root = Path(root)
    issues: list[str] = []
    images = []
    for index, elem in enumerate(tree.findall("image")):
        record = _parse_image(elem, index, root, source, check_images=check_images,
                              strict=strict, strip_accents=strip_accents, issues=issues)
        if record is not None:
            images.append(record)
    return SVTSplit(name=name or Path(source).stem, xml_path=Path(source), root=root, images=images,
                    issues=issues)


def load_svt(
    root: str | Path,
    split: str = "test",
    *,
    check_images: bool = True,
    strict: bool = True,
    strip_accents: bool = False,
) -> SVTSplit:
    """Read ``root/train.xml`` or ``root/test.xml`` (or any ``split`` that is an XML file name).

    Works for the real SVT folder and for a SynthSVT folder alike.  See :func:`parse_svt_xml`
    for the keyword arguments.
    """
    root = Path(root)
    xml_path = root / SPLIT_FILES.get(split, split)
    if not xml_path.is_file():
        raise SVTFormatError(
            f"{xml_path}: file not found (expected an SVT folder with train.xml, test.xml and img/)"
        )
    return parse_svt_xml(
        xml_path.read_bytes(),
        root,
        source=str(xml_path),
        name=split if split in SPLIT_FILES else xml_path.stem,
        check_images=check_images,
        strict=strict,
        strip_accents=strip_accents,
    )


def load_svt_splits(root: str | Path, **kwargs: bool) -> dict[str, SVTSplit]:
    """Both splits of an SVT folder: ``{"train": SVTSplit, "test": SVTSplit}``."""
    return {s: load_svt(root, s, **kwargs) for s in SPLIT_FILES}


# --------------------------------------------------------------------------------------------
# crops and EDA helpers
# --------------------------------------------------------------------------------------------


def crop_word(image: Image.Image, word: SVTWord, pad: float = 0.0, where: str | None = None) -> Image.Image:
    """Cut ``word``'s box out of ``image``, grown by ``pad`` × box height on every side.

    The box is clipped to the image, because real SVT boxes sometimes reach past its border.
    ``where`` (the file and image, as :meth:`SVTImage.crops` gives it) starts the error message.

    Raises:
        SVTFormatError: the box lies entirely outside the image.
    """
    margin = pad * word.height
    x1, y1, x2, y2 = word.xyxy
    W, H = image.size
    box = (max(0, round(x1 - margin)), max(0, round(y1 - margin)),
           min(W, round(x2 + margin)), min(H, round(y2 + margin)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise SVTFormatError(
            (f"{where}: " if where else "") + f"word {word.tag!r}: box {word.xyxy} lies outside the {W}x{H} image"
        )
    return image.crop(box)


def lexicon_overlap(train: SVTSplit, test: SVTSplit) -> dict[str, int]:
    """Unique lexicon words per split, in both, and overall (seed 004 §2.1.1 "Lexicon Overlap")."""
    a, b = set(train.vocabulary()), set(test.vocabulary())
    return {"train_unique": len(a), "test_unique": len(b), "common": len(a & b), "all_unique": len(a | b)}


def word_spotting_vocabulary(splits: Sequence[SVTSplit]) -> list[str]:
    """Sorted union of the lexicon vocabularies of ``splits`` (the columns of matrix ``P``)."""
    return sorted({w for s in splits for w in s.vocabulary()})
