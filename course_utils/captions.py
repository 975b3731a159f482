"""Captioned shapes scenes for image-text retrieval (notebooks 04-05), and a loader for real
precomputed region features in the Karpathy-split layout.

A scene is a black image with a few non-overlapping shapes; every object has a colour, a shape,
a size word (``small`` / ``large``) and a tight box.  Each image has five captions that mention
two or three of its objects and a spatial relation between them::

    "a large red circle left of a small blue square"
    "there is a small white triangle , a large green square and a small red circle"

and each caption keeps its noun phrases (``"a large red circle"``, ...) and which objects they
name: the fine-grained model of seed 003 Ch. 4 reads the noun phrases, the coarse model of
Ch. 3 the whole sentence, and the pointing game of seed 002 uses the boxes.

Everything is deterministic from a seed: scene ``k`` is drawn from its own generator
``default_rng([seed, k])``, so splits never share scenes and sizes can change without changing
the first scenes.  Images are rendered on the fly (well under a millisecond at 64 px).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .shapes import SHAPES, draw_shape

# Eight colours (the three of notebooks 01-03 plus five mixtures) so that a caption of two or
# three objects names a nearly unique image among a thousand: 3 shapes x 8 colours x 2 sizes.
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white", "orange", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
_PALETTE = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (60, 90, 255),
            "yellow": (230, 220, 40), "purple": (170, 60, 230), "white": (235, 235, 235),
            "orange": (245, 140, 20), "cyan": (40, 220, 230)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CAPTIONS_PER_IMAGE = 5

PAD, UNK = "<pad>", "<unk>"
# The whole vocabulary is known in advance (the captions come from templates); sorted so that
# word ids never depend on the data drawn.
VOCAB_WORDS: tuple[str, ...] = tuple(sorted(
    set(COLORS) | set(SIZES) | set(SHAPES)
    | {w for r in RELATIONS for w in r.split()} | {"a", "and", "there", "is", ","}))


@dataclass
class CapObject:
    """One object: colour, shape, size word and tight box ``(x1, y1, x2, y2)`` in pixels."""

    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def phrase(self) -> str:
        """Its noun phrase, e.g. ``"a large red circle"``."""
        return f"a {self.size} {self.color} {self.shape}"


@dataclass
class Caption:
    """One caption, its noun phrases and the index (into the scene's objects) each one names."""

    text: str
    phrases: list[str]
    objects: list[int]


@dataclass
class CaptionedScene:
    """One image's annotations (no pixels: :func:`render` draws them)."""

    image_id: int
    size: int
    objects: list[CapObject]
    captions: list[Caption] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Generation


def _place(rng: np.random.Generator, image_size: int, sides: Sequence[int], gap: int = 2,
           max_tries: int = 2000) -> list[tuple[int, int, int]]:
    """Rejection-sample one non-overlapping square ``(x, y, side)`` per requested side."""
    placed: list[tuple[int, int, int]] = []
    for s in sides:
        for _ in range(max_tries):
            # rng.random() rather than rng.integers(size=2): 10x less overhead per call.
            x, y = (int(v * (image_size - s)) for v in rng.random(2))
            if all(x + s + gap <= px or px + ps + gap <= x or y + s + gap <= py or py + ps + gap <= y
                   for px, py, ps in placed):
                placed.append((x, y, s))
                break
    return placed


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """A uniform choice (cheaper than ``rng.choice`` on a tuple of strings)."""
    return options[int(rng.random() * len(options))]


def relation(a: CapObject, b: CapObject) -> str:
    """Where ``a`` is relative to ``b`` along the axis where their centres differ most."""
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"  # image y grows downwards


def make_caption(objects: Sequence[CapObject], rng: np.random.Generator) -> Caption:
    """One caption naming three distinct objects (two with probability 0.2; fewer if the scene has fewer)."""
    m = min(len(objects), 3 if rng.random() < 0.8 else 2)
    idx = [int(i) for i in rng.permutation(len(objects))[:m]]
    ph = [objects[i].phrase for i in idx]
    if m == 1:
        text = f"there is {ph[0]}"
    elif m == 2:
        text = (f"{ph[0]} {relation(objects[idx[0]], objects[idx[1]])} {ph[1]}"
                if rng.random() < 0.7 else f"{ph[0]} and {ph[1]}")
    else:
        if rng.random() < 0.5:
            text = f"{ph[0]} {relation(objects[idx[0]], objects[idx[1]])} {ph[1]} and {ph[2]}"
        else:
            text = f"there is {ph[0]} , {ph[1]} and {ph[2]}"
    return Caption(text, ph, idx)


def make_scene(image_id: int, rng: np.random.Generator, image_size: int, min_objects: int,
               max_objects: int, small_size: Sequence[int], large_size: Sequence[int],
               n_captions: int = CAPTIONS_PER_IMAGE) -> CaptionedScene:
    """Draw one scene: objects (colour, shape, size, box) and ``n_captions`` captions."""
    n = int(rng.integers(min_objects, max_objects + 1))
    size_words = [_pick(SIZES, rng) for _ in range(n)]
    # Place large objects first: they are the hardest to fit.
    order = sorted(range(n), key=lambda i: size_words[i] != "large")
    sides = [int(rng.integers(*(large_size if size_words[i] == "large" else small_size), endpoint=True))
             for i in order]
    objects = []
    for i, (x, y, s) in zip(order, _place(rng, image_size, sides)):
        objects.append(CapObject(_pick(SHAPES, rng), _pick(COLORS, rng), size_words[i],
                                 (float(x), float(y), float(x + s), float(y + s))))
    scene = CaptionedScene(image_id, image_size, objects)
    if objects:
        scene.captions = [make_caption(objects, rng) for _ in range(n_captions)]
    return scene


def render(scene: CaptionedScene) -> np.ndarray:
    """Draw ``scene`` on black: ``-> (H, W, 3)`` uint8; brightness jitters per object."""
    img = Image.new("RGB", (scene.size, scene.size))
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng([scene.image_id, 7])
    for o in scene.objects:
        k = rng.uniform(0.8, 1.0)
        draw_shape(draw, o.shape, o.box, tuple(int(c * k) for c in _PALETTE[o.color]))
    return np.asarray(img)


class CaptionedSplit:
    """One split: ``scenes``, and the flat caption list in image order (``CAPTIONS_PER_IMAGE`` per
    generated image).

    * ``captions[c]`` is a :class:`Caption`; ``cap_to_img[c]`` the index of its image.
    * ``images()`` -> ``(N, 3, H, W)`` float32 in ``[0, 1]``; ``boxes(i)`` -> ``(n_i, 4)``.
    """

    def __init__(self, scenes: list[CaptionedScene]):
        self.scenes = scenes
        self.captions: list[Caption] = [c for s in scenes for c in s.captions]
        self.cap_to_img = torch.tensor([i for i, s in enumerate(scenes) for _ in s.captions],
                                       dtype=torch.long)
        # Image i's captions are captions[first[i]:first[i + 1]].
        self._first = [0, *accumulate(len(s.captions) for s in scenes)]

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.captions]

    @property
    def phrase_texts(self) -> list[str]:
        """Each caption's noun phrases joined: the fine-grained model's text."""
        return [" ".join(c.phrases) for c in self.captions]

    def caption_range(self, i: int) -> range:
        """Indices ``c`` into :attr:`captions` of image ``i``'s captions (they are contiguous)."""
        return range(self._first[i], self._first[i + 1])

    def image(self, i: int) -> np.ndarray:
        """``(H, W, 3)`` uint8."""
        return render(self.scenes[i])

    def images(self) -> torch.Tensor:
        """All images, ``(N, 3, H, W)`` float32 in ``[0, 1]``."""
        arr = np.stack([self.image(i) for i in range(len(self))])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)

    def boxes(self, i: int) -> torch.Tensor:
        """``(n_i, 4)`` float32 object boxes of image ``i``."""
        return torch.tensor([o.box for o in self.scenes[i].objects], dtype=torch.float32).reshape(-1, 4)

    def labels(self, i: int) -> dict[str, torch.Tensor]:
        """Attribute class ids of image ``i``'s objects: ``color``, ``shape``, ``size``, each ``(n_i,)``."""
        objs = self.scenes[i].objects
        return {"color": torch.tensor([COLORS.index(o.color) for o in objs]),
                "shape": torch.tensor([SHAPES.index(o.shape) for o in objs]),
                "size": torch.tensor([SIZES.index(o.size) for o in objs])}


