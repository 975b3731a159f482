"""CLIP for word spotting on SVT: models, the word-image probability matrix and the thesis metrics.

Notebooks 06-07 (seed 004 Ch. 2).

Models (:func:`load_clip`):

* ``full`` — open_clip ViT-B/32 with OpenAI weights, run with QuickGELU as they were trained
  (``ViT-B-32-quickgelu``; plain ``ViT-B-32`` + ``openai`` silently loses accuracy), or
  ``laion2b_s34b_b79k`` as a second choice.  Needs a download.
* ``small`` — the course's own small open_clip ``CLIP`` (:data:`SMALL_CLIP_CONFIG`), pretrained
  contrastively on rendered words by ``tools/pretrain_small_clip.py`` and shipped in
  ``data/small_clip/``.  It reads words letter by letter: its tokenizer is open_clip's standard
  BPE applied to the spelled-out word (:func:`spell_out`: ``JOINT`` → ``J O I N T``, one token
  per letter).  With plain BPE a frequent word such as ``JOINT`` is one token and a rare one such
  as ``JOINE`` two unrelated pieces (``jo`` + ``ine``), so a small model would have to learn the
  spelling of thousands of tokens from pictures; with letters it learns 26 tokens and how their
  order makes a word, which is what telling look-alikes apart needs.

Metrics (seed 004 §2.2-2.3), all on a probability matrix ``P`` of shape ``(n_images, n_words)``
and a boolean matrix ``Y`` of the same shape (``Y[i, j]``: word ``j`` belongs to image ``i``,
the thesis's ``W_i^+``):

* approach 1 — per-word thresholds maximising Youden's J (:func:`youden_thresholds`,
  :func:`threshold_confusion`);
* approach 2 — the soft TP/TN/FP/FN of Eq. 2.3.10-2.3.13 (:func:`soft_confusion`);
* accuracy, precision, recall, F1 (Eq. 2.3.1-2.3.4, :func:`classification_metrics`);
* the normalised similarity entropy of Eq. 2.3.15 (:func:`normalised_similarity_entropy`);
* lexicon-50 top-1 word-spotting accuracy (:func:`lexicon_top1_accuracy`);
* the symmetric contrastive loss of Algorithm 1 (:func:`clip_contrastive_loss`).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "SMALL_CLIP_CONFIG",
    "SMALL_CLIP_IMAGE_SIZE",
    "SMALL_CLIP_DIR",
    "ClipBundle",
    "build_small_clip",
    "small_clip_preprocess",
    "save_small_clip",
    "load_small_clip_state",
    "load_clip",
    "file_sha256",
    "encode_images",
    "encode_texts",
    "word_image_probabilities",
    "lexicon_probabilities",
    "positives_matrix",
    "lexicon_top1_accuracy",
    "youden_thresholds",
    "threshold_confusion",
    "soft_confusion",
    "classification_metrics",
    "normalised_similarity_entropy",
    "clip_contrastive_loss",
    "top_k_words",
    "WordCropDataset",
    "contrastive_step",
    "distinct_pairs",
    "MAX_LOGIT_SCALE",
    "clamp_logit_scale",
]

# ---------------------------------------------------------------------------------------------
# the small CLIP
# ---------------------------------------------------------------------------------------------

#: (height, width) of the small CLIP's input.  Word crops are wide: a 1:4 input keeps letters
#: legible where a 64x64 square would squash a ten-letter word to 6 px per letter.
SMALL_CLIP_IMAGE_SIZE: tuple[int, int] = (32, 128)

#: open_clip ``CLIP`` keyword arguments of the course's small model (about 1.3 M parameters
#: plus the rows of the token table it uses).  The vision tower cuts the 32x128 crop into
#: 16 vertical strips of 32x8 pixels (one or two strips per letter, the way CRNN-style text
#: recognisers read columns); the text tower reads up to 16 BPE tokens, plenty for one word.
SMALL_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": SMALL_CLIP_IMAGE_SIZE, "patch_size": (32, 8), "width": 128,
                   "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4,
                 "layers": 2, "mlp_ratio": 4.0},
    "quick_gelu": False,
}

#: where the shipped weights live (``small_clip.safetensors`` + ``manifest.json``)
SMALL_CLIP_DIR = Path(__file__).resolve().parent.parent / "data" / "small_clip"
SMALL_CLIP_WEIGHTS = "small_clip.safetensors"

# OpenAI CLIP's normalisation; the small model uses it too so both share one preprocessing idea
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_small_clip(seed: int = 0, zero_token_embedding: bool = True) -> torch.nn.Module:
    """A freshly initialised small open_clip ``CLIP`` (:data:`SMALL_CLIP_CONFIG`).

    Args:
        seed: seeds the initialisation (same seed, same weights on CPU).
        zero_token_embedding: start every BPE token's embedding at zero.  Tokens never seen in
            training then stay exactly zero (Adam gives them no update), so the saved file only
            needs the rows that were used: the 49408-row table would otherwise be 25 MB.
    """
    import open_clip

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = open_clip.CLIP(**SMALL_CLIP_CONFIG)
    if zero_token_embedding:
        with torch.no_grad():
            model.token_embedding.weight.zero_()
    return model


def small_clip_preprocess(image: Image.Image) -> torch.Tensor:
    """PIL image → normalised tensor of shape ``(3, 32, 128)`` for the small CLIP.

    The crop is resized to 32x128 without keeping its aspect ratio (squashing a short word is
    harmless; cropping a long one, as CLIP's centre crop would, cuts letters off).
    """
    h, w = SMALL_CLIP_IMAGE_SIZE
    image = image.convert("RGB").resize((w, h), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_small_clip(model: torch.nn.Module, path: str | Path) -> str:
    """Save the small CLIP as safetensors (token table stored sparsely) and return its sha256.

    The token embedding is stored as ``token_embedding.rows`` (int64 ids of the non-zero rows)
    and ``token_embedding.values``; every other tensor as it is.  The file has no metadata that
    changes between runs, so identical weights give identical bytes.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    rows = torch.nonzero(table.abs().sum(dim=1) > 0).flatten()
    state["token_embedding.rows"] = rows.to(torch.int64)
    state["token_embedding.values"] = table[rows].contiguous()
    state["token_embedding.shape"] = torch.tensor(list(table.shape), dtype=torch.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return file_sha256(path)


def load_small_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_small_clip` back into a dense ``state_dict``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    rows = state.pop("token_embedding.rows")
    values = state.pop("token_embedding.values")
    shape = state.pop("token_embedding.shape").tolist()
    table = torch.zeros(shape, dtype=values.dtype)
    table[rows] = values
    state["token_embedding.weight"] = table
    return state


# ---------------------------------------------------------------------------------------------
# loading a model: ClipBundle
# ---------------------------------------------------------------------------------------------


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


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when ``host`` answers on port 443 (a failed download otherwise retries for a minute)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def spell_out(text: str) -> str:
    """``"JOINT"`` → ``"J O I N T"``: the small CLIP's text input, one BPE token per letter.

    A space inside ``text`` becomes ``_`` first, so word boundaries survive the spelling.
    """
    return " ".join(text.replace(" ", "_"))


def _small_tokenizer() -> Callable[[Sequence[str]], torch.Tensor]:
    """The small CLIP's tokenizer: open_clip's BPE on the spelled-out text (:func:`spell_out`)."""
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=SMALL_CLIP_CONFIG["text_cfg"]["context_length"])
    return lambda texts: tok([spell_out(t) for t in texts])


def _load_small(weights_dir: Path, device: torch.device) -> ClipBundle:
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
    return ClipBundle(model.to(device).eval(), small_clip_preprocess, _small_tokenizer(), "small", line,
                      {"manifest": manifest, "sha256": sha, "path": str(path)})


def _load_full(device: torch.device) -> ClipBundle:
    import open_clip

    last: Exception | None = None
    # OpenAI weights were trained with QuickGELU: the -quickgelu config matches them
    for arch, tag in (("ViT-B-32-quickgelu", "openai"), ("ViT-B-32", "laion2b_s34b_b79k")):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)
        except Exception as err:  # noqa: BLE001 - any download/cache failure means "try the next"
            last = err
            continue
        tokenizer = open_clip.get_tokenizer(arch)
        return ClipBundle(model.to(device).eval(), preprocess, lambda t, tok=tokenizer: tok(list(t)),
                          "full", f"weights: open_clip {arch} pretrained={tag}", {"arch": arch, "pretrained": tag})
    raise RuntimeError(f"could not load open_clip ViT-B/32 weights ({last})")


def load_clip(kind: str = "full", device: str | torch.device | None = None,
              weights_dir: str | Path | None = None, verbose: bool = True) -> ClipBundle:
    """Load a CLIP for word spotting and print one line saying which weights run.

    Args:
        kind: ``"full"`` tries open_clip ViT-B/32 (OpenAI weights with QuickGELU, then
            laion2b) and falls back to the small CLIP when there is no network or no cached
            download; ``"small"`` loads the course's small CLIP directly.
        device: where to put the model (default CPU).
        weights_dir: folder of the small CLIP (default ``data/small_clip``).

    Returns:
        a :class:`ClipBundle` in eval mode.
    """
    device = torch.device(device or "cpu")
    weights_dir = Path(weights_dir) if weights_dir is not None else SMALL_CLIP_DIR
    if kind not in ("full", "small"):
        raise ValueError(f"load_clip: kind={kind!r}, expected 'full' or 'small'")
    bundle: ClipBundle | None = None
    if kind == "full":
        if _online() or _hf_cache_has_vit_b32():
            try:
                bundle = _load_full(device)
            except RuntimeError as err:
                reason = str(err)
        else:
            reason = "no network and no cached download"
        if bundle is None:
            print(f"open_clip ViT-B/32 unavailable ({reason}); using the course's small CLIP instead")
    if bundle is None:
        bundle = _load_small(weights_dir, device)
    if verbose:
        print(bundle.weights)
    return bundle


def _hf_cache_has_vit_b32() -> bool:
    """True when the Hugging Face cache already holds an open_clip ViT-B/32 checkpoint."""
    import os

    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    return any(hub.glob("models--timm--vit_base_patch32_clip_224.*")) or any(hub.glob("models--laion--CLIP-ViT-B-32-laion2B*"))


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# the word-image probability matrix (§2.2.1)
# ---------------------------------------------------------------------------------------------


def word_image_probabilities(image_emb: torch.Tensor, text_emb: torch.Tensor,
                             logit_scale: float = 100.0) -> torch.Tensor:
    """The thesis's matrix ``P``: softmax over the whole vocabulary, one row per image.

    Args:
        image_emb: ``(n_images, d)`` L2-normalised image embeddings.
        text_emb: ``(n_words, d)`` L2-normalised word embeddings.
        logit_scale: ``1/τ``, the model's temperature (CLIP's is 100).

    Returns:
        ``P`` of shape ``(n_images, n_words)``; every row sums to 1.
    """
    _check_emb(image_emb, text_emb)
    return (logit_scale * image_emb @ text_emb.T).softmax(dim=-1)


def lexicon_probabilities(image_emb: torch.Tensor, text_emb: torch.Tensor, lexicon_mask: torch.Tensor,
                          logit_scale: float = 100.0) -> torch.Tensor:
    """``P`` restricted to each image's lexicon: softmax over the words where ``lexicon_mask`` is True.

    Args:
        image_emb: ``(n_images, d)``; text_emb: ``(n_words, d)``.
        lexicon_mask: ``(n_images, n_words)`` bool, True for the words of image ``i``'s lexicon
            (see :func:`positives_matrix`).

    Returns:
        ``(n_images, n_words)``: zero outside each lexicon, each row sums to 1 over its lexicon.
    """
    _check_emb(image_emb, text_emb)
    if lexicon_mask.shape != (image_emb.shape[0], text_emb.shape[0]) or lexicon_mask.dtype != torch.bool:
        raise ValueError(f"lexicon_mask: expected a bool tensor of shape "
                         f"({image_emb.shape[0]}, {text_emb.shape[0]}), got {lexicon_mask.dtype} {tuple(lexicon_mask.shape)}")
    if not lexicon_mask.any(dim=1).all():
        bad = int((~lexicon_mask.any(dim=1)).nonzero()[0])
        raise ValueError(f"lexicon_mask: image {bad} has an empty lexicon")
    logits = (logit_scale * image_emb @ text_emb.T).masked_fill(~lexicon_mask, float("-inf"))
    return logits.softmax(dim=-1)


def _check_emb(image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings: expected (n_images, d) and (n_words, d) with the same d, got "
                         f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)}")


def positives_matrix(words_per_image: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> torch.Tensor:
    """Bool matrix ``Y`` of shape ``(n_images, len(vocabulary))``: ``Y[i, j]`` = word ``j`` ∈ image ``i``.

    Pass each image's lexicon for the thesis's ``W_i^+``, or its tags for the words really
    written in it.  Words missing from ``vocabulary`` raise a ``KeyError`` naming them.
    """
    index = {w: j for j, w in enumerate(vocabulary)}
    Y = torch.zeros(len(words_per_image), len(vocabulary), dtype=torch.bool)
    for i, words in enumerate(words_per_image):
        missing = [w for w in words if w not in index]
        if missing:
            raise KeyError(f"image {i}: words {missing[:5]} are not in the vocabulary")
        Y[i, [index[w] for w in words]] = True
    return Y


def top_k_words(P: torch.Tensor, vocabulary: Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable words of every row of ``P`` (Fig. 2.7): ``[[(word, p), ...], ...]``."""
    values, idx = P.topk(min(k, P.shape[1]), dim=1)
    return [[(vocabulary[j], float(v)) for v, j in zip(vr, ir)] for vr, ir in zip(values.tolist(), idx.tolist())]


def lexicon_top1_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, vocabulary: Sequence[str],
                          lexicons: Sequence[Sequence[str]], targets: Sequence[str]) -> float:
    """Word-spotting accuracy: share of crops whose most similar lexicon word is the right one.

    Args:
        image_emb: ``(n_crops, d)`` embeddings of word crops.
        text_emb: ``(n_words, d)`` embeddings of ``vocabulary``.
        lexicons: the lexicon (e.g. 50 words) of each crop's image.
        targets: the true word of each crop (must be in its lexicon).
    """
    if not (len(lexicons) == len(targets) == image_emb.shape[0]):
        raise ValueError(f"lexicon_top1_accuracy: {image_emb.shape[0]} crops, {len(lexicons)} lexicons, "
                         f"{len(targets)} targets (expected the same number)")
    mask = positives_matrix(lexicons, vocabulary)
    pred = (image_emb @ text_emb.T).masked_fill(~mask, float("-inf")).argmax(dim=1)
    index = {w: j for j, w in enumerate(vocabulary)}
    truth = torch.tensor([index[t] for t in targets])
    return float((pred == truth).float().mean()) if len(targets) else float("nan")


# ---------------------------------------------------------------------------------------------
# metrics (§2.3)
# ---------------------------------------------------------------------------------------------


def _check_PY(P: torch.Tensor, Y: torch.Tensor) -> None:
    if P.ndim != 2 or P.shape != Y.shape:
        raise ValueError(f"P and Y: expected two (n_images, n_words) matrices, got {tuple(P.shape)} and {tuple(Y.shape)}")
    if Y.dtype != torch.bool:
        raise ValueError(f"Y: expected a bool tensor, got {Y.dtype}")


def youden_thresholds(P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Approach 1: one threshold per word, maximising Youden's J = TPR - FPR (Eq. 2.3.8-2.3.9).

    Uses ``sklearn.metrics.roc_curve`` on column ``j`` of ``P`` against column ``j`` of ``Y``.
    A word that is positive for no image gets ``+inf`` (never predicted: any prediction would be
    a false positive); a word positive for every image gets ``-inf`` (always predicted).

    Returns:
        ``(n_words,)`` float64 thresholds; word ``j`` is predicted for image ``i`` when
        ``P[i, j] >= thresholds[j]``.
    """
    from sklearn.metrics import roc_curve

    _check_PY(P, Y)
    Pn, Yn = P.detach().double().cpu().numpy(), Y.cpu().numpy()
    out = np.empty(P.shape[1])
    for j in range(P.shape[1]):
        pos = Yn[:, j].sum()
        if pos == 0:
            out[j] = np.inf
        elif pos == len(Yn):
            out[j] = -np.inf
        else:
            fpr, tpr, thr = roc_curve(Yn[:, j], Pn[:, j])
            out[j] = thr[int(np.argmax(tpr - fpr))]  # first maximum: the highest such threshold
    return torch.from_numpy(out)


def threshold_confusion(P: torch.Tensor, Y: torch.Tensor, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image TP, TN, FP, FN counts after thresholding ``P`` with one threshold per word.

    Returns:
        ``{"tp", "tn", "fp", "fn"}``, each a float64 tensor of shape ``(n_images,)``.
    """
    _check_PY(P, Y)
    if thresholds.shape != (P.shape[1],):
        raise ValueError(f"thresholds: expected shape ({P.shape[1]},), got {tuple(thresholds.shape)}")
    pred = P.double() >= thresholds.double().to(P.device)[None, :]
    return {
        "tp": (pred & Y).sum(1).double(), "tn": (~pred & ~Y).sum(1).double(),
        "fp": (pred & ~Y).sum(1).double(), "fn": (~pred & Y).sum(1).double(),
    }


def soft_confusion(P: torch.Tensor, Y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Approach 2: the soft counts of Eq. 2.3.10-2.3.13, per image.

    Each probability is divided by the largest probability of its group (positives ``W_i^+``
    or negatives ``W_i^-`` of image ``i``)::

        TP_i = Σ_{j∈W+} p/max(p+)        FN_i = Σ_{j∈W+} (1 - p/max(p+))
        FP_i = Σ_{j∈W-} p/max(p-)        TN_i = Σ_{j∈W-} (1 - p/max(p-))

    A group that is empty contributes zero; a group whose largest probability is 0 counts all
    its words as predicted absent (ratio 0).

    Returns:
        ``{"tp", "tn", "fp", "fn"}``, float64 tensors of shape ``(n_images,)``;
        ``tp + fn = |W_i^+|`` and ``fp + tn = |W_i^-|``.
    """
    _check_PY(P, Y)
    P = P.double()

    def ratios(mask: torch.Tensor) -> torch.Tensor:
        vals = P.masked_fill(~mask, 0.0)
        peak = vals.max(dim=1, keepdim=True).values
        return torch.where(peak > 0, vals / peak.clamp_min(torch.finfo(P.dtype).tiny), torch.zeros_like(vals))

    pos, neg = ratios(Y), ratios(~Y)
    n_pos, n_neg = Y.sum(1).double(), (~Y).sum(1).double()
    tp, fp = pos.sum(1), neg.sum(1)
    return {"tp": tp, "fn": n_pos - tp, "fp": fp, "tn": n_neg - fp}


def classification_metrics(counts: dict[str, torch.Tensor], average: str = "macro") -> dict[str, float]:
    """Accuracy, precision, recall and F1 (Eq. 2.3.1-2.3.4) from per-image counts.

    Args:
        counts: ``{"tp", "tn", "fp", "fn"}`` of shape ``(n_images,)`` (from
            :func:`soft_confusion` or :func:`threshold_confusion`).
        average: ``"macro"`` computes the four metrics per image and averages them over images
            (each image weighs the same); ``"micro"`` sums the counts over images first.
            A 0/0 ratio counts as 0 (sklearn's ``zero_division=0``).

    Returns:
        ``{"accuracy", "precision", "recall", "f1"}`` as floats.
    """
    tp, tn, fp, fn = (counts[k].double() for k in ("tp", "tn", "fp", "fn"))
    if average == "micro":
        tp, tn, fp, fn = tp.sum(), tn.sum(), fp.sum(), fn.sum()
    elif average != "macro":
        raise ValueError(f"average={average!r}, expected 'macro' or 'micro'")

    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(b > 0, a / b.clamp_min(1e-300), torch.zeros_like(a))

    acc = div(tp + tn, tp + tn + fp + fn)
    prec, rec = div(tp, tp + fp), div(tp, tp + fn)
    f1 = div(2 * prec * rec, prec + rec)
    return {k: float(v.mean()) for k, v in (("accuracy", acc), ("precision", prec), ("recall", rec), ("f1", f1))}


def normalised_similarity_entropy(P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Eq. 2.3.15: entropy of the positives' renormalised probabilities, log base ``|W_i^+|``.

    1 means the model spreads its probability evenly over an image's words (the thesis's
    assumed truth), 0 means it puts all of it on one of them.

    Returns:
        ``(n_images,)`` float64; NaN for an image with fewer than two positive words (the base
        ``|W_i^+|`` must exceed 1).  Average with ``torch.nanmean``.
    """
    _check_PY(P, Y)
    P = P.double()
    n_pos = Y.sum(1)
    pos = P.masked_fill(~Y, 0.0)
    q = pos / pos.sum(1, keepdim=True).clamp_min(1e-300)
    # 0 log 0 = 0
    plogp = torch.where(q > 0, q * torch.log(q.clamp_min(1e-300)), torch.zeros_like(q))
    ent = -plogp.sum(1) / torch.log(n_pos.double().clamp_min(2))
    return torch.where(n_pos >= 2, ent, torch.full_like(ent, float("nan")))


# ---------------------------------------------------------------------------------------------
# Algorithm 1
# ---------------------------------------------------------------------------------------------


def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                          logit_scale: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The symmetric contrastive loss of Algorithm 1 (Eq. 2.4.1-2.4.2).

    Args:
        image_emb: ``(B, d)`` image embeddings of the batch (normalised here, step (d)).
        text_emb: ``(B, d)`` text embeddings; pair ``b`` is ``(image_emb[b], text_emb[b])``.
        logit_scale: ``1/τ`` (a tensor to learn it, as CLIP does).

    Returns:
        ``{"loss": (L_I + L_T)/2, "loss_image": L_I, "loss_text": L_T}``, scalar tensors.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"clip_contrastive_loss: expected two (B, d) tensors of the same shape, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    v_i, v_t = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    S = logit_scale * v_i @ v_t.T  # S_ij, step (e)
    target = torch.arange(S.shape[0], device=S.device)
    loss_i = F.cross_entropy(S, target)  # rows: each image against all texts (Eq. 2.4.1)
    loss_t = F.cross_entropy(S.T, target)  # columns: each text against all images (Eq. 2.4.2)
    return {"loss": 0.5 * (loss_i + loss_t), "loss_image": loss_i, "loss_text": loss_t}


# ---------------------------------------------------------------------------------------------
# fine-tuning with the shared loop (§2.4.2)
# ---------------------------------------------------------------------------------------------


class WordCropDataset(torch.utils.data.Dataset):
    """``(image tensor (3, H, W), token ids (context_length,))`` pairs for contrastive fine-tuning.

    Args:
        images: PIL word crops (or whole images).
        texts: one word per image.
        bundle: gives the model's ``preprocess`` and ``tokenizer``.

    Preprocessing happens once here, so epochs cost only the model's time.
    """

    def __init__(self, images: Sequence[Image.Image], texts: Sequence[str], bundle: ClipBundle) -> None:
        if len(images) != len(texts):
            raise ValueError(f"WordCropDataset: {len(images)} images but {len(texts)} texts")
        self.texts = list(texts)
        self.x = torch.stack([bundle.preprocess(im) for im in images]) if images else torch.zeros(0)
        self.tokens = bundle.tokenizer(self.texts) if texts else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.tokens[i]


#: CLIP's cap on ``1/τ`` (open_clip clamps ``logit_scale`` to ``log(100)`` while training).
MAX_LOGIT_SCALE = 100.0


def distinct_pairs(tokens: torch.Tensor) -> torch.Tensor:
    """Which pairs of a batch to keep so that every text occurs once: ``(B, L) -> (B,)`` bool.

    Algorithm 1's right answers are the diagonal of ``S``.  When one word appears twice in a
    batch (THE cut from two images), each copy is also the *negative* of the other: the loss then
    pushes an image away from its own word and can only be lowered by flattening ``S``, so the
    learnt temperature falls instead of rising.  Keeping the first pair of each text makes the
    batch what step (a) assumes, ``B`` distinct pairs.  The first occurrence wins, so the choice
    is deterministic.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected shape (B, context_length), got {tuple(tokens.shape)}")
    _, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    b = tokens.shape[0]
    first = torch.full((int(inverse.max()) + 1,) if b else (0,), b, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(b), reduce="amin")
    keep = torch.zeros(b, dtype=torch.bool)
    keep[first] = True
    return keep.to(tokens.device)


def contrastive_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``step_fn`` for :func:`course_utils.train.fit`: Algorithm 1 on one batch.

    Args:
        batch: ``(images (B, 3, H, W), tokens (B, context_length))``.

    Returns:
        ``{"loss", "loss_image", "loss_text"}`` (scalars) over the batch's distinct texts
        (:func:`distinct_pairs`), with the learnt ``1/τ`` capped at :data:`MAX_LOGIT_SCALE`.
    """
    images, tokens = batch
    keep = distinct_pairs(tokens)
    images, tokens = images[keep], tokens[keep]
    return clip_contrastive_loss(model.encode_image(images), model.encode_text(tokens), clamp_logit_scale(model))


def clamp_logit_scale(model: torch.nn.Module) -> torch.Tensor:
    """Cap the model's learnt ``1/τ`` at :data:`MAX_LOGIT_SCALE` in place and return ``exp(logit_scale)``.

    open_clip clamps after every optimiser step; doing it before each forward is the same for
    the loss and keeps Adam's momentum from carrying the parameter past the cap unseen.
    """
    with torch.no_grad():
        model.logit_scale.clamp_(max=float(np.log(MAX_LOGIT_SCALE)))
    return model.logit_scale.exp()
