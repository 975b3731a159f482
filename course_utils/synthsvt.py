"""SynthSVT: a synthetic street-sign word set in the SVT layout, made on the spot from a seed.

Notebooks 06-07 (seed 004 Ch. 2) run offline on this set when the real SVT is not available.
:func:`make_synthsvt` writes a folder the SVT loader reads unchanged::

    root/train.xml  root/test.xml  root/img/00_00.jpg ...

Every image is a street scene (sky/facade gradient, windows, poles, noise) with one or two
signs carrying one to three words, rendered with PIL in several fonts, colours and sizes,
slightly rotated and sheared, half of them seen from the side, all of them weathered (grain,
uneven light, sometimes a pole or leaves in front; :mod:`course_utils.signs`).  Words follow a long-tailed (Zipf) distribution over
:data:`STREET_WORDS`, so a few words (RESTAURANT, THE, INC, HOTEL, ...) are frequent and most are
rare, as in the thesis's Fig. 2.2-2.3.  Each image gets a 50-word lexicon: its own words plus
distractors, many of them look-alikes (edit distance 1-2, e.g. JOINT / JOINS / POINT).

:class:`WordStream` renders single word crops in memory with the same sign renderer
(:mod:`course_utils.signs`), fast enough to pretrain the course's small CLIP on hundreds of
thousands of words.

Determinism: image ``k`` of a split depends only on ``(seed, split, k)`` and the other knobs;
the same call writes identical bytes (JPEG quality fixed, no timestamps in the files).
"""

from __future__ import annotations

import os
import shutil
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image

from .signs import (
    FONT_NAMES,
    RENDERER_VERSION,
    load_font,
    render_scene,
    word_crop,
)

__all__ = [
    "STREET_WORDS",
    "FONT_NAMES",
    "zipf_weights",
    "lookalikes",
    "make_lexicon",
    "render_scene",
    "street_scene",
    "make_synthsvt",
    "make_synthsvt_for_profile",
    "WordStream",
    "WORD_DOMAINS",
    "RENDERER_VERSION",
    "load_font",
]

# Street-sign and business words, most frequent first (the Zipf rank order).  The first eight
# are the thesis's most common SVT words (seed 004 §2.1.1).
STREET_WORDS: tuple[str, ...] = tuple("""
RESTAURANT THE INC HOTEL CAFE CENTER BAR AND PIZZA BANK STREET DELI BAKERY MARKET PARKING
PHARMACY GRILL SHOP STORE PUB COFFEE BOOKS HAIR SALON DENTAL CLINIC LAW OFFICE TAVERN INN
DINER BISTRO KITCHEN GARDEN FLOWERS FLORIST JEWELRY GALLERY THEATER CINEMA MUSEUM LIBRARY
SCHOOL CHURCH HOSPITAL MEDICAL CENTRAL CITY PARK PLAZA SQUARE AVENUE ROAD MAIN NORTH SOUTH EAST
WEST OPEN CLOSED SALE GOLD SILVER STAR SUN MOON ROYAL GRAND PALACE LOUNGE CLUB SPORTS FITNESS
YOGA SPA NAILS BEAUTY BARBER TAILOR CLEANERS LAUNDRY AUTO REPAIR TIRES GARAGE MOTEL SUITES
TOWER TRUST SAVINGS LOANS INSURANCE REALTY HOMES LOFTS STUDIO PHOTO PRINT COPY MAIL POST EXPRESS
FOOD FRESH FARM WINE LIQUOR BEER SPIRITS TACO BURGER SUSHI NOODLE THAI CHINA INDIA PARIS ROMA
NAPOLI TOKYO JOINT HOUSE HOME BEST FIRST NEW OLD BIG LITTLE GREEN RED BLUE WHITE BLACK ORANGE
CORNER VILLAGE TOWN COUNTY STATE UNION NATIONAL AMERICAN PACIFIC ATLANTIC HARBOR BAY LAKE RIVER
HILL VALLEY OAK PINE MAPLE CEDAR ELM ROSE LILY DAISY BELL CROWN KING QUEEN PRINCE EAGLE LION
TIGER BEAR WOLF FOX HAWK DOVE SWAN OCEAN ISLAND CAPITAL METRO TRANSIT STATION TERMINAL AIRPORT
TAXI BUS TRAIN SUBWAY EXIT ENTRANCE TOILET PHONE MOBILE COMPUTER ELECTRONICS MUSIC RECORDS VIDEO
GAMES TOYS KIDS BABY PETS VET ANIMAL SEAFOOD STEAK HOUSE TAPAS PASTA GELATO ICE CREAM DONUTS
BAGELS JUICE TEA WINERY BREWERY CELLAR VAULT SUPPLY HARDWARE LUMBER PAINT GLASS DOORS FLOORS
TILE STONE MARBLE FURNITURE MATTRESS LIGHTING DESIGN ART FRAMES CRAFTS FABRIC SHOES BOOTS
DENIM OUTLET BOUTIQUE FASHION OPTICAL VISION HEARING TRAVEL TOURS CHARTER RENTAL STORAGE MOVERS
JOHNS JONES SMITH CARROLL CARLTON CARVEL SOPRA SOPRANO SOTTO CANTO BRAZILIAN MARIO LUIGI TONY
SAMS JOES MAXS ROSAS LUCKY HAPPY GOLDEN DRAGON PHOENIX LOTUS BAMBOO JASMINE SAFFRON OLIVE BASIL
""".split())
# duplicates in the text above (HOUSE) are removed, first occurrence kept
STREET_WORDS = tuple(dict.fromkeys(STREET_WORDS))


