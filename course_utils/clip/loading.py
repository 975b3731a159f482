"""Loading a CLIP: one factory for every model the word-spotting notebooks (06-08) run.

:func:`load_clip` returns a :class:`ClipBundle` (model, preprocessing, tokenizer and one line
saying which weights run):

* ``"full"`` — open_clip ViT-B/32 with OpenAI weights, run with QuickGELU as they were trained
  (``ViT-B-32-quickgelu``; plain ``ViT-B-32`` + ``openai`` silently loses accuracy), or
  ``laion2b_s34b_b79k`` as a second choice, from open_clip's own cache when it holds them, else
  OpenAI's file downloaded by :func:`course_utils.registry.fetch` (``COURSE_OFFLINE=1``: no
  socket); otherwise, said in one line, the course's small CLIP or (``when_unavailable="random"``)
  the same ViT-B-32-quickgelu with random weights;
* ``"small"`` — the course's small CLIP (:mod:`course_utils.clip.small`) from ``data/small_clip``;
* ``"random"`` — a randomly initialised small CLIP, said loudly; also what ``"small"`` gives while
  the shipped weights do not exist yet (``random_if_missing``), so the course runs end to end.

:func:`load_clip_weights` puts a fine-tuned checkpoint (notebook 07) into a loaded model.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg
from PIL import Image

from .. import registry
from ..checkpoints import CheckpointError, load_model_state, reject_lfs_pointer
from .small import (
    SMALL_CLIP_DIR,
    SMALL_CLIP_WEIGHTS,
    build_small_clip,
    file_sha256,
    load_small_clip_state,
    small_clip_preprocess,
    small_clip_tokenizer,
)

__all__ = [
    "CLIP_KINDS",
    "FULL_CLIP_CHOICES",
    "FULL_CLIP_ENTRY",
    "ClipBundle",
    "encode_images",
    "encode_texts",
    "eval_unit",
    "load_clip",
    "load_clip_weights",
    "open_clip_cached_file",
    "open_clip_pretrained_available",
    "pretraining_overlap",
]

#: what :func:`load_clip` can be asked for
CLIP_KINDS = ("full", "small", "random")

#: open_clip (architecture, pretrained tag) pairs ``kind="full"`` uses, in order, when open_clip's
#: own cache holds them; the OpenAI weights were trained with QuickGELU, which the ``-quickgelu``
#: config matches (plain ``ViT-B-32`` with them silently loses accuracy)
FULL_CLIP_CHOICES = (("ViT-B-32-quickgelu", "openai"), ("ViT-B-32", "laion2b_s34b_b79k"))

#: the registry entry of the first choice's weights, downloaded when open_clip's cache has none
FULL_CLIP_ENTRY = "clip_vit_b32_openai"



@dataclass
class ClipBundle:
    """A CLIP model with what it needs to embed PIL images and words.

    Attributes:
        model: the open_clip ``CLIP`` (``encode_image``, ``encode_text``, ``logit_scale``).
        preprocess: PIL image → ``(3, H, W)`` tensor.
        tokenizer: list of ``n`` strings → ``(n, context_length)`` int64 token ids.
        kind: ``"full"`` or ``"small"``.
        weights: one human-readable line saying which weights are loaded.
        info: extra facts (manifest of the small model, pretrained tag of the full one).
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    kind: str
    weights: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings, shape ``(len(images), embed_dim)``, on CPU."""
        return encode_images(self, images, batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings, shape ``(len(texts), embed_dim)``, on CPU."""
        return encode_texts(self, texts, batch_size)

    @property
    def logit_scale(self) -> float:
        """``1 / τ`` of Algorithm 1 (the model's learnt temperature, exponentiated)."""
        return float(self.model.logit_scale.exp().item())


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings of PIL ``images``; shape ``(n, embed_dim)``, float32, CPU."""
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.stack([bundle.preprocess(im) for im in images[s:s + batch_size]]).to(bundle.device)
        out.append(F.normalize(bundle.model.encode_image(x).float(), dim=-1).cpu())
    if not out:
        raise ValueError("encode_images: no images given")
    return torch.cat(out)


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings of ``texts``; shape ``(n, embed_dim)``, float32, CPU."""
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(texts[s:s + batch_size]).to(bundle.device)
        out.append(F.normalize(bundle.model.encode_text(tokens).float(), dim=-1).cpu())
    if not out:
        raise ValueError("encode_texts: no texts given")
    return torch.cat(out)


