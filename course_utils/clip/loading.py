"""Loading a CLIP: one factory for every model the word-spotting notebooks (06-08) run.

:func:`load_clip` returns a :class:`ClipBundle` (model, preprocessing, tokenizer and one line
saying which weights run):

* ``"full"`` — open_clip ViT-B/32 with OpenAI weights, run with QuickGELU as they were trained
  (``ViT-B-32-quickgelu``; plain ``ViT-B-32`` + ``openai`` silently loses accuracy), or
  ``laion2b_s34b_b79k`` as a second choice.  Used when open_clip's cache holds them, or when the
  network may be used (:func:`course_utils.registry.offline_mode`) and they download; otherwise
  the course's small CLIP, said in one line;
* ``"small"`` — the course's small CLIP (:mod:`course_utils.clip.small`) from ``data/small_clip``;
* ``"random"`` — a randomly initialised small CLIP, said loudly; also what ``"small"`` gives while
  the shipped weights do not exist yet (``random_if_missing``), so the course runs end to end.

:func:`load_clip_weights` puts a fine-tuned checkpoint (notebook 07) into a loaded model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from ..registry import offline_mode, open_clip_pretrained_available
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
    "ClipBundle",
    "encode_images",
    "encode_texts",
    "eval_unit",
    "load_clip",
    "load_clip_weights",
    "pretraining_overlap",
]

#: what :func:`load_clip` can be asked for
CLIP_KINDS = ("full", "small", "random")

#: open_clip (architecture, pretrained tag) pairs tried in order for ``kind="full"``; the OpenAI
#: weights were trained with QuickGELU, which the ``-quickgelu`` config matches
FULL_CLIP_CHOICES = (("ViT-B-32-quickgelu", "openai"), ("ViT-B-32", "laion2b_s34b_b79k"))

#: the host open_clip downloads ViT-B/32 from; probed once (unless ``COURSE_OFFLINE``) so an
#: offline machine does not wait a minute for open_clip's retries
HF_HOST = "huggingface.co"


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
    """The shipped small CLIP; ``FileNotFoundError`` naming the file when it is missing."""
    path = weights_dir / SMALL_CLIP_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the small CLIP weights are missing; rebuild them with "
            "`python tools/pretrain_small_clip.py` (see data/small_clip/manifest.json)"
        )
    model = build_small_clip(zero_token_embedding=False)
    model.load_state_dict(load_small_clip_state(path))
    manifest_path = weights_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    sha = file_sha256(path)
    expected = manifest.get("sha256")
    if expected and expected != sha:
        print(f"warning: {path} has sha256 {sha[:12]}…, the manifest says {expected[:12]}…")
    acc = manifest.get("final_metrics", {}).get("lexicon50_top1_synthsvt_test")
    shown = path.relative_to(SMALL_CLIP_DIR.parent.parent) if SMALL_CLIP_DIR.parent.parent in path.parents else path
    line = (f"weights: course small CLIP ({shown}, "
            f"sha256 {sha[:12]}…, pretrained on rendered words"
            + (f", lexicon-50 top-1 {acc:.1%} on SynthSVT test" if acc is not None else "") + ")")
    return ClipBundle(model.to(device).eval(), small_clip_preprocess, small_clip_tokenizer(), "small", line,
                      {"manifest": manifest, "sha256": sha, "path": str(path)})


def _random_small(device: torch.device, why: str) -> ClipBundle:
    """A randomly initialised small CLIP whose ``weights`` line says so in capitals."""
    model = build_small_clip(seed=0, zero_token_embedding=False).to(device).eval()
    line = f"weights: RANDOMLY INITIALISED small CLIP ({why}) - the numbers below mean nothing"
    return ClipBundle(model, small_clip_preprocess, small_clip_tokenizer(), "small", line, {"random_init": True})


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """While loading, tell the Hugging Face hub client to use its cache only when offline."""
    if not offline:
        yield
        return
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _load_full(device: torch.device, choices: Sequence[tuple[str, str]], offline: bool) -> ClipBundle:
    """The first of ``choices`` open_clip can load (from its cache only when ``offline``)."""
    last: Exception | None = None
    for arch, tag in choices:
        try:
            with _hub_offline(offline):
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)
        except Exception as err:  # noqa: BLE001 - any download/cache failure means "try the next"
            last = err
            continue
        tokenizer = open_clip.get_tokenizer(arch)
        return ClipBundle(model.to(device).eval(), preprocess, lambda t, tok=tokenizer: tok(list(t)),
                          "full", f"weights: open_clip {arch} pretrained={tag}", {"arch": arch, "pretrained": tag})
    raise RuntimeError(f"could not load open_clip ViT-B/32 weights ({last})")


def load_clip(kind: str = "full", device: str | torch.device | None = None,
              weights_dir: str | Path | None = None, verbose: bool = True,
              random_if_missing: bool = True) -> ClipBundle:
    """Load a CLIP for word spotting and print one line saying which weights run.

    Args:
        kind: one of :data:`CLIP_KINDS`.  ``"full"`` tries open_clip ViT-B/32
            (:data:`FULL_CLIP_CHOICES`): from open_clip's cache when it holds them, else by
            download unless :func:`course_utils.registry.offline_mode` says to stay off the
            network (``COURSE_OFFLINE=1``: no socket is opened); failing both, the small CLIP,
            with one printed line saying why.  ``"small"`` loads the course's small CLIP;
            ``"random"`` a randomly initialised one.
        device: where to put the model (default CPU).
        weights_dir: folder of the small CLIP (default ``data/small_clip``).
        verbose: print the weights line.
        random_if_missing: when the small CLIP's weights file does not exist (before
            ``tools/pretrain_small_clip.py`` has run) use a random small CLIP, said loudly,
            instead of raising ``FileNotFoundError``.

    Returns:
        a :class:`ClipBundle` in eval mode.
    """
    if kind not in CLIP_KINDS:
        raise ValueError(f"load_clip: kind={kind!r}, expected one of {CLIP_KINDS}")
    device = torch.device(device or "cpu")
    weights_dir = Path(weights_dir) if weights_dir is not None else SMALL_CLIP_DIR
    bundle: ClipBundle | None = None
    if kind == "random":
        bundle = _random_small(device, "asked for")
    elif kind == "full":
        cached = [c for c in FULL_CLIP_CHOICES if open_clip_pretrained_available(*c)]
        offline = offline_mode(probe_host=HF_HOST) if not cached else offline_mode()
        if cached or not offline:
            try:
                bundle = _load_full(device, cached or FULL_CLIP_CHOICES, offline)
            except RuntimeError as err:
                reason = str(err)
        else:
            reason = ("COURSE_OFFLINE=1 is set" if offline_mode() else "no network") + " and no cached download"
        if bundle is None:
            print(f"open_clip ViT-B/32 unavailable ({reason}); using the course's small CLIP instead")
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
    are read with ``weights_only=True``.  Keys must match ``clip``'s exactly (the message of
    ``load_state_dict`` names the ones that do not).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_clip_weights: {path}: no such file (expected a fine-tuned CLIP)")
    if path.suffix == ".safetensors":
        state = load_small_clip_state(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "format_version" in state and "model" in state:
            state = state["model"]  # a course_utils.train checkpoint
    clip.load_state_dict(state)
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
