"""Street signs rendered with PIL: fonts, words, sign boards, what the street does to them, scenes.

The renderer behind SynthSVT (:mod:`course_utils.synthsvt`, notebooks 06-08) and the word
stream the course's small CLIP is pretrained on.  A sign is the words of one board in one font,
colour pair, size, rotation and shear; on the street (``street=True``) it is also seen from the
side (perspective) and weathered: grain, uneven light, a pole or leaves in front of it.
``street=False`` gives the same sign head-on, in even light, with nothing in front of it.

Every function takes a ``numpy.random.Generator`` as its only source of randomness, so a scene
depends only on the generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["FONT_NAMES", "RENDERER_VERSION", "load_font", "render_scene", "word_crop"]

_TTF_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSerif-Italic.ttf",
)
# "pil-default" is PIL's built-in bitmap font, rendered small and scaled up (blocky, like
# low-resolution signage).
FONT_NAMES: tuple[str, ...] = _TTF_FONTS + ("pil-default",)

# Bumped whenever the scene renderer changes, so that cached SynthSVT folders are rebuilt.
# 2: signs foreshortened in perspective, with texture, uneven light and occluders (_weather).
RENDERER_VERSION = 2

# Background / sign / text palettes: (sign colour, text colour) pairs with enough contrast that
# a human reads them, and some low-contrast ones because real signs are not always legible.
_SIGN_STYLES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((250, 250, 245), (20, 20, 20)), ((20, 20, 20), (250, 250, 250)), ((180, 20, 30), (255, 255, 255)),
    ((20, 60, 150), (255, 255, 255)), ((10, 110, 60), (255, 255, 255)), ((250, 210, 40), (20, 20, 20)),
    ((240, 240, 240), (180, 20, 30)), ((60, 40, 30), (240, 220, 170)), ((230, 120, 20), (255, 255, 255)),
    ((200, 200, 210), (30, 30, 90)), ((120, 20, 90), (255, 230, 120)), ((245, 235, 210), (90, 60, 20)),
)


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


@lru_cache(maxsize=512)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font of ``FONT_NAMES`` at pixel ``size`` (``pil-default`` ignores ``size``)."""
    if name == "pil-default":
        return ImageFont.load_default_imagefont()
    return ImageFont.truetype(str(_font_dir() / name), size)


