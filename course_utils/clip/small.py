"""The course's small CLIP: its configuration, preprocessing, tokenizer and weight files.

An open_clip ``CLIP`` (:data:`SMALL_CLIP_CONFIG`, about 1.3 M parameters) pretrained
contrastively on rendered words by ``tools/pretrain_small_clip.py`` and shipped in
``data/small_clip/`` (safetensors + ``manifest.json`` with its sha256 and the command that
rebuilt it).  It reads words letter by letter: its tokenizer is open_clip's standard BPE applied
to the spelled-out word (:func:`spell_out`: ``JOINT`` → ``J O I N T``, one token per letter).
With plain BPE a frequent word such as ``JOINT`` is one token and a rare one such as ``JOINE``
two unrelated pieces (``jo`` + ``ine``), so a small model would have to learn the spelling of
thousands of tokens from pictures; with letters it learns 26 tokens and how their order makes a
word, which is what telling look-alikes apart needs.

Loading any CLIP (this one, ViT-B/32, or a random one) goes through
:func:`course_utils.clip.loading.load_clip`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..checkpoints import CheckpointError, reject_lfs_pointer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SMALL_CLIP_CONFIG",
    "SmallCLIP",
    "SMALL_CLIP_DIR",
    "SMALL_CLIP_IMAGE_SIZE",
    "SMALL_CLIP_WEIGHTS",
    "build_small_clip",
    "file_sha256",
    "load_small_clip_state",
    "save_small_clip",
    "small_clip_preprocess",
    "small_clip_tokenizer",
    "spell_out",
]

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
SMALL_CLIP_DIR = Path(__file__).resolve().parents[2] / "data" / "small_clip"
SMALL_CLIP_WEIGHTS = "small_clip.safetensors"

# OpenAI CLIP's normalisation; the small model uses it too so both share one preprocessing idea
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SmallCLIP(open_clip.CLIP):
    """open_clip's ``CLIP`` whose encoders take their input from any device.

    A notebook moves the model to ``env.device`` while word crops and token ids come from a
    dataset on the CPU; each encoder therefore moves its input to the model's device first (a
    no-op when it is already there, so CPU numbers are unchanged).  The parameters, their names
    and the forward pass are open_clip's: weight files are interchangeable with a plain ``CLIP``.
    """

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, 3, 32, 128)`` images on any device -> ``(B, embed_dim)`` on the model's device."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"image: expected a (B, 3, H, W) tensor, got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        return super().encode_image(image.to(self.logit_scale.device), normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, context_length)`` int64 token ids on any device -> ``(B, embed_dim)`` on the model's device."""
        if not isinstance(text, torch.Tensor) or text.ndim != 2:
            raise ValueError(f"text: expected (B, context_length) token ids, got "
                             f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}")
        return super().encode_text(text.to(self.logit_scale.device), normalize=normalize)


def build_small_clip(seed: int = 0, zero_token_embedding: bool = True) -> SmallCLIP:
    """A freshly initialised small CLIP (:class:`SmallCLIP`, :data:`SMALL_CLIP_CONFIG`).

    Args:
        seed: seeds the initialisation (same seed, same weights on CPU).
        zero_token_embedding: start every BPE token's embedding at zero.  Tokens never seen in
            training then stay exactly zero (Adam gives them no update), so the saved file only
            needs the rows that were used: the 49408-row table would otherwise be 25 MB.
    """

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = SmallCLIP(**SMALL_CLIP_CONFIG)
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


def spell_out(text: str) -> str:
    """``"JOINT"`` → ``"J O I N T"``: the small CLIP's text input, one BPE token per letter.

    A space inside ``text`` becomes ``_`` first, so word boundaries survive the spelling.
    """
    return " ".join(text.replace(" ", "_"))


def small_clip_tokenizer() -> Callable[[Sequence[str]], torch.Tensor]:
    """The small CLIP's tokenizer: open_clip's BPE on the spelled-out text (:func:`spell_out`)."""

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=SMALL_CLIP_CONFIG["text_cfg"]["context_length"])
    return lambda texts: tok([spell_out(t) for t in texts])


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
    """Read a file written by :func:`save_small_clip` back into a dense ``state_dict``.

    Raises:
        CheckpointError: naming ``path``: a git-LFS pointer instead of the weights, a truncated
            or foreign file, or a file without the sparse token table of :func:`save_small_clip`.
    """
    path = Path(path)
    reject_lfs_pointer(path)
    try:
        state = load_file(str(path))
    except Exception as err:  # SafetensorError ("incomplete metadata", ...), OSError from mmap
        raise CheckpointError(
            f"{path}: cannot read the small CLIP weights ({type(err).__name__}: {err}); the file is "
            "truncated or not a safetensors file. Restore it (`git checkout -- <file>`, "
            "`git lfs pull`) or rebuild it with `python tools/pretrain_small_clip.py`."
        ) from None
    missing = [k for k in ("token_embedding.rows", "token_embedding.values", "token_embedding.shape")
               if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a small-CLIP file of save_small_clip: it lacks {missing}")
    rows = state.pop("token_embedding.rows")
    values = state.pop("token_embedding.values")
    shape = state.pop("token_embedding.shape").tolist()
    table = torch.zeros(shape, dtype=values.dtype)
    try:
        table[rows] = values
    except (IndexError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the token table does not fit together (shape {shape}, "
                              f"{len(rows)} rows, values {tuple(values.shape)}): {err}") from None
    state["token_embedding.weight"] = table
    return state
