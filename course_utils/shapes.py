"""The synthetic shapes world of seed 000 §4.1 (notebooks 01-03).

Black RGB images with 10-20 non-overlapping circles, squares and triangles in red, green and blue;
every object has a tight bounding box; every image has a natural-language query describing a subset
of its objects ("the red circles", "green triangles and blue squares", ...) and a per-object
alignment label saying which objects the query describes.

Everything is deterministic from a seed.  Annotations are generated once per (profile sizes, seed)
and cached as JSON in their run folder (:func:`course_utils.cache.run_dir`, stage ``"shapes"``);
images are rendered from the annotations whenever they are read: 4 ms for a 512 px image on one
CPU core, less than decoding it from a PNG takes (9 ms here), and no disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .cache import run_dir

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue")
_RGB = {"red": (0, 1, 0), "green": (1, 0, 0), "blue": (2, 0, 0)}  # channel index per colour
PREFIXES = ("", "the ", "all ", "all the ", "find the ", "show me the ", "where are the ")
# Every word a query can contain; the text encoders of notebook 03 build their vocabulary from it.
QUERY_WORDS = sorted({w for p in PREFIXES for w in p.split()}
                     | {"and", "shapes", "objects"} | set(COLORS) | {s + "s" for s in SHAPES})


@dataclass
class ShapeObject:
    """One object: its kind, colour and tight box ``(x1, y1, x2, y2)`` in pixels."""

    shape: str
    color: str
    box: tuple[float, float, float, float]


@dataclass
class Scene:
    """One annotated image (no pixels: :func:`render_scene` draws them)."""

    image_id: int
    size: int
    objects: list[ShapeObject]
    query: str
    # The (colour, shape) terms of the query; None means "any".
    terms: list[tuple[str | None, str | None]]
    aligned: list[bool]


def _place_objects(rng: np.random.Generator, size: int, n: int, min_size: int, max_size: int,
                   gap: int = 2, max_tries: int = 4000) -> list[tuple[int, int, int]]:
    """Rejection-sample ``n`` non-overlapping squares ``(x, y, side)`` inside a ``size`` image."""
    placed: list[tuple[int, int, int]] = []
    tries = 0
    while len(placed) < n and tries < max_tries:
        tries += 1
        s = int(rng.integers(min_size, max_size + 1))
        x, y = (int(v) for v in rng.integers(0, size - s, size=2))
        if all(x + s + gap <= px or px + ps + gap <= x or y + s + gap <= py or py + ps + gap <= y
               for px, py, ps in placed):
            placed.append((x, y, s))
    return placed


def term_text(color: str | None, shape: str | None) -> str:
    """``("red", "circle") -> "red circles"``, ``(None, "circle") -> "circles"``, ``("red", None) -> "red shapes"``."""
    if shape is None:
        return f"{color} shapes"
    return f"{color} {shape}s" if color else f"{shape}s"


def matches(obj: ShapeObject, term: tuple[str | None, str | None]) -> bool:
    """Whether ``obj`` is described by the query term ``(colour, shape)`` (None = any)."""
    color, shape = term
    return (color is None or obj.color == color) and (shape is None or obj.shape == shape)


def _overlaps(a: tuple[str | None, str | None], b: tuple[str | None, str | None]) -> bool:
    """Whether one term describes a subset of the other (so both name the same objects)."""
    def covers(x: tuple, y: tuple) -> bool:
        return all(xv is None or xv == yv for xv, yv in zip(x, y))

    return covers(a, b) or covers(b, a)


def make_query(objects: Sequence[ShapeObject], rng: np.random.Generator,
               p_present: float = 0.9) -> tuple[str, list[tuple[str | None, str | None]]]:
    """Draw a query of one or two terms; each term describes an object present with ``p_present``."""
    n_terms = 1 if rng.random() < 0.6 else 2
    terms: list[tuple[str | None, str | None]] = []
    while len(terms) < n_terms:
        if objects and rng.random() < p_present:
            obj = objects[int(rng.integers(len(objects)))]
            color, shape = obj.color, obj.shape
        else:
            color, shape = str(rng.choice(COLORS)), str(rng.choice(SHAPES))
        kind = rng.random()
        term = (color, shape) if kind < 0.6 else ((color, None) if kind < 0.8 else (None, shape))
        # Skip a term that repeats or overlaps one already chosen ("blue shapes" and "blue
        # triangles"): the query would name the same objects twice.
        if not any(_overlaps(term, t) for t in terms):
            terms.append(term)
    prefix = str(rng.choice(PREFIXES))
    return prefix + " and ".join(term_text(*t) for t in terms), terms


def alignment_labels(objects: Sequence[ShapeObject],
                     terms: Sequence[tuple[str | None, str | None]]) -> list[bool]:
    """Which objects a query with these terms describes: one bool per object."""
    return [any(matches(o, t) for t in terms) for o in objects]


def make_scene(image_id: int, rng: np.random.Generator, size: int, min_shapes: int,
               max_shapes: int, min_size: int, max_size: int) -> Scene:
    """Generate one scene's annotations (objects, query, alignment labels)."""
    n = int(rng.integers(min_shapes, max_shapes + 1))
    objects = [
        ShapeObject(str(rng.choice(SHAPES)), str(rng.choice(COLORS)),
                    (float(x), float(y), float(x + s), float(y + s)))
        for x, y, s in _place_objects(rng, size, n, min_size, max_size)
    ]
    query, terms = make_query(objects, rng)
    return Scene(image_id, size, objects, query, terms, alignment_labels(objects, terms))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float],
               fill: tuple[int, int, int]) -> None:
    """Draw one circle, square or (upward) triangle filling ``box = (x1, y1, x2, y2)``."""
    x1, y1, x2, y2 = box
    # PIL draws x2/y2 inclusive; subtract 1 so the drawn pixels stay inside the box.
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    else:
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)