def _load_small(weights_dir: Path, device: torch.device) -> ClipBundle:
    """The shipped small CLIP; ``FileNotFoundError`` naming the file when it is missing,
    :class:`CheckpointError` naming it when it is a git-LFS pointer, truncated or of another config."""
    path = weights_dir / SMALL_CLIP_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the small CLIP weights are missing; rebuild them with "
            "`python tools/pretrain_small_clip.py` (see data/small_clip/manifest.json)"
        )
    model = build_small_clip(zero_token_embedding=False)
    load_model_state(model, load_small_clip_state(path), path)
    manifest_path = weights_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    sha = file_sha256(path)
    expected = manifest.get("sha256")
    if expected and expected != sha:
        print(f"warning: {path} has sha256 {sha[:12]}…, the manifest says {expected[:12]}…")
    acc = manifest.get("final_metrics", {}).get("lexicon50_top1_synthsvt_test")
    # the pretraining rendering (WordStream's domain); SynthSVT's street crops are another one
    domain = manifest.get("hyperparameters", {}).get("domain")
    domain = f"{domain} " if domain else ""
    shown = path.relative_to(SMALL_CLIP_DIR.parent.parent) if SMALL_CLIP_DIR.parent.parent in path.parents else path
    line = (f"weights: course small CLIP ({shown}, "
            f"sha256 {sha[:12]}…, pretrained on {domain}rendered words"
            + (f", zero-shot lexicon-50 top-1 {acc:.1%} on SynthSVT test" if acc is not None else "") + ")")
    return ClipBundle(model.to(device).eval(), small_clip_preprocess, small_clip_tokenizer(), "small", line,
                      {"manifest": manifest, "sha256": sha, "path": str(path)})


def _random_small(device: torch.device, why: str) -> ClipBundle:
    """A randomly initialised small CLIP whose ``weights`` line says so in capitals."""
    model = build_small_clip(seed=0, zero_token_embedding=False).to(device).eval()
    line = f"weights: RANDOMLY INITIALISED small CLIP ({why}) - the numbers below mean nothing"
    return ClipBundle(model, small_clip_preprocess, small_clip_tokenizer(), "small", line, {"random_init": True})


# --------------------------------------------------------------------------------------------
# ViT-B/32: from open_clip's cache, else the registry's download, else the fallback
# --------------------------------------------------------------------------------------------


def open_clip_cached_file(model: str = "ViT-B-32", tag: str = "openai",
                          cache_dir: str | Path | None = None) -> Path | None:
    """The file of open_clip's pretrained ``tag`` for ``model`` in open_clip's own cache, or ``None``.

    Looks where ``open_clip.pretrained.download_pretrained`` puts it: the Hugging Face hub copy
    (checked with ``huggingface_hub.try_to_load_from_cache``, which never touches the network;
    open_clip prefers a ``.safetensors`` twin), or the file of the config's URL in ``cache_dir``
    or ``~/.cache/clip``.  Pass the ``cache_dir`` you would pass to open_clip.  Never downloads.
    """
    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        return None
    candidates = [Path(cfg["file"])] if cfg.get("file") else []
    if cfg.get("hf_hub"):
        candidates += _hf_cached_files(cfg["hf_hub"], cache_dir)
    if cfg.get("url"):
        root = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        candidates.append(root / os.path.basename(cfg["url"]))
    return next((c for c in candidates if c.is_file()), None)


def open_clip_pretrained_available(model: str = "ViT-B-32", tag: str = "openai",
                                   cache_dir: str | Path | None = None) -> bool:
    """Whether open_clip's own cache holds ``pretrained=tag`` for ``model`` (see
    :func:`open_clip_cached_file`); never touches the network."""
    return open_clip_cached_file(model, tag, cache_dir) is not None


def _hf_cached_files(hf_hub: str, cache_dir: str | Path | None) -> list[Path]:
    """The cached files of open_clip's ``hf_hub`` entry, ``"org/repo/filename"`` or ``"org/repo/"``
    (default file name), its ``.safetensors`` twin first."""
    try:
        from huggingface_hub import try_to_load_from_cache  # optional for open_clip
    except ImportError:
        return []
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    found = [try_to_load_from_cache(repo_id, n, cache_dir=str(cache_dir) if cache_dir else None)
             for n in names]
    return [Path(f) for f in found if isinstance(f, str)]