def build_captioned(cfg: dict, seed: int = 0) -> dict[str, CaptionedSplit]:
    """Train/val/test splits sized by a profile's ``retrieval`` section.

    Args:
        cfg: ``get_config().retrieval`` (image_size, n_train/n_val/n_test, min/max_objects,
            small_size, large_size).
        seed: the data seed: same seed and sizes, same scenes and captions.
    """
    out: dict[str, CaptionedSplit] = {}
    first = 0
    for split in ("train", "val", "test"):
        n = int(cfg[f"n_{split}"])
        scenes = [make_scene(first + k, np.random.default_rng([seed, first + k]), int(cfg["image_size"]),
                             int(cfg["min_objects"]), int(cfg["max_objects"]),
                             tuple(cfg["small_size"]), tuple(cfg["large_size"]))
                  for k in range(n)]
        out[split] = CaptionedSplit(scenes)
        first += n
    return out


# ----------------------------------------------------------------------------------------------
# Text


def tokenize(text: str) -> list[str]:
    """Lower-case and split on white space, keeping ``,`` as its own token."""
    return text.lower().replace(",", " , ").split()


class CaptionVocabulary:
    """Word <-> id; id 0 is padding, id 1 unknown."""

    def __init__(self, words: Sequence[str] = VOCAB_WORDS):
        self.itos = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises ``ValueError`` on an empty caption or one of only unknown words."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty caption {text!r}: a caption needs at least one word")
        ids = [self.stoi.get(t, 1) for t in tokenize(text)]
        if all(i == 1 for i in ids):
            raise ValueError(f"caption {text!r} has no word in the vocabulary "
                             f"({len(self)} words, e.g. {self.itos[2:8]}); every token would be {UNK}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i != 0)

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad: ``-> (tokens (N, L) long, lengths (N,) long)``."""
        if len(texts) == 0:
            raise ValueError("no caption to encode: got an empty list")
        seqs = []
        for j, t in enumerate(texts):
            try:
                seqs.append(self.encode(t))
            except ValueError as e:
                raise ValueError(f"caption {j}: {e}") from None
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for j, s in enumerate(seqs):
            tokens[j, :len(s)] = torch.tensor(s)
        return tokens, lengths

    @classmethod
    def from_texts(cls, texts: Sequence[str], min_count: int = 1) -> CaptionVocabulary:
        """A vocabulary of the words seen ``min_count`` times (for real captions)."""
        counts: dict[str, int] = {}
        for t in texts:
            for w in tokenize(t):
                counts[w] = counts.get(w, 0) + 1
        return cls(sorted(w for w, c in counts.items() if c >= min_count))


# ----------------------------------------------------------------------------------------------
# Real data: the Karpathy-split JSON layout with precomputed region features


@dataclass
class PrecompSplit:
    """Precomputed region features and captions of one split.

    * ``features``: ``(N, k, d)`` float32 (k regions of d dims per image)
    * ``captions``: list of ``N * per_image`` strings, image-major; ``cap_to_img``: ``(N*per_image,)``
    """

    features: torch.Tensor
    captions: list[str]
    cap_to_img: torch.Tensor
    filenames: list[str]


def _check_feature_array(arr: np.ndarray, where: str, k: int | None, d: int | None) -> np.ndarray:
    if arr.ndim != 2:
        raise ValueError(f"{where}: expected region features of shape (k, d), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: image has zero regions (shape {arr.shape}); need k >= 1")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{where}: feature dimension {arr.shape[1]} differs from {d} in earlier images")
    if k is not None and arr.shape[0] != k:
        raise ValueError(f"{where}: {arr.shape[0]} regions but earlier images have {k}; "
                         f"pad or crop every image to the same k")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: contains NaN or inf")
    return arr.astype(np.float32, copy=False)


def read_karpathy_json(json_path: str | Path) -> dict:
    """Parse a Karpathy-split ``dataset_*.json``; ``FileNotFoundError`` / ``ValueError`` name the file."""
    json_path = Path(json_path)
    if not json_path.exists():
        raise FileNotFoundError(f"{json_path}: no such Karpathy-split JSON")
    try:
        data = json.loads(json_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected a top-level object with an 'images' list")
    return data


def load_karpathy(json_path: str | Path, features: str | Path, split: str = "test",
                  per_image: int = CAPTIONS_PER_IMAGE, *, text: str = "raw", mmap: bool = False,
                  dataset: dict | None = None) -> PrecompSplit:
    """Load one split of a Karpathy-split ``dataset_*.json`` with its region features.

    Args:
        json_path: ``{"images": [{"split", "filename", "sentences": [{"raw"|"tokens"}]}, ...]}``
            (``restval`` counts as ``train``).
        features: either one ``.npy`` of shape ``(N, k, d)`` in the JSON's order of that split,
            or a folder with one ``<filename stem>.npy`` of shape ``(k, d)`` per image.
        split: ``train`` / ``val`` / ``test``.
        per_image: captions kept per image (the first ``per_image``; fewer is an error).
        text: ``"raw"`` (the sentence as written, else its tokens joined) or ``"tokens"`` (the
            JSON's lower-cased, punctuation-free tokens joined by spaces, else the raw sentence).
        mmap: memory-map a stacked ``.npy`` (copy-on-write) instead of reading it into memory:
            Flickr30K's training features are 8.5 GB of float32.  The per-image folder form is
            always read.
        dataset: the JSON already parsed by :func:`read_karpathy_json` (``json_path`` then only
            names it in errors), so that loading three splits parses a large JSON once.

    Raises:
        FileNotFoundError / ValueError naming the file, the image and what was expected.
    """
    if text not in ("raw", "tokens"):
        raise ValueError(f"text={text!r}: expected 'raw' or 'tokens'")
    json_path, features = Path(json_path), Path(features)
    data = read_karpathy_json(json_path) if dataset is None else dataset
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected a top-level object with an 'images' list")
    items = []
    for n, im in enumerate(data["images"]):
        for key in ("split", "filename", "sentences"):
            if key not in im:
                raise ValueError(f"{json_path}: images[{n}] has no field {key!r}")
        s = "train" if im["split"] == "restval" else im["split"]
        if s == split:
            items.append((n, im))
    if not items:
        raise ValueError(f"{json_path}: no image has split {split!r}")
    caps: list[str] = []
    for n, im in items:
        sents = im["sentences"]
        if len(sents) < per_image:
            raise ValueError(f"{json_path}: images[{n}] ({im['filename']}) has {len(sents)} sentences, "
                             f"expected at least {per_image}")
        for s in sents[:per_image]:
            raw, tokens = s.get("raw") or "", " ".join(s.get("tokens") or [])
            sentence = (raw or tokens) if text == "raw" else (tokens or raw)
            if not sentence.strip():
                raise ValueError(f"{json_path}: images[{n}] ({im['filename']}) has an empty sentence")
            caps.append(sentence)
    if features.is_dir():
        arrs, k, d = [], None, None
        for n, im in items:
            f = features / (Path(im["filename"]).stem + ".npy")
            if not f.exists():
                raise FileNotFoundError(f"{f}: missing region features for images[{n}] ({im['filename']})")
            a = _check_feature_array(np.load(f), str(f), k, d)
            k, d = a.shape
            arrs.append(a)
        feats = np.stack(arrs)
    else:
        if not features.exists():
            raise FileNotFoundError(f"{features}: no such features file")
        feats = np.load(features, mmap_mode="c" if mmap else None)
        if feats.ndim != 3:
            raise ValueError(f"{features}: expected shape (N, k, d), got {feats.shape}")
        if feats.shape[0] != len(items):
            raise ValueError(f"{features}: {feats.shape[0]} images but the JSON's {split!r} split has {len(items)}")
        for i in range(feats.shape[0]):
            _check_feature_array(feats[i], f"{features}[{i}]", None, None)
        feats = feats.astype(np.float32, copy=False)
    return PrecompSplit(torch.from_numpy(np.ascontiguousarray(feats)), caps,
                        torch.arange(len(items)).repeat_interleave(per_image),
                        [im["filename"] for _, im in items])