def render_scene(scene: Scene, rng_seed: int | None = None) -> np.ndarray:
    """Draw ``scene`` on black: ``-> (H, W, 3)`` uint8.  Each object gets its own brightness."""
    img = Image.new("RGB", (scene.size, scene.size))
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(scene.image_id if rng_seed is None else rng_seed)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        level = int(rng.integers(160, 256))
        rgb = [0, 0, 0]
        rgb[_RGB[obj.color][0]] = level
        draw_shape(draw, obj.shape, obj.box, tuple(rgb))
    return np.asarray(img)


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    objs = [ShapeObject(o["shape"], o["color"], tuple(o["box"])) for o in d["objects"]]
    terms = [tuple(t) for t in d["terms"]]
    return Scene(d["image_id"], d["size"], objs, d["query"], terms, list(d["aligned"]))


def generate_scenes(n: int, seed: int, size: int, min_shapes: int, max_shapes: int,
                    min_size: int, max_size: int, first_id: int = 0) -> list[Scene]:
    """``n`` scenes, scene ``k`` drawn from its own generator so splits never share objects."""
    return [make_scene(first_id + k, np.random.default_rng([seed, first_id + k]), size,
                       min_shapes, max_shapes, min_size, max_size) for k in range(n)]


def extra_queries(scene: Scene, k: int) -> tuple[list[str], list[list[bool]]]:
    """``k`` more queries of one scene and their alignment labels, drawn like its own query.

    They come from generators seeded ``(image_id, 1, j)``, apart from the scene's own, so the
    scene, its query and every cached file stay what they were.  Training on several queries of
    one image costs little: the backbone runs once and only the small alignment branch sees
    each query (see ``SemanticDetector.forward``).
    """
    queries, labels = [], []
    for j in range(k):
        query, terms = make_query(scene.objects, np.random.default_rng([scene.image_id, 1, j]))
        queries.append(query)
        labels.append(alignment_labels(scene.objects, terms))
    return queries, labels