def _is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's CLIP release format) rather than a
    state dict: torch's own test, a ``constants.pkl`` record in the zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):  # a legacy (non-zip) pickle is never TorchScript
        return False


@contextmanager
def _no_root_warnings() -> Iterator[None]:
    """Drop warnings sent to the root logger meanwhile: open_clip logs "Model initialized
    randomly" there, which our own line already says.  The NullHandler keeps ``logging.warning``
    from configuring the root logger of the notebook as a side effect."""
    root, handler, disabled = logging.getLogger(), logging.NullHandler(), logging.root.manager.disable
    root.addHandler(handler)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(disabled)
        root.removeHandler(handler)


def _full_bundle(model: torch.nn.Module, preprocess: Callable, arch: str, device: torch.device,
                 line: str, info: dict[str, Any]) -> ClipBundle:
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipBundle(model.to(device).eval(), preprocess, lambda t, tok=tokenizer: tok(list(t)),
                      "full", line, info)


def _load_full(device: torch.device, arch: str, tag: str, checkpoint: Path, origin: str) -> ClipBundle:
    """open_clip ``arch`` with the weights of its pretrained ``tag`` read from the local file
    ``checkpoint`` (``create_model_and_transforms(arch, pretrained=<file>)``).

    open_clip applies a tag's preprocessing only when given the tag itself, so it is passed here.
    torch reads a TorchScript archive only with ``weights_only=False``: such a file (and only
    such) is read so; it comes sha256-checked from the registry, or from open_clip's cache.
    """
    cfg = get_pretrained_cfg(arch, tag) or {}
    torchscript = _is_torchscript_archive(checkpoint)
    with warnings.catch_warnings():
        # expected for OpenAI's archive: torch.load hands it to torch.jit.load, which is deprecated
        warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(checkpoint), weights_only=not torchscript,
            image_mean=cfg.get("mean"), image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"))
    return _full_bundle(model, preprocess, arch, device, f"weights: open_clip {arch} pretrained={tag} ({origin})",
                        {"arch": arch, "pretrained": tag, "checkpoint": str(checkpoint)})


def _random_full(device: torch.device, why: str) -> ClipBundle:
    """ViT-B-32-quickgelu with random weights (seed 0, so that reruns start from the same ones)."""
    arch = FULL_CLIP_CHOICES[0][0]
    with torch.random.fork_rng(), _no_root_warnings():
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    line = f"weights: open_clip {arch} randomly initialised ({why}) - the numbers below mean nothing"
    return _full_bundle(model, preprocess, arch, device, line,
                        {"arch": arch, "pretrained": "random", "random_init": True})


def _full_or_fallback(device: torch.device, when_unavailable: str) -> ClipBundle | None:
    """ViT-B/32 from open_clip's cache, else from the registry; ``None`` means "use the small CLIP"."""
    for arch, tag in FULL_CLIP_CHOICES:
        cached = open_clip_cached_file(arch, tag)
        if cached is None:
            continue
        try:
            return _load_full(device, arch, tag, cached, f"open_clip's cache, {cached}")
        except Exception as err:  # noqa: BLE001 - a damaged cache file: try the next source
            print(f"open_clip's cached {arch} {tag} weights ({cached}) do not load "
                  f"({type(err).__name__}); trying the next source")
    random = when_unavailable == "random"
    text = f"open_clip {FULL_CLIP_CHOICES[0][0]} with RANDOM weights" if random else None
    got, source = registry.fetch_or_fallback(FULL_CLIP_ENTRY, fallback=lambda: None, fallback_text=text)
    if isinstance(got, Path):
        return _load_full(device, *FULL_CLIP_CHOICES[0], got, source)
    return _random_full(device, f"{FULL_CLIP_ENTRY} unavailable") if random else None


