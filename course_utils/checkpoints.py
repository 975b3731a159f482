"""Checkpoint files of the training loop: safe to load, written atomically, resumable exactly.

A checkpoint holds the model, optimizer, scheduler, :class:`course_utils.history.History` and
every RNG state (torch CPU/CUDA, NumPy, Python ``random``), so :func:`course_utils.train.fit`
resumes a run bit for bit on CPU.  Files load with ``torch.load(..., weights_only=True)`` (no
arbitrary pickles), are written to a temporary file and renamed into place (a runtime that dies
mid-save leaves the previous checkpoint intact), and a truncated or foreign file raises
:class:`CheckpointError` that names the file and says what to do.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .history import History

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_path",
    "drop_optimizer_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

#: Bumped whenever the layout of the checkpoint dict changes incompatibly.
CHECKPOINT_FORMAT_VERSION = 1

_CKPT_NAME = re.compile(r"^epoch_(\d{3,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------------
# RNG states, in a form torch.load(weights_only=True) accepts
# --------------------------------------------------------------------------------------------


def _get_rng_state() -> dict[str, Any]:
    """Capture every global RNG as tensors, ints, floats and lists (no NumPy arrays, no
    tuples of arbitrary objects) so the checkpoint needs no pickle to load."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            # uint32 keys stored as int64 to stay within the dtypes every torch version saves.
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "state": [int(x) for x in py_state],
                   "gauss_next": gauss_next},
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`_get_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((
        npst["bit_generator"],
        npst["keys"].numpy().astype(np.uint32),
        npst["pos"],
        npst["has_gauss"],
        npst["cached_gaussian"],
    ))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            warnings.warn(
                f"checkpoint holds RNG states for {len(cuda_states)} GPUs but this machine has "
                f"{torch.cuda.device_count()}; CUDA random numbers will differ after resume.",
                stacklevel=3,
            )


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def checkpoint_path(ckpt_dir: str | Path, epoch: int) -> Path:
    """``ckpt_dir/epoch_{epoch:03d}.pt`` (epochs are 1-based)."""
    return Path(ckpt_dir) / f"epoch_{epoch:03d}.pt"


def list_checkpoints(ckpt_dir: str | Path | None) -> dict[int, Path]:
    """Map epoch -> checkpoint file for every ``epoch_NNN.pt`` in ``ckpt_dir`` (temporary files
    of an interrupted save are ignored)."""
    if ckpt_dir is None or not Path(ckpt_dir).is_dir():
        return {}
    found = {}
    for p in Path(ckpt_dir).iterdir():
        m = _CKPT_NAME.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def latest_checkpoint(ckpt_dir: str | Path | None) -> Path | None:
    """The checkpoint of the highest epoch in ``ckpt_dir``, or ``None`` when there is none."""
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[max(ckpts)] if ckpts else None


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int,
    history: History | Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path.

    The file holds ``format_version``, ``epoch``, the state dicts of ``model``, ``optimizer`` and
    ``scheduler``, the history, the RNG states of torch/NumPy/Python and ``extra`` (which must
    itself contain only tensors and plain Python values so that ``weights_only`` loading works).

    It is written to a temporary file in the same folder, flushed to disk and renamed over
    ``path``: a runtime that dies mid-save leaves the previous checkpoint intact instead of a
    truncated file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hist = history.to_dict() if isinstance(history, History) else dict(history)
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": hist,
        "rng": _get_rng_state(),
        "extra": dict(extra or {}),
    }
    _write_atomically(payload, path)
    return path


def _write_atomically(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = False,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and load it into the given objects.

    Args:
        path: the ``.pt`` file.
        model, optimizer, scheduler: loaded in place when given (strictly for the model).
        map_location: where tensors land before being copied into ``model``.
        restore_rng: also restore the global RNG states (``fit`` does this to resume exactly).

    Returns:
        The checkpoint dict: ``epoch``, ``model``/``optimizer``/``scheduler`` state dicts,
        ``history`` (as a :class:`History`), ``rng``, ``extra``, ``format_version``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt or not a course checkpoint, or its
            weights do not fit ``model`` (the message names the missing / unexpected keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = _read_checkpoint(path, map_location)
    if model is not None:
        _load_model_state(model, ckpt["model"], path)
    if optimizer is not None and ckpt.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: optimizer state does not fit this optimizer ({e}). Build the optimizer "
                "over the same parameters, in the same order, as when the checkpoint was written."
            ) from None
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if restore_rng:
        _set_rng_state(ckpt["rng"])
    ckpt["history"] = History.from_dict(ckpt.get("history") or {})
    return ckpt


def _read_checkpoint(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError."""
    advice = (
        "It is probably truncated (a save interrupted before the atomic rename was introduced, a "
        "partial copy or download) or not a course checkpoint. Delete it and rerun: training "
        "resumes from the previous epoch's checkpoint."
    )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {reason}). {advice}"
        ) from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "model" not in ckpt:
        raise CheckpointError(
            f"{path} loads, but is not a checkpoint written by course_utils.train (it lacks "
            f"'format_version'/'model'). {advice}"
        )
    if int(ckpt["format_version"]) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt['format_version']}, newer than this "
            f"course_utils understands ({CHECKPOINT_FORMAT_VERSION}); update course_utils."
        )
    return ckpt


def _load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state)`` with a message that lists what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_head(shapes)}")
        raise CheckpointError(
            f"{path}: weights do not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Was the checkpoint written for a different model or profile?"
        )
    model.load_state_dict(state)


def _head(items: Sequence[str], n: int = 8) -> str:
    """``[a, b, c] (+N more)`` so that a 200-key mismatch stays readable."""
    shown = ", ".join(items[:n])
    return f"[{shown}]" + (f" (+{len(items) - n} more)" if len(items) > n else "")


def prune_checkpoints(ckpt_dir: Path, keep_epochs: set[int], latest: int) -> None:
    """Delete checkpoints not in ``keep_epochs``; the latest always stays so resume works.

    Only the latest keeps its optimizer state: the epoch before it is rewritten without (see
    :func:`drop_optimizer_state`), so that the kept epochs cost one model each on disk (Adam's
    two moments would triple a ViT-B/32 checkpoint from 0.6 to 1.8 GB).
    """
    for epoch, p in list_checkpoints(ckpt_dir).items():
        if epoch != latest and epoch not in keep_epochs:
            p.unlink(missing_ok=True)
    previous = checkpoint_path(ckpt_dir, latest - 1)
    if previous.is_file():
        # Only the previous latest can still hold optimizer state: older ones were slimmed
        # when they were the one before the latest (so each file is rewritten once, never re-read).
        drop_optimizer_state(previous)


def drop_optimizer_state(path: str | Path) -> bool:
    """Rewrite the checkpoint at ``path`` without its optimizer state (atomically).

    Returns:
        True when the file was rewritten, False when it held no optimizer state.
    """
    path = Path(path)
    ckpt = _read_checkpoint(path, "cpu")
    if ckpt.get("optimizer") is None:
        return False
    ckpt["optimizer"] = None
    _write_atomically(ckpt, path)
    return True
