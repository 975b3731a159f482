"""Where the retrieval notebooks (04, 05) and the command line get their inputs from.

:func:`load_retrieval_inputs` is the one call.  It returns a
:class:`~course_utils.recipes.retrieval.RetrievalData` and a :class:`RetrievalSource`, built

* from **real data** -- Flickr30K's or MSCOCO's Karpathy-split JSON with SCAN's precomputed
  bottom-up region features -- when the profile's ``retrieval.real_data`` names a dataset whose
  folder is in the course cache (``full`` looks for ``("f30k", "coco")`` in that order), so that
  R@K can be set beside SCAN's published numbers (:data:`PAPER_SCAN`);
* else from the **synthetic captioned scenes**, with exactly the calls the notebooks made before
  (:func:`~course_utils.captions.build_captioned`,
  :func:`~course_utils.recipes.retrieval.build_features`,
  :meth:`~course_utils.recipes.retrieval.RetrievalData.build`): same seeds, same numbers.  When the
  profile asked for real data, one line says where it looked and that the scenes are used.

Cache layout, one folder per dataset (``<name>`` is ``f30k`` or ``coco``)::

    <cache_root()>/retrieval_data/<name>/
        dataset_flickr30k.json   (coco: dataset_coco.json) Karpathy's split file
        train_ims.npy            (N_train, 36, 2048) float32: SCAN's ``*_precomp`` features, one row
                                 per image whose JSON split is "train" or "restval", in JSON order
        dev_ims.npy              (N_val, 36, 2048): Karpathy's "val" split (SCAN calls it "dev";
                                 val_ims.npy is accepted too)
        test_ims.npy             (N_test, 36, 2048): Flickr30K 1000 images, MSCOCO 5000

Instead of a ``<stem>_ims.npy`` a split may be a folder ``train/`` (``dev/`` or ``val/``,
``test/``) with one ``<image file stem>.npy`` of shape ``(36, 2048)`` per image, the form
:func:`~course_utils.captions.load_karpathy` reads.  A folder ``<name>/`` that exists is taken as
meant to be used: anything wrong in it (a missing file, a row count that differs from the JSON's
split, ``k`` other than the profile's ``k_fine``, ``d`` that differs between splits) is an error
naming the file and what was expected, never a silent fallback.  Stacked ``.npy`` files are
memory-mapped (Flickr30K's training features are 8.5 GB).

What real data changes, and what it cannot:

* **Texts.** The JSON's lower-cased tokens of the first five sentences of each image.  Real
  captions come without noun phrases, so the ``"fine"`` texts are the whole caption too: the
  fine-grained level then differs from the coarse one in its image side only (36 regions against
  one vector), which is SCAN's own setting (regions with whole sentences).  The vocabulary is
  every word of the training captions (:meth:`~course_utils.captions.CaptionVocabulary.from_texts`);
  words seen only in val/test read as ``<unk>``.
* **Coarse image feature.** The mean of the 36 region features, ``(N, 1, 2048)``.
* **Boxes and the object prior.** SCAN's ``*_precomp`` files hold no boxes.  Every region gets the
  whole frame ``(0, 0, image_size, image_size)`` as its box, so the query-agnostic model's object
  prior (area fraction > ``qa_alpha``) keeps all 36: the bottom-up detector that chose them already
  dropped small, unconfident proposals.
* **What stays synthetic.** Anything that needs pixels or object annotations: the scene and region
  figures, the object-prior pictures, the retrieval picture galleries (printed as text for real
  data, :func:`retrieval_examples`), and the matchmaps and pointing game of notebook 04 (they
  train a CNN on images and score object boxes).
* **Sizes.** ``n_train``/``n_val``/``n_test`` do not apply: the Karpathy splits are used whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_root
from ..captions import (
    CAPTIONS_PER_IMAGE,
    CaptionedSplit,
    CaptionVocabulary,
    build_captioned,
    load_karpathy,
    read_karpathy_json,
)
from .retrieval import RetrievalData, build_features, feature_knobs

__all__ = ["DATASETS", "PAPER_SCAN", "SPLIT_FILES", "RetrievalSource", "absent_message", "find_real_data",
           "load_karpathy_inputs", "load_retrieval_inputs", "retrieval_data_root", "retrieval_examples",
           "split_sources"]

#: ``real_data`` name -> (dataset label, Karpathy JSON file name).
DATASETS: dict[str, tuple[str, str]] = {"f30k": ("Flickr30K", "dataset_flickr30k.json"),
                                        "coco": ("MSCOCO", "dataset_coco.json")}
#: Karpathy split -> the stems looked for, in order: ``<stem>_ims.npy``, then a folder ``<stem>/``.
SPLIT_FILES: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("dev", "val"), "test": ("test",)}
#: SCAN's published R@K on each dataset's Karpathy test split, (i2t R@1/5/10, t2i R@1/5/10), as seed
#: 001's poster quotes them: the t-i AVG + i-t LSE ensemble of Lee et al. (2018).
PAPER_SCAN: dict[str, tuple[str, tuple[float, ...]]] = {
    "f30k": ("SCAN (t-i AVG + i-t LSE ensemble), Flickr30K 1K test, from seed 001",
             (67.4, 90.3, 95.8, 48.6, 77.7, 85.2)),
    "coco": ("SCAN (t-i AVG + i-t LSE ensemble), MSCOCO 5K test, from seed 001",
             (50.4, 82.2, 90.0, 38.6, 69.3, 80.4)),
}
SYNTHETIC_LABEL = "captioned shapes"


@dataclass
class RetrievalSource:
    """Where a :class:`~course_utils.recipes.retrieval.RetrievalData` came from.

    * ``name``: ``"synthetic"``, ``"f30k"`` or ``"coco"``; ``label``: for titles ("captioned
      shapes", "Flickr30K"); ``root``: the dataset folder (``None`` for the scenes).
    * ``knobs``: what the features depend on -- pass it as ``features=`` to
      :func:`~course_utils.recipes.retrieval.scan_grid_knobs` and
      :func:`~course_utils.recipes.retrieval.query_agnostic_knobs` so real and synthetic runs never
      share a checkpoint folder (for the scenes it is ``feature_knobs(cfg, seed)``: the folders stay).
    * ``message``: the one line printed about the data.
    * ``filenames`` / ``captions``: per split, the image file names and caption texts (real data
      only; the scenes have their own objects); ``paper``: ``(label, six R@K)`` of SCAN on this
      dataset's test split, or ``None``.
    """

    name: str
    label: str
    root: Path | None
    knobs: dict
    message: str
    filenames: dict[str, list[str]] = field(default_factory=dict)
    captions: dict[str, list[str]] = field(default_factory=dict)
    paper: tuple[str, tuple[float, ...]] | None = None

    @property
    def synthetic(self) -> bool:
        """True for the generated scenes (images and object boxes exist), False for real features."""
        return self.name == "synthetic"


def retrieval_data_root() -> Path:
    """``<cache_root()>/retrieval_data``: one subfolder per real dataset (not created here)."""
    return cache_root() / "retrieval_data"


def _names(cfg: Mapping) -> tuple[str, ...]:
    names = cfg.get("real_data", ())
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"retrieval.real_data={names!r}: unknown dataset {unknown[0]!r}; "
                         f"expected names among {sorted(DATASETS)}")
    return names


def find_real_data(cfg: Mapping) -> tuple[str, Path] | None:
    """The first dataset of ``cfg["real_data"]`` whose folder exists: ``(name, folder)``, else ``None``."""
    for name in _names(cfg):
        root = retrieval_data_root() / name
        if root.is_dir():
            return name, root
    return None


def absent_message(cfg: Mapping) -> str:
    """The one line that says no real data was found, where it looked and what is used instead."""
    names, k = _names(cfg), int(cfg["k_fine"])
    looked = "; ".join(f"{retrieval_data_root() / n}/ with {DATASETS[n][1]}" for n in names)
    labels = " or ".join(DATASETS[n][0] for n in names)
    return (f"retrieval data: no {labels} found ({looked}, each with SCAN's precomputed "
            f"{{train,dev,test}}_ims.npy of shape (N, {k}, d); layout in course_utils/recipes/retrieval_data.py); using the synthetic captioned scenes instead")


def _split_counts(dataset: dict, json_path: Path) -> dict[str, int]:
    counts = {s: 0 for s in SPLIT_FILES}
    for n, im in enumerate(dataset["images"]):
        if not isinstance(im, dict) or "split" not in im:
            raise ValueError(f"{json_path}: images[{n}] has no field 'split'")
        s = "train" if im["split"] == "restval" else im["split"]
        if s in counts:
            counts[s] += 1
    return counts


def split_sources(root: Path, name: str, k: int) -> tuple[Path, dict, dict[str, Path]]:
    """Check the layout of dataset folder ``root`` without reading the features.

    Returns ``(json_path, parsed JSON, {split: its .npy or folder})``.  Stacked ``.npy`` files are
    checked from their header: shape ``(N, k, d)`` with ``N`` the JSON's count for the split, ``k``
    as given and one ``d`` for every split (per-image folders are checked as they are read).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and what was expected.
    """
    label, json_name = DATASETS[name]
    json_path = root / json_name
    if not json_path.exists():
        raise FileNotFoundError(f"{json_path}: missing; expected {label}'s Karpathy-split JSON in {root} "
                                f"(the folder exists, so the course reads {label} from it)")
    dataset = read_karpathy_json(json_path)
    counts = _split_counts(dataset, json_path)
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{json_path}: no image has split {empty[0]!r}; expected Karpathy's train "
                         f"(or restval), val and test images (found {counts})")
    out: dict[str, Path] = {}
    d_first: tuple[Path, int] | None = None
    for split, stems in SPLIT_FILES.items():
        n = counts[split]
        found = next((p for s in stems for p in (root / f"{s}_ims.npy", root / s) if p.exists()), None)
        if found is None:
            alt = ", ".join(f"{s}_ims.npy or {s}/" for s in stems[1:])
            raise FileNotFoundError(
                f"{root / f'{stems[0]}_ims.npy'}: missing; expected the precomputed region features of "
                f"Karpathy's {split!r} split: shape ({n}, {k}, d) float32 in {json_name}'s order, or a folder "
                f"{stems[0]}/ with one <image stem>.npy of shape ({k}, d) per image" + (f" ({alt} also accepted)" if alt else ""))
        out[split] = found
        if found.is_dir():
            continue
        try:
            shape = np.load(found, mmap_mode="r").shape
        except (ValueError, OSError) as e:
            raise ValueError(f"{found}: not a readable .npy array ({e})") from None
        if len(shape) != 3:
            raise ValueError(f"{found}: expected shape (N, k, d) = ({n}, {k}, d), got {shape}")
        if shape[0] != n:
            raise ValueError(f"{found}: {shape[0]} images but {json_name}'s {split!r} split has {n}; "
                             f"expected shape ({n}, {k}, d), one row per image in the JSON's order")
        if shape[1] != k:
            raise ValueError(f"{found}: {shape[1]} regions per image, expected k = {k} "
                             f"(the profile's retrieval.k_fine; SCAN's precomputed features have 36)")
        if d_first is None:
            d_first = (found, shape[2])
        elif shape[2] != d_first[1]:
            raise ValueError(f"{found}: feature dimension {shape[2]}, but {d_first[0].name} has {d_first[1]}; "
                             f"every split needs the same d")
    return json_path, dataset, out


def _probe(x: torch.Tensor) -> list[float]:
    """A cheap content fingerprint of one split's features: the sums of its first, middle, last rows."""
    n = len(x)
    return [round(float(x[i].double().sum()), 6) for i in sorted({0, n // 2, n - 1})]


def load_karpathy_inputs(root: Path, name: str, cfg: Mapping) -> tuple[RetrievalData, RetrievalSource]:
    """Real data from dataset folder ``root`` (layout in the module docstring) as retrieval inputs.

    ``feats[split]``: ``"fine"`` ``(N, k, d)`` (memory-mapped when stacked), ``"coarse"`` ``(N, 1, d)``
    the mean region, ``"boxes"`` ``(N, k, 4)`` the whole frame; ``texts[split]``: the same tokenised
    captions at both levels; vocabulary from the training captions.
    """
    k = int(cfg["k_fine"])
    json_path, dataset, sources = split_sources(root, name, k)
    size = float(cfg["image_size"])
    splits = {}
    for split, path in sources.items():
        sp = load_karpathy(json_path, path, split, CAPTIONS_PER_IMAGE, text="tokens", mmap=True, dataset=dataset)
        if sp.features.shape[1] != k:
            raise ValueError(f"{path}: images have {sp.features.shape[1]} regions, expected k = {k} "
                             f"(the profile's retrieval.k_fine; SCAN's precomputed features have 36)")
        splits[split] = sp
    d = {s: sp.features.shape[2] for s, sp in splits.items()}
    if len(set(d.values())) > 1:
        raise ValueError(f"{root}: feature dimension differs between splits ({d}, from "
                         f"{', '.join(p.name for p in sources.values())}); every split needs the same d")
    vocab = CaptionVocabulary.from_texts(splits["train"].captions)
    feats, texts = {}, {}
    for split, sp in splits.items():
        f = sp.features
        boxes = torch.zeros(len(f), k, 4)
        boxes[..., 2:] = size
        feats[split] = {"fine": f, "coarse": f.mean(1, keepdim=True), "boxes": boxes}
        try:
            tok = vocab.batch(sp.captions)
        except ValueError as e:
            raise ValueError(f"{json_path}: {split!r} split, {e}") from None
        texts[split] = {"coarse": tok, "fine": tok}  # no noun phrases in real captions: the whole caption
    data = RetrievalData(feats, texts, {s: sp.cap_to_img for s, sp in splits.items()}, vocab)
    label = DATASETS[name][0]
    knobs = {"dataset": name, "json": {"bytes": json_path.stat().st_size, "images": _split_counts(dataset, json_path)},
             "features": {s: {"shape": list(sp.features.shape), "probe": _probe(sp.features)} for s, sp in splits.items()},
             "text": "tokens", "per_image": CAPTIONS_PER_IMAGE}
    sizes = " / ".join(f"{s} {len(sp.features)}" for s, sp in splits.items())
    message = (f"retrieval data: {label} from {root} ({sizes} images, {k} regions x {d['train']} dims, "
               f"{len(vocab)} words); figures and matchmaps use the synthetic scenes")
    source = RetrievalSource(name, label, root, knobs, message,
                             filenames={s: sp.filenames for s, sp in splits.items()},
                             captions={s: sp.captions for s, sp in splits.items()}, paper=PAPER_SCAN.get(name))
    return data, source


def load_retrieval_inputs(cfg: Mapping, *, seed: int = 0, device: str | torch.device | None = None,
                          progress: bool = True,
                          synthetic: tuple[dict[str, CaptionedSplit], dict[str, dict[str, torch.Tensor]]] | None = None,
                          ) -> tuple[RetrievalData, RetrievalSource]:
    """The retrieval inputs of notebooks 04-05 and the command line: real data when present, else the scenes.

    Args:
        cfg: a profile's ``retrieval`` section (``get_config().retrieval``); ``real_data`` names
            the datasets looked for under :func:`retrieval_data_root` (``()``: the scenes only).
        seed: the data seed of the scenes (and of their region features).
        device: where the scenes' feature CNN trains when its features are not cached (real
            features are read, never computed); the returned features are on the CPU either way.
        progress: print what was loaded and the feature CNN's progress.
        synthetic: ``(splits, features)`` the caller already built with
            :func:`~course_utils.captions.build_captioned` and
            :func:`~course_utils.recipes.retrieval.build_features` with this ``cfg`` and ``seed``
            (the notebooks do, for their figures); ignored when real data is found.

    Returns:
        ``(data, source)``: a :class:`~course_utils.recipes.retrieval.RetrievalData` with splits
        ``train``/``val``/``test`` ready for ``run_variant`` and ``run_query_agnostic``, and the
        :class:`RetrievalSource` (use ``source.knobs`` for checkpoint folders).

    Raises:
        FileNotFoundError / ValueError: a dataset folder exists but its layout is wrong (named file,
        what was expected).
    """
    found = find_real_data(cfg)
    if found is not None:
        data, source = load_karpathy_inputs(found[1], found[0], cfg)
        if progress:
            print(source.message)
        return data, source
    if _names(cfg):
        message = absent_message(cfg)
        print(message)  # always: outputs must say which data they used
    else:
        message = "retrieval data: the synthetic captioned scenes (this profile looks for no real data)"
    if synthetic is None:
        splits = build_captioned(cfg, seed=seed)
        feats, _, _ = build_features(splits, cfg, seed=seed, progress=progress, device=device)
    else:
        splits, feats = synthetic
    source = RetrievalSource("synthetic", SYNTHETIC_LABEL, None, feature_knobs(cfg, seed), message)
    return RetrievalData.build(splits, feats), source


def retrieval_examples(sims: torch.Tensor, cap_to_img: torch.Tensor, source: RetrievalSource, *,
                       split: str = "test", images: Sequence[int] = (0, 1), captions: Sequence[int] = (0, 7),
                       k: int = 5) -> list[str]:
    """Figures 3.5 and 3.6 as text, for real features (no pixels here): the top-``k`` captions of
    each image in ``images`` and the top-``k`` image files of each caption in ``captions``, a
    ground-truth match marked ``✓``.  ``sims``: ``(I, C)`` scores on ``split``."""
    files, caps = source.filenames[split], source.captions[split]
    lines = []
    for i in images:
        lines.append(f"image {files[i]}: top-{k} captions")
        for c in sims[i].topk(min(k, sims.shape[1])).indices.tolist():
            lines.append(f"  {'✓' if int(cap_to_img[c]) == i else '✗'} {caps[c]}")
    for c in captions:
        lines.append(f'caption "{caps[c]}": top-{k} images')
        for i in sims[:, c].topk(min(k, sims.shape[0])).indices.tolist():
            lines.append(f"  {'✓' if int(cap_to_img[c]) == i else '✗'} {files[i]}")
    return lines