class ShapesDataset(Dataset):
    """A split of the shapes world.  ``ds[i]`` is a dict:

    * ``image``: ``(3, H, W)`` float32 in ``[0, 1]``
    * ``boxes``: ``(N, 4)`` float32 ``(x1, y1, x2, y2)``
    * ``aligned``: ``(N,)`` bool, which objects the query describes
    * ``query``: str; ``shapes`` / ``colors``: lists of N strings; ``image_id``: int
    * with ``n_extra_queries = k > 0`` also ``extra_queries``: k more str and
      ``extra_aligned``: ``(k, N)`` bool (:func:`extra_queries`)
    """

    def __init__(self, scenes: list[Scene], n_extra_queries: int = 0):
        self.scenes = scenes
        self.n_extra_queries = int(n_extra_queries)

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, i: int) -> np.ndarray:
        """The ``(H, W, 3)`` uint8 image of scene ``i``, rendered from its annotations."""
        return render_scene(self.scenes[i])

    def __getitem__(self, i: int) -> dict:
        scene = self.scenes[i]
        img = torch.from_numpy(self.image(i).copy()).permute(2, 0, 1).float() / 255.0
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32).reshape(-1, 4)
        return {
            "image": img,
            "boxes": boxes,
            "aligned": torch.tensor(scene.aligned, dtype=torch.bool),
            "query": scene.query,
            "shapes": [o.shape for o in scene.objects],
            "colors": [o.color for o in scene.objects],
            "image_id": scene.image_id,
        } | self._extras(scene)

    def _extras(self, scene: Scene) -> dict:
        if self.n_extra_queries <= 0:
            return {}
        queries, labels = extra_queries(scene, self.n_extra_queries)
        aligned = torch.tensor(labels, dtype=torch.bool).reshape(self.n_extra_queries, len(scene.objects))
        return {"extra_queries": queries, "extra_aligned": aligned}


def collate_scenes(batch: list[dict]) -> dict:
    """Stack images; keep per-image boxes, labels and strings as lists (they differ in length)."""
    out = {k: [b[k] for b in batch] for k in batch[0]}
    out["image"] = torch.stack(out["image"])
    return out


def build_shapes(cfg_shapes: dict, seed: int = 0, cache: bool = True) -> dict[str, ShapesDataset]:
    """Build (or load from cache) the train/val/test splits sized by a profile's ``shapes`` section.

    Args:
        cfg_shapes: ``get_config().shapes`` (image_size, n_train, n_val, n_test, min/max shapes, sizes;
            ``extra_train_queries`` more queries per training image, 0 when absent).
        seed: the data seed; the same seed and sizes give the same scenes, byte for byte.
        cache: write the annotations as JSON under ``run_dir("shapes", [sizes, seed])``.
    """
    keys = ("image_size", "n_train", "n_val", "n_test", "min_shapes", "max_shapes", "min_size", "max_size")
    params = {k: int(cfg_shapes[k]) for k in keys}
    splits = {"train": params["n_train"], "val": params["n_val"], "test": params["n_test"]}
    root = run_dir("shapes", [params, seed]) if cache else None
    out: dict[str, ShapesDataset] = {}
    first = 0
    for split, n in splits.items():
        scenes = None
        if root is not None and (root / f"{split}.json").exists():
            try:
                scenes = [scene_from_dict(d) for d in json.loads((root / f"{split}.json").read_text())]
            except (json.JSONDecodeError, KeyError, TypeError):
                scenes = None  # a truncated cache file: regenerate it below
        if scenes is None or len(scenes) != n:
            scenes = generate_scenes(n, seed, params["image_size"], params["min_shapes"],
                                     params["max_shapes"], params["min_size"], params["max_size"],
                                     first_id=first)
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
                # A per-process name: two notebooks building the same cache at once must not
                # write into one temporary file.
                tmp = root / f".{split}.json.tmp-{os.getpid()}"
                tmp.write_text(json.dumps([scene_to_dict(s) for s in scenes]))
                os.replace(tmp, root / f"{split}.json")
        # Extra queries train the text side of notebook 03; validation and test keep one query.
        extra = int(cfg_shapes.get("extra_train_queries", 0)) if split == "train" else 0
        out[split] = ShapesDataset(scenes, n_extra_queries=extra)
        first += n
    return out
