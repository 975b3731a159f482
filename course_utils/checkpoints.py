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
    "load_model_state",
    "optimizer_hparams",
    "prune_checkpoints",
    "reject_lfs_pointer",
    "save_checkpoint",
]

#: Bumped whenever the layout of the checkpoint dict changes incompatibly.
CHECKPOINT_FORMAT_VERSION = 1

_CKPT_NAME = re.compile(r"^epoch_(\d{3,})\.pt$")

#: How every git-LFS pointer file begins (a clone without ``git lfs`` holds these, ~130 bytes).
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"

#: Param-group keys that are not hyper-parameters of the optimizer: the parameters, switches
#: that pick an implementation of the same update, and what a scheduler keeps there for itself.
_NOT_HPARAMS = frozenset({"params", "foreach", "fused", "capturable", "differentiable",
                          "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


def reject_lfs_pointer(path: Path) -> None:
    """Raise :class:`CheckpointError` when ``path`` is a git-LFS pointer instead of the file.

    Every reader would otherwise fail on it with its own puzzling message (safetensors:
    "header too large", torch: "invalid load key, 'v'").
    """
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        raise CheckpointError(
            f"{path}: this is a git-LFS pointer ({path.stat().st_size} bytes), not the weights "
            "themselves; run `git lfs install && git lfs pull` in the repository to fetch them."
        )


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
    hparams: str = "load",
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and load it into the given objects.

    Args:
        path: the ``.pt`` file.
        model, optimizer, scheduler: loaded in place when given (strictly for the model).
        map_location: where tensors land before being copied into ``model``.
        restore_rng: also restore the global RNG states (``fit`` does this to resume exactly).
        hparams: what to do when ``optimizer``'s class or hyper-parameters (``lr``, ``betas``,
            ``momentum``, ``weight_decay``, ...) differ from the checkpoint's (see
            :func:`optimizer_hparams`): ``"load"`` (the checkpoint's values replace them, as
            ``load_state_dict`` does), ``"check"`` (raise :class:`CheckpointError` listing each
            difference, old -> new) or ``"override"`` (load the state, then put the new values
            back; an optimizer of another class starts from fresh state).

    Returns:
        The checkpoint dict: ``epoch``, ``model``/``optimizer``/``scheduler`` state dicts,
        ``history`` (as a :class:`History`), ``rng``, ``extra``, ``format_version``; with
        ``hparams="check"``/``"override"`` also ``optimizer_hparams`` (the record to save in
        the next checkpoints' ``extra["fit"]["optimizer"]``) and ``hparam_notes`` (lines saying
        what ``"override"`` changed).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt or not a course checkpoint, or its
            weights do not fit ``model`` (the message names the missing / unexpected keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if hparams not in ("load", "check", "override"):
        raise ValueError(f"load_checkpoint: hparams={hparams!r}, expected 'load', 'check' or 'override'")
    ckpt = _read_checkpoint(path, map_location)
    if model is not None:
        load_model_state(model, ckpt["model"], path)
    load_state = optimizer is not None and ckpt.get("optimizer") is not None
    if optimizer is not None and hparams != "load":
        # Compared before loading: load_state_dict overwrites the param groups with the old ones.
        new_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        ckpt["optimizer_hparams"], changes, other_class = _hparam_changes(ckpt, optimizer)
        ckpt["hparam_notes"] = []
        if changes and hparams == "check":
            raise CheckpointError(
                f"{path}: the optimizer differs from the one this run was trained with: "
                + "; ".join(changes) + ". Pass fit(..., override_hparams=True) to continue with the "
                "new values, or resume=False (or another ckpt_dir) to train from scratch."
            )
        if changes:
            ckpt["optimizer_hparams"] = optimizer_hparams(optimizer)
            load_state = load_state and not other_class  # another class's moments mean nothing
            ckpt["hparam_notes"].append(
                "override_hparams=True: continuing with the new optimizer settings ("
                + "; ".join(changes) + ")" + (", its state starts afresh" if other_class else ""))
    if load_state:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: optimizer state does not fit this optimizer ({e}). Build the optimizer "
                "over the same parameters, in the same order, as when the checkpoint was written."
            ) from None
        if hparams == "override" and ckpt["hparam_notes"]:
            for group, new in zip(optimizer.param_groups, new_groups):
                group.update(new)
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
    reject_lfs_pointer(path)
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


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``, or a :class:`CheckpointError` naming ``path`` and the
    missing / unexpected keys and mismatched shapes (a few of each) when ``state`` does not fit."""
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


# --------------------------------------------------------------------------------------------
# Optimizer hyper-parameters: what a resumed run must not change silently
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A param-group value as a plain Python value (weights_only loading; exact comparison)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _group_hparams(group: Mapping[str, Any], as_built: bool) -> dict[str, Any]:
    """The hyper-parameters of one param group; ``as_built``: ``lr`` as the optimizer was built
    (a scheduler keeps that in ``initial_lr`` while it moves ``lr``)."""
    out = {k: _plain(v) for k, v in group.items() if k not in _NOT_HPARAMS}
    if as_built and "initial_lr" in group and "lr" in out:
        out["lr"] = _plain(group["initial_lr"])
    return out


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"class": "Adam", "param_groups": [{"lr": ..., "betas": [...], ...}, ...]}``: the
    optimizer's class and the hyper-parameters of each param group as it was built (see
    :data:`_NOT_HPARAMS` for what is left out).  :func:`course_utils.train.fit` stores this in
    every checkpoint and compares it on resume."""
    return {"class": type(optimizer).__name__,
            "param_groups": [_group_hparams(g, as_built=True) for g in optimizer.param_groups]}