def load_clip(kind: str = "full", device: str | torch.device | None = None,
              weights_dir: str | Path | None = None, verbose: bool = True,
              random_if_missing: bool = True, when_unavailable: str = "fallback") -> ClipBundle:
    """Load a CLIP for word spotting and print one line saying which weights run.

    Args:
        kind: one of :data:`CLIP_KINDS`.  ``"full"`` loads open_clip ViT-B/32: the first of
            :data:`FULL_CLIP_CHOICES` that open_clip's own cache holds, else OpenAI's weights
            downloaded by :func:`course_utils.registry.fetch` (entry :data:`FULL_CLIP_ENTRY`,
            sha256-checked; ``COURSE_OFFLINE=1`` opens no socket), else what ``when_unavailable``
            says, after one printed line saying why.  ``"small"`` loads the course's small CLIP;
            ``"random"`` a randomly initialised one.
        device: where to put the model (default CPU).
        weights_dir: folder of the small CLIP (default ``data/small_clip``).
        verbose: print the weights line.
        random_if_missing: when the small CLIP's weights file does not exist (before
            ``tools/pretrain_small_clip.py`` has run) use a random small CLIP, said loudly,
            instead of raising ``FileNotFoundError``.
        when_unavailable: ``kind="full"`` without pretrained weights: ``"fallback"`` (the
            course's small CLIP, the documented fallback) or ``"random"`` (the same ViT-B-32-quickgelu
            with random weights, so that the full code path still runs).

    Returns:
        a :class:`ClipBundle` in eval mode.
    """
    if kind not in CLIP_KINDS:
        raise ValueError(f"load_clip: kind={kind!r}, expected one of {CLIP_KINDS}")
    if when_unavailable not in registry.WHEN_UNAVAILABLE:
        raise ValueError(f"load_clip: when_unavailable={when_unavailable!r}, "
                         f"expected one of {registry.WHEN_UNAVAILABLE}")
    device = torch.device(device or "cpu")
    weights_dir = Path(weights_dir) if weights_dir is not None else SMALL_CLIP_DIR
    bundle: ClipBundle | None = None
    if kind == "random":
        bundle = _random_small(device, "asked for")
    elif kind == "full":
        bundle = _full_or_fallback(device, when_unavailable)
    if bundle is None:
        try:
            bundle = _load_small(weights_dir, device)
        except FileNotFoundError as err:
            if not random_if_missing:
                raise
            bundle = _random_small(device, f"no trained weights: {str(err).split(':')[0]} is missing")
    if verbose:
        print(bundle.weights)
    return bundle


def load_clip_weights(clip: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a fine-tuned CLIP (notebook 07) into ``clip`` in place and return it.

    Accepts a checkpoint of :func:`course_utils.train.fit` (``epoch_XXX.pt``), a plain
    ``state_dict`` saved with ``torch.save`` or a small-CLIP ``.safetensors`` file; ``.pt`` files
    are read with ``weights_only=True``.  Keys and shapes must match ``clip``'s exactly.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: naming ``path``: a git-LFS pointer, a truncated or foreign file, or
            weights of another model (a few of the missing / unexpected keys and shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_clip_weights: {path}: no such file (expected a fine-tuned CLIP)")
    if path.suffix == ".safetensors":
        state = load_small_clip_state(path)
    else:
        reject_lfs_pointer(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, pickle errors, EOFError, ...
            raise CheckpointError(f"load_clip_weights: cannot read {path} ({type(err).__name__}: "
                                  f"{str(err).strip()[:200]}); it is truncated or not a weights file") from None
        if isinstance(state, dict) and "format_version" in state and "model" in state:
            state = state["model"]  # a course_utils.train checkpoint
        if not isinstance(state, dict):
            raise CheckpointError(f"load_clip_weights: {path} holds a {type(state).__name__}, "
                                  "expected a state_dict or a course_utils.train checkpoint")
    load_model_state(clip, state, path)
    return clip


def pretraining_overlap(bundle: ClipBundle) -> str:
    """One line: how many SynthSVT test words the small CLIP's pretraining stream contained."""
    manifest = bundle.info.get("manifest") or {}
    ov = manifest.get("pretraining_overlap")
    if bundle.kind == "full":
        return "pretraining overlap: ViT-B/32 was pretrained by its authors on web data (unknown overlap)"
    if not ov:
        return ("pretraining overlap: unknown (no data/small_clip/manifest.json yet: the small CLIP "
                "has not been pretrained)")
    return (f"pretraining overlap: the small CLIP's stream ({manifest.get('samples_seen', '?')} rendered crops, "
            f"{ov['distinct_texts_in_stream']} distinct texts) contained {ov['test_tags_in_stream']} of the "
            f"{ov['test_tags_total']} SynthSVT test tags and {ov['test_lexicon_words_in_stream']} of its "
            f"{ov['test_lexicon_words_total']} test lexicon words, as words; the test images were never seen "
            f"({manifest.get('eval_split', '')})")


def eval_unit(bundle: ClipBundle) -> str:
    """``"image"`` for ViT-B/32 (the thesis feeds whole images), ``"crop"`` for the small CLIP."""
    return "image" if bundle.kind == "full" else "crop"