# --------------------------------------------------------------------------------------------
# words: Zipf weights, look-alikes, lexicons
# --------------------------------------------------------------------------------------------


def zipf_weights(n: int, exponent: float = 1.1) -> np.ndarray:
    """Probabilities ``∝ 1 / rank**exponent`` for ranks ``1..n``; shape ``(n,)``, sums to 1."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (two-row dynamic programme; words are short)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _random_edit(word: str, rng: np.random.Generator) -> str:
    """One substitution, insertion, deletion or adjacent swap with an uppercase letter."""
    letters = string.ascii_uppercase
    i = int(rng.integers(len(word)))
    op = int(rng.integers(4)) if len(word) > 2 else int(rng.integers(2))
    c = letters[int(rng.integers(26))]
    if op == 0:
        return word[:i] + c + word[i + 1:]
    if op == 1:
        return word[:i] + c + word[i:]
    if op == 2:
        return word[:i] + word[i + 1:]
    i = min(i, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def lookalikes(word: str, k: int, rng: np.random.Generator,
               vocabulary: Sequence[str] = STREET_WORDS, exclude: set[str] | None = None) -> list[str]:
    """``k`` words that look like ``word``: edit distance 1-2 from it, all different.

    Real words of ``vocabulary`` within distance 2 come first (they make the hardest
    distractors: JONES for JOHNS); the rest are random one- or two-letter edits.
    """
    exclude = set(exclude or ()) | {word}
    near = [v for v in vocabulary if v not in exclude and abs(len(v) - len(word)) <= 2
            and _edit_distance(v, word) <= 2]
    rng.shuffle(near)
    out = near[:k]
    seen = exclude | set(out)
    tries = 0
    while len(out) < k and tries < 50 * k:
        tries += 1
        cand = _random_edit(word, rng)
        if rng.random() < 0.5:  # about half of the synthetic ones are two edits away
            cand = _random_edit(cand, rng)
        if len(cand) >= 2 and cand not in seen and _edit_distance(cand, word) <= 2:
            out.append(cand)
            seen.add(cand)
    return out


def make_lexicon(words: Sequence[str], rng: np.random.Generator, size: int = 50,
                 vocabulary: Sequence[str] = STREET_WORDS, lookalikes_per_word: int = 6,
                 zipf_exponent: float = 1.1) -> list[str]:
    """A ``size``-word lexicon: ``words`` + look-alikes of each + Zipf-sampled vocabulary words.

    The order is shuffled, so a word's position says nothing about whether it is in the image.
    """
    lex = list(dict.fromkeys(words))
    for w in list(lex):
        lex += lookalikes(w, lookalikes_per_word, rng, vocabulary, exclude=set(lex))
    lex = lex[:size]
    p = zipf_weights(len(vocabulary), zipf_exponent)
    chosen = set(lex)
    while len(lex) < size:
        # the real SVT lexicons are nearby business names: frequent words are frequent here too
        v = vocabulary[int(rng.choice(len(vocabulary), p=p))]
        if v not in chosen:
            lex.append(v)
            chosen.add(v)
    order = rng.permutation(len(lex))
    return [lex[i] for i in order]



# --------------------------------------------------------------------------------------------
# the SVT-format folder
# --------------------------------------------------------------------------------------------


#: the seed word of each stream of scenes: SynthSVT's splits, and the scenes the course's mask
#: generator trains on (``tools/train_mask_generator.py``), which no split contains
_SPLIT_IDS = {"train": 0, "test": 1, "masks": 2}


def _sample_words(rng: np.random.Generator, vocabulary: Sequence[str], p: np.ndarray,
                  max_words: int) -> list[list[str]]:
    """Words of one image grouped per sign: 1-2 signs, 1-``max_words`` distinct words in all."""
    n_words = int(rng.integers(1, max_words + 1))
    words: list[str] = []
    while len(words) < n_words:
        w = vocabulary[int(rng.choice(len(vocabulary), p=p))]
        if w not in words:
            words.append(w)
    if n_words >= 2 and rng.random() < 0.5:
        cut = int(rng.integers(1, n_words))
        return [words[:cut], words[cut:]]
    return [words]


def street_scene(seed: int, stream: str, k: int, *, image_size: tuple[int, int] = (480, 360),
                 max_words: int = 3, zipf_exponent: float = 1.1, vocabulary: Sequence[str] = STREET_WORDS,
                 ) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]], list[list[str]],
                            np.random.Generator]:
    """Scene ``k`` of ``stream`` (``"train"``, ``"test"`` or ``"masks"``): SynthSVT's drawing of one image.

    Returns:
        the RGB scene (``image_size`` = ``(W, H)``), its ``(word, (x1, y1, x2, y2))`` boxes, the words
        drawn per sign (a sign that did not fit has words but no boxes), and the random generator, drawn from ``np.random.default_rng([seed, stream id, k])``, after the
        scene (SynthSVT draws the image's lexicon and address from it next).
    """
    if stream not in _SPLIT_IDS:
        raise ValueError(f"street_scene: stream={stream!r}, expected one of {sorted(_SPLIT_IDS)}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[stream], k])
    signs = _sample_words(rng, vocabulary, zipf_weights(len(vocabulary), zipf_exponent), max_words)
    scene, boxes = render_scene(signs, rng, tuple(image_size))
    return scene, boxes, signs, rng


def _image_xml(name: str, address: str, lexicon: Sequence[str], size: tuple[int, int],
               boxes: Sequence[tuple[str, tuple[int, int, int, int]]]) -> str:
    rects = "".join(
        f'<taggedRectangle height="{y2 - y1}" width="{x2 - x1}" x="{x1}" y="{y1}">'
        f"<tag>{escape(w)}</tag></taggedRectangle>"
        for w, (x1, y1, x2, y2) in boxes
    )
    return (
        f"  <image>\n    <imageName>{escape(name)}</imageName>\n"
        f"    <address>{escape(address)}</address>\n"
        f"    <lex>{escape(','.join(lexicon))}</lex>\n"
        f"    <Resolution x={quoteattr(str(size[0]))} y={quoteattr(str(size[1]))}/>\n"
        f"    <taggedRectangles>{rects}</taggedRectangles>\n  </image>\n"
    )


def make_synthsvt(root: str | os.PathLike[str], *, n_train: int = 100, n_test: int = 249,
                  image_size: tuple[int, int] = (480, 360), seed: int = 0,
                  lexicon_size: int = 50, max_words: int = 3, zipf_exponent: float = 1.1,
                  lookalikes_per_word: int = 6, vocabulary: Sequence[str] = STREET_WORDS,
                  overwrite: bool = False) -> Path:
    """Write a SynthSVT folder (``train.xml``, ``test.xml``, ``img/``) and return its path.

    Image ``k`` of split ``s`` is drawn from ``np.random.default_rng([seed, s, k])``, so the
    folder is identical byte for byte for the same arguments.  When ``root`` already holds a
    SynthSVT made with the same arguments it is reused (``overwrite=True`` rebuilds it).

    Returns:
        ``Path(root)``, ready for :func:`course_utils.svt.load_svt`.
    """
    root = Path(root)
    stamp = (f"synthsvt n_train={n_train} n_test={n_test} size={tuple(image_size)} seed={seed} "
             f"lex={lexicon_size} max_words={max_words} zipf={zipf_exponent} "
             f"look={lookalikes_per_word} vocab={len(vocabulary)} renderer={RENDERER_VERSION}")
    stamp_file = root / "SYNTHSVT"
    if not overwrite and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return root
    # Build in a private folder and move it into place at the end: two notebooks building the
    # same SynthSVT at once must never read each other's half-written files.
    final, root = root, root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        parts = ['<?xml version="1.0" encoding="utf-8"?>\n<tagset>\n']
        for k in range(n):
            scene, boxes, signs, rng = street_scene(seed, split, k, image_size=tuple(image_size),
                                                    max_words=max_words, zipf_exponent=zipf_exponent,
                                                    vocabulary=vocabulary)
            lexicon = make_lexicon([w for w, _ in boxes] or signs[0], rng, lexicon_size, vocabulary,
                                   lookalikes_per_word, zipf_exponent)
            # SVT names images <group>_<index>.jpg; a split prefix keeps train and test apart
            name = f"img/{split}_{k // 20:02d}_{k % 20:02d}.jpg"
            scene.save(root / name, quality=90)
            address = f"{int(rng.integers(1, 999))} {vocabulary[int(rng.integers(len(vocabulary)))].title()} St"
            parts.append(_image_xml(name, address, lexicon, scene.size, boxes))
        parts.append("</tagset>\n")
        (root / f"{split}.xml").write_text("".join(parts), encoding="utf-8")
    (root / "SYNTHSVT").write_text(stamp)
    if (final / "SYNTHSVT").is_file() and (final / "SYNTHSVT").read_text() == stamp and not overwrite:
        shutil.rmtree(root)  # another process finished the identical folder first
        return final
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(root, final)
    except OSError:  # another process moved its identical copy in between: keep that one
        shutil.rmtree(root, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# word stream for pretraining
# --------------------------------------------------------------------------------------------


WORD_DOMAINS = ("frontal", "street")


class WordStream:
    """Word crops rendered in memory: an endless, seekable stream of ``(image, text)`` pairs.

    Two domains (``domain``):

    - ``"street"``: a sign fragment made by the same renderer as the scenes of
      :func:`make_synthsvt` (font, colours, rotation, shear, perspective, texture, uneven light,
      occluders, blur, noise);
    - ``"frontal"`` (what the course's small CLIP is pretrained on): the same sign seen head-on
      in even light with nothing in front of it (font, colours, rotation, shear, blur, noise;
      no perspective, texture, light ramp or occluder).  The gap between the two is what
      fine-tuning on SynthSVT (notebook 07) has to learn.

    Either way the crop is cut around the word's box with a small random margin, as a detector
    or an SVT box would give it.

    Sample ``i`` depends only on ``(seed, i)``: the stream can be re-read from any step, which
    makes pretraining resumable and bit-for-bit reproducible.

    Args:
        words: the texts to draw from.
        weights: sampling probabilities of ``words`` (uniform when ``None``); shape ``(len(words),)``.
        seed: the stream's seed.
        text_height: nominal text height in pixels before the crop is resized.
        lookalike_rate: probability that a sample is a random one- or two-letter edit of the drawn
            word instead of the word itself.  Pairs of near-identical texts teach the model to
            read letters rather than word shapes.
        domain: ``"frontal"`` or ``"street"`` (see above).
    """

    def __init__(self, words: Sequence[str], weights: Sequence[float] | None = None, *, seed: int = 0,
                 text_height: int = 32, lookalike_rate: float = 0.0, fonts: Sequence[str] = FONT_NAMES,
                 noise: float = 6.0, domain: str = "street") -> None:
        if not words:
            raise ValueError("WordStream: words is empty (expected at least one text)")
        if domain not in WORD_DOMAINS:
            raise ValueError(f"WordStream: domain={domain!r}, expected one of {WORD_DOMAINS}")
        self.domain = domain
        self.words = list(words)
        w = np.full(len(words), 1.0) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.words),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"WordStream: weights must be {len(self.words)} non-negative numbers")
        self.p = w / w.sum()
        self.seed = seed
        self.text_height = text_height
        self.lookalike_rate = lookalike_rate
        self.fonts = tuple(fonts)
        self.noise = noise

    def text(self, i: int) -> str:
        """The text of sample ``i`` (cheap: no rendering)."""
        return self._text(np.random.default_rng([self.seed, i, 0]))

    def _text(self, rng: np.random.Generator) -> str:
        word = self.words[int(rng.choice(len(self.words), p=self.p))]
        if self.lookalike_rate and rng.random() < self.lookalike_rate:
            word = lookalikes(word, 1, rng, vocabulary=())[0] if len(word) > 1 else word
        return word

    def sample(self, i: int) -> tuple[Image.Image, str]:
        """Sample ``i``: an RGB word crop and its text."""
        rng = np.random.default_rng([self.seed, i, 0])
        text = self._text(rng)
        return self.render(text, rng), text

    def render(self, text: str, rng: np.random.Generator) -> Image.Image:
        """Render ``text`` as one word crop with randomness from ``rng`` (RGB, wider than tall)."""
        return word_crop(text, rng, text_height=self.text_height, fonts=self.fonts, noise=self.noise,
                         street=self.domain == "street")

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        i = 0
        while True:
            yield self.sample(i)
            i += 1


def make_synthsvt_for_profile(root: str | os.PathLike[str], svt_cfg: dict, **overrides: object) -> Path:
    """:func:`make_synthsvt` with the sizes of a profile's ``svt`` section (``get_config().svt``)."""
    kwargs = dict(n_train=svt_cfg["n_train"], n_test=svt_cfg["n_test"],
                  image_size=tuple(svt_cfg["image_size"]), seed=svt_cfg["seed"],
                  lexicon_size=svt_cfg["lexicon_size"], max_words=svt_cfg["max_words"])
    kwargs.update(overrides)
    return make_synthsvt(root, **kwargs)  # type: ignore[arg-type]