def _hparam_changes(ckpt: Mapping[str, Any], optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, Any], list[str], bool]:
    """``(record, changes, other_class)``: the checkpoint's record of the optimizer the run was
    started with, each change as ``"lr 0.01 -> 0.1"``, and whether the class differs.

    A value counts as changed when it differs both from the value the run was started with and
    from the value at the checkpoint: a scheduler moves ``lr`` between the two, so a freshly
    built optimizer matches the first and one reused from an earlier ``fit`` matches the second.
    """
    live = [g for g in (ckpt.get("optimizer") or {}).get("param_groups") or []]
    record = ((ckpt.get("extra") or {}).get("fit") or {}).get("optimizer")
    if record is None and not live:
        return optimizer_hparams(optimizer), [], False
    if record is None:  # a checkpoint from before the record: the class is told by the keys
        record = {"class": None, "param_groups": [_group_hparams(g, as_built=True) for g in live]}
    now = optimizer_hparams(optimizer)
    now_live = [_group_hparams(g, as_built=False) for g in optimizer.param_groups]
    was_live = [_group_hparams(g, as_built=False) for g in live] or record["param_groups"]
    changes: list[str] = []
    start, cur = record["param_groups"], now["param_groups"]
    other_class = record["class"] is not None and record["class"] != now["class"]
    if record["class"] is None and len(start) == len(cur):
        # Adam's groups have betas/eps, SGD's momentum/dampening: keys missing on *both* sides
        # mean another class (one side only: a newer torch added a default, e.g. to Adam).
        other_class = any(set(a) - set(b) and set(b) - set(a) for a, b in zip(start, cur))
    if other_class:
        changes.append(f"optimizer class {record['class'] or 'another optimizer'} -> {now['class']}")
    if len(start) != len(cur) or len(was_live) != len(cur):
        return record, changes, other_class  # load_state_dict names the group mismatch
    for i, (a, b, la, lb) in enumerate(zip(start, cur, was_live, now_live)):
        prefix = f"param_groups[{i}]." if len(cur) > 1 else ""
        for k in sorted(set(a) & set(b)):
            if a[k] != b[k] and la.get(k, a[k]) != lb.get(k, b[k]):
                changes.append(f"{prefix}{k} {a[k]!r} -> {b[k]!r}")
    return record, changes, other_class


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