def _perspective_coefficients(src: Sequence[tuple[float, float]], dst: Sequence[tuple[float, float]]
                              ) -> tuple[float, ...]:
    """PIL's 8 ``Image.PERSPECTIVE`` coefficients that map output points ``dst`` to input ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(float(c) for c in np.linalg.solve(np.asarray(rows, float), np.asarray(rhs, float)))


def _foreshorten(mask: Image.Image, far: float, left: bool) -> Image.Image:
    """A sign seen from the side: one vertical edge shrinks to ``far`` (0-1] of its height."""
    w, h = mask.size
    d = (1 - far) * h / 2
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    dst = ([(0, d), (w, 0), (w, h), (0, h - d)] if left else [(0, 0), (w, d), (w, h - d), (0, h)])
    return mask.transform(mask.size, Image.PERSPECTIVE, _perspective_coefficients(src, dst), Image.BILINEAR)


def _render_word(word: str, font_name: str, size: int, color: tuple[int, int, int],
                 rng: np.random.Generator, rotate: float, shear: float, far: float = 1.0) -> Image.Image:
    """The word as an RGBA image cropped to its ink: colour ``color``, rotated and sheared;
    ``far < 1`` foreshortens it as seen from the side (perspective)."""
    font = load_font(font_name, size)
    # measure, then draw with a margin so that rotation never clips the ink
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    m = 4
    mask = Image.new("L", (w + 2 * m, h + 2 * m), 0)
    ImageDraw.Draw(mask).text((m - left, m - top), word, fill=255, font=font)
    if font_name == "pil-default":
        # the bitmap font is ~11 px tall: scale it up to the requested size (blocky on purpose)
        scale = size / max(1, h)
        mask = mask.resize((max(1, round(mask.width * scale)), max(1, round(mask.height * scale))),
                           Image.NEAREST)
    if far < 1.0:
        mask = _foreshorten(mask, far, left=bool(rng.random() < 0.5))
    if shear:
        # x' = x + shear * y, a slant like a sign seen a little from the side
        extra = int(abs(shear) * mask.height) + 1
        mask = mask.transform((mask.width + extra, mask.height), Image.AFFINE,
                              (1, shear, -extra if shear > 0 else 0, 0, 1, 0), Image.BILINEAR)
    if rotate:
        mask = mask.rotate(rotate, Image.BILINEAR, expand=True)
    bbox = mask.getbbox() or (0, 0, mask.width, mask.height)
    mask = mask.crop(bbox)
    layer = Image.new("RGBA", mask.size, color + (0,))
    layer.putalpha(mask)
    return layer


@dataclass
class _Style:
    """Random choices for one sign: font, size, colours, rotation, shear."""

    font: str
    size: int
    sign: tuple[int, int, int]
    ink: tuple[int, int, int]
    rotate: float
    shear: float
    far: float


def _sample_style(rng: np.random.Generator, text_height: int, fonts: Sequence[str], street: bool = True) -> _Style:
    sign, ink = _SIGN_STYLES[int(rng.integers(len(_SIGN_STYLES)))]
    jitter = rng.integers(-25, 26, size=3)
    sign = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(sign, jitter))
    return _Style(
        font=fonts[int(rng.integers(len(fonts)))],
        size=max(6, int(text_height * rng.uniform(0.8, 1.25))),
        sign=sign,  # type: ignore[arg-type]
        ink=ink,
        rotate=float(rng.uniform(-5, 5)),
        shear=float(rng.uniform(-0.2, 0.2)),
        # half the street signs are seen from the side; off the street, all are seen head-on
        far=(float(rng.uniform(0.7, 1.0)) if rng.random() < 0.5 else 1.0) if street else 1.0,
    )


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A street-ish backdrop: sky-to-facade gradient, windows, poles and wires (clutter)."""
    W, H = size
    top = rng.integers(90, 230, size=3)
    bottom = rng.integers(30, 160, size=3)
    t = np.linspace(0, 1, H)[:, None, None]
    arr = (top * (1 - t) + bottom * t).repeat(W, axis=1)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):  # windows / facade blocks
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        w, h = int(rng.integers(W // 20 + 1, W // 5 + 2)), int(rng.integers(H // 20 + 1, H // 4 + 2))
        d.rectangle((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    for _ in range(int(rng.integers(1, 4))):  # poles and wires
        x = int(rng.integers(0, W))
        d.line((x, 0, x + int(rng.integers(-W // 10, W // 10 + 1)), H),
               fill=tuple(int(c) for c in rng.integers(0, 120, size=3)), width=int(rng.integers(1, 4)))
    return img


def _make_sign(words: Sequence[str], style: _Style, rng: np.random.Generator, street: bool = True
               ) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A sign board with ``words`` stacked in lines; returns the board and each word's xyxy box.
    ``street`` weathers the board (:func:`_weather`)."""
    layers = [_render_word(w, style.font, style.size, style.ink, rng, style.rotate, style.shear, style.far)
              for w in words]
    pad = max(3, style.size // 3)
    gap = max(2, style.size // 4)
    W = max(lay.width for lay in layers) + 2 * pad
    H = sum(lay.height for lay in layers) + gap * (len(layers) - 1) + 2 * pad
    board = Image.new("RGB", (W, H), style.sign)
    d = ImageDraw.Draw(board)
    d.rectangle((0, 0, W - 1, H - 1), outline=tuple(max(0, c - 60) for c in style.sign), width=2)
    boxes = []
    y = pad
    for layer in layers:
        x = pad + int(rng.integers(0, W - 2 * pad - layer.width + 1))  # ragged alignment
        board.paste(layer, (x, y), layer)
        boxes.append((x, y, x + layer.width, y + layer.height))
        y += layer.height + gap
    return (_weather(board, style.size, rng) if street else board), boxes


def _weather(board: Image.Image, text_size: int, rng: np.random.Generator) -> Image.Image:
    """What the street does to a sign: grainy texture, uneven light, and sometimes a pole or a
    branch in front of it.  None of this (nor the perspective) is in the head-on signs the
    small CLIP is pretrained on (``WordStream(domain="frontal")``): it is the domain gap that
    fine-tuning on SynthSVT's training split has to bridge."""
    W, H = board.size
    arr = np.asarray(board, dtype=np.float32)
    # texture: coarse grain (paint, dirt), 4x4-pixel cells
    grain = rng.normal(0.0, rng.uniform(4, 18), size=(H // 4 + 1, W // 4 + 1, 1))
    arr = arr + np.kron(grain, np.ones((4, 4, 1)))[:H, :W]
    # light: a linear ramp of brightness across the sign in a random direction
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    t = (np.cos(angle) * xx / max(1, W) + np.sin(angle) * yy / max(1, H))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    lo, hi = rng.uniform(0.45, 0.85), rng.uniform(0.95, 1.2)
    arr = arr * (lo + (hi - lo) * t)[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(out)
    if rng.random() < 0.4:  # a pole in front of the sign: a dark bar, a fifth of the text wide
        x = int(rng.integers(0, W))
        w = max(1, int(text_size * rng.uniform(0.1, 0.25)))
        shade = tuple(int(c) for c in rng.integers(20, 90, size=3))
        d.rectangle((x, 0, x + w, H), fill=shade)
    if rng.random() < 0.3:  # leaves over a corner: a blob up to half the text height
        r = max(2, int(text_size * rng.uniform(0.2, 0.5)))
        cx, cy = int(rng.choice([0, W])), int(rng.choice([0, H]))
        leaf = tuple(int(c) for c in (rng.integers(20, 70), rng.integers(70, 140), rng.integers(20, 60)))
        d.ellipse((cx - 2 * r, cy - r, cx + 2 * r, cy + r), fill=leaf)
    return out


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _finish(img: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    """Camera effects: slight blur and Gaussian noise of standard deviation ``noise`` (0-255)."""
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, noise * rng.uniform(0.3, 1.0), size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def word_crop(text: str, rng: np.random.Generator, *, text_height: int = 32,
              fonts: Sequence[str] = FONT_NAMES, noise: float = 6.0, street: bool = True) -> Image.Image:
    """One sign with ``text`` on it, cut around the word with a loose box (RGB, wider than tall).

    ``street=False`` draws it head-on with no weathering.  The box's margin is 0-15 % of the
    text height on each side, as a detector or an SVT box would give it.
    """
    style = _sample_style(rng, text_height, fonts, street=street)
    board, boxes = _make_sign([text], style, rng, street=street)
    board = _finish(board, rng, noise)
    x1, y1, x2, y2 = boxes[0]
    m = [int(rng.uniform(0, 0.15) * (y2 - y1)) for _ in range(4)]
    box = (max(0, x1 - m[0]), max(0, y1 - m[1]), min(board.width, x2 + m[2]), min(board.height, y2 + m[3]))
    return board.crop(box)


def render_scene(words_per_sign: Sequence[Sequence[str]], rng: np.random.Generator,
                 image_size: tuple[int, int] = (480, 360), fonts: Sequence[str] = FONT_NAMES,
                 noise: float = 6.0) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    """Render a street scene with one sign per entry of ``words_per_sign``.

    Args:
        words_per_sign: e.g. ``[["JOES", "PIZZA"], ["OPEN"]]``: two signs, three words.
        rng: the only source of randomness (determinism).
        image_size: ``(width, height)`` of the scene in pixels.

    Returns:
        the RGB scene and a list of ``(word, (x1, y1, x2, y2))`` boxes in scene pixels.
        A sign that does not fit without overlapping another is scaled down until it does
        (and dropped, with its words, after a few tries).
    """
    W, H = image_size
    scene = _background(image_size, rng)
    placed: list[tuple[int, int, int, int]] = []
    out: list[tuple[str, tuple[int, int, int, int]]] = []
    for words in words_per_sign:
        # text height 7-14 % of the image height, so that word crops stay legible when small
        style = _sample_style(rng, int(H * rng.uniform(0.07, 0.14)), fonts)
        board, boxes = _make_sign(words, style, rng)
        for _ in range(20):
            if board.width >= W or board.height >= H:
                s = 0.9 * min(W / board.width, H / board.height)
                board = board.resize((max(1, int(board.width * s)), max(1, int(board.height * s))),
                                     Image.BILINEAR)
                boxes = [tuple(int(round(c * s)) for c in b) for b in boxes]  # type: ignore[misc]
                continue
            x, y = int(rng.integers(0, W - board.width + 1)), int(rng.integers(0, H - board.height + 1))
            rect = (x, y, x + board.width, y + board.height)
            if any(_overlaps(rect, p) for p in placed):
                continue
            scene.paste(board, (x, y))
            placed.append(rect)
            out += [(w, (x + b[0], y + b[1], x + b[2], y + b[3])) for w, b in zip(words, boxes)]
            break
    return _finish(scene, rng, noise), out

