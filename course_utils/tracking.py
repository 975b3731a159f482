"""A local experiment tracker: a run's settings, losses and resources in TensorBoard files.

Seed 004 tracks its fine-tuning runs (losses, hyper-parameters, system resources) in Neptune, a
hosted service that needs an account and a network.  The course keeps the same record locally,
as TensorBoard event files:

* **Nothing to install or sign up for.**  torch ships the writer
  (``torch.utils.tensorboard.SummaryWriter``); it needs only the ``tensorboard`` package, which
  Colab already has.
* **A log is plain files in a folder**: it can be copied, zipped, kept next to the checkpoints.
* **Colab shows it in the notebook**: ``%load_ext tensorboard`` then ``%tensorboard --logdir DIR``.
* **Readable without a server**: :func:`read_log` uses TensorBoard's own reader
  (``EventAccumulator``), so tests and notebooks can check what was logged.

MLflow was the other candidate: it would pull a much larger dependency tree and a
database-backed store for what is here a handful of numbers per step.

What goes where (tags as TensorBoard shows them)::

    run/info                  text: the run's settings as JSON (log_run)
    run/init_weights_sha256   text: weights_sha256 of the model before training (log_run)
    train_step/<name>         scalar per optimizer step (log_step)
    train/<name>, val/<name>  scalar per epoch (log_epoch)
    lr                        scalar per epoch (log_epoch)
    resources/<key>           scalar per optimizer step (log_resources)

**Non-finite values are skipped, not written and not raised**: in :class:`History` a NaN means
"this metric was not measured then" (and a GPU reading on a CPU is NaN), so a NaN is an absent
point, as in History's plots.  A diverged loss still shows in ``History`` and in ``fit``'s
console lines.  Scalars come back from the event file at float32 precision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import is_main_process
from .history import History
from .resources import ResourceMonitor

__all__ = ["StepRecorder", "Tracker", "default_log_dir", "read_log", "tensors_sha256", "tracking_to", "weights_sha256"]

_TEXT_SUFFIX = "/text_summary"  # SummaryWriter.add_text writes tag "<tag>/text_summary"


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of named tensors: equal names and values give equal hashes, on any device.

    Every entry is hashed in the mapping's order: its name, dtype and shape, then the bytes of
    the CPU, contiguous tensor.

    Raises:
        TypeError: an entry is not a tensor (an ``extra_state`` object has no byte form to hash).
    """
    h = hashlib.sha256()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors_sha256: entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header = f"{len(key)}:{key}|{t.dtype}|{tuple(t.shape)}|{len(data)}\n"
        h.update(header.encode("utf-8"))
        h.update(data)
    return h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 (hex) of ``model.state_dict()`` (:func:`tensors_sha256`): parameters and buffers
    both count (a batch norm's running statistics are part of what a model computes).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or its state dict holds a non-tensor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"weights_sha256: expected a torch.nn.Module, got {type(model).__name__}")
    return tensors_sha256(model.state_dict())


class Tracker:
    """Write one run's record as TensorBoard event files in ``log_dir`` (created if missing).

    ::

        with Tracker(ckpt_dir / "tb") as tracker:
            tracker.log_run({"lr": 5e-5, "epochs": 20}, weights_sha256(model))
            tracker.log_step(step, {"loss": 0.71})
            tracker.log_epoch(epoch, {"loss": 0.70}, {"loss": 0.74}, lr=5e-5)
            tracker.log_resources(step, monitor.sample())
        read_log(ckpt_dir / "tb")["scalars"]["train/loss"]     # [(1, 0.70)]

    Each ``Tracker`` adds a new event file to ``log_dir``; a resumed run that logs to the same
    folder keeps the earlier file, and :func:`read_log` reads both.

    Raises:
        TypeError: ``log_dir`` is not a ``str`` or path.
        ValueError: ``log_dir`` is empty.
        NotADirectoryError: ``log_dir`` exists and is not a folder.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = _check_log_dir(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when tracking

        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir))

    def __repr__(self) -> str:
        state = "closed" if self._writer is None else "open"
        return f"Tracker({str(self.log_dir)!r}, {state})"

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def log_run(self, info: Mapping[str, Any], init_weights_sha256: str) -> None:
        """Write the run's settings (tag ``run/info``, JSON) and its initial weights' hash.

        Args:
            info: setting name -> value; values JSON cannot hold (paths, devices, dtypes) are
                written as ``str(value)``.
            init_weights_sha256: :func:`weights_sha256` of the model before training, 64 hex
                digits (tag ``run/init_weights_sha256``).
        """
        if not isinstance(info, Mapping) or not all(isinstance(k, str) for k in info):
            raise TypeError("log_run: info must be a mapping with string keys")
        if not (isinstance(init_weights_sha256, str) and len(init_weights_sha256) == 64
                and all(c in "0123456789abcdef" for c in init_weights_sha256)):
            raise ValueError("log_run: init_weights_sha256 must be 64 lower-case hex digits "
                             f"(weights_sha256(model)), got {init_weights_sha256!r}")
        text = json.dumps(dict(info), indent=2, default=str)
        writer = self._open_writer()
        # Indented four spaces: TensorBoard renders text as Markdown, and this makes it a code
        # block.  Leading spaces are still valid JSON, so json.loads reads it back as written.
        writer.add_text("run/info", textwrap.indent(text, "    "), 0)
        writer.add_text("run/init_weights_sha256", init_weights_sha256, 0)

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write one optimizer step's metrics as scalars ``train_step/<name>`` at ``step``."""
        self._scalars("train_step/", _check_step(step, "log_step"), metrics)

    def log_epoch(self, epoch: int, train: Mapping[str, float],
                  val: Mapping[str, float] | None, lr: float) -> None:
        """Write one epoch's means: ``train/<name>``, ``val/<name>`` (when given) and ``lr``,
        all at step ``epoch`` (1-based, as in :class:`History`)."""
        epoch = _check_step(epoch, "log_epoch")
        self._scalars("train/", epoch, train)
        if val:
            self._scalars("val/", epoch, val)
        self._scalars("", epoch, {"lr": lr})

    def log_resources(self, step: int, sample: Mapping[str, float]) -> None:
        """Write a :meth:`course_utils.resources.ResourceMonitor.sample` as ``resources/<key>``
        at optimizer step ``step`` (NaN readings, e.g. the GPU ones on a CPU, are skipped)."""
        self._scalars("resources/", _check_step(step, "log_resources"), sample)

    def flush(self) -> None:
        """Write everything logged so far to disk (the writer otherwise flushes every 2 min)."""
        self._open_writer().flush()

    def close(self) -> None:
        """Flush and close the event file; calling it again does nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open_writer(self) -> Any:
        if self._writer is None:
            raise RuntimeError(f"{self!r}: the tracker is closed; make a new Tracker to log more")
        return self._writer

    def _scalars(self, prefix: str, step: int, values: Mapping[str, float]) -> None:
        """``prefix + name`` -> float at ``step``, non-finite values skipped."""
        if not isinstance(values, Mapping):
            raise TypeError(f"expected a mapping of name -> number, got {type(values).__name__}")
        writer = self._open_writer()
        for name, value in values.items():
            if not (isinstance(name, str) and name):
                raise TypeError(f"metric names must be non-empty strings, got {name!r}")
            x = _as_float(value, prefix + name)
            if math.isfinite(x):
                writer.add_scalar(prefix + name, x, step)


def read_log(log_dir: str | Path) -> dict[str, Any]:
    """Everything a :class:`Tracker` wrote to ``log_dir``, read with TensorBoard's own reader.

    Returns:
        ``{"scalars": {tag: [(step, value), ...]}, "text": {tag: str}}``: every scalar event in
        the order written (values at float32 precision), and the last text written per tag
        (tags as written, e.g. ``"run/info"``; ``json.loads`` reads that one back).

    Raises:
        FileNotFoundError: ``log_dir`` does not exist or holds no event file.
        NotADirectoryError: ``log_dir`` is not a folder.
    """
    path = _check_log_dir(log_dir)
    if not path.exists():
        raise FileNotFoundError(f"read_log: no folder {path}")
    if not any(p.name.startswith("events.out.tfevents") for p in path.iterdir()):
        raise FileNotFoundError(f"read_log: {path} holds no TensorBoard event file "
                                "(events.out.tfevents.*); was a Tracker made with this folder?")
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    # size_guidance 0 = keep every event (the default keeps 10,000 scalars per tag at random);
    # no purging, so a resumed run's events all come back.
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0},
                              purge_orphaned_data=False)
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
               for tag in tags["scalars"]}
    text = {}
    for tag in tags["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "text":
            continue
        value = np.asarray(tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto))
        text[tag.removesuffix(_TEXT_SUFFIX)] = "".join(
            v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.ravel())
    return {"scalars": scalars, "text": text}


def _check_log_dir(log_dir: str | Path) -> Path:
    """``log_dir`` as a ``Path``: a string or path naming a folder (or nothing yet)."""
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a str or pathlib.Path, got {type(log_dir).__name__}")
    if not str(log_dir).strip():
        raise ValueError("log_dir is empty: give the folder the event files go to")
    path = Path(log_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"log_dir {str(path)!r} is a file, not a folder")
    return path


def _check_step(step: int, where: str) -> int:
    """``step`` as an int >= 0 (bools and floats refused: a step is a count)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"{where}: step must be an int >= 0, got {step!r}")
    return int(step)


def _as_float(value: Any, tag: str) -> float:
    """A number (Python, NumPy, or one-element tensor) as a float, or a TypeError naming ``tag``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{tag}: expected a number, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().cpu())
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{tag}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


class StepRecorder:
    """What :func:`course_utils.train.fit` records after every optimizer step, on rank 0 only:
    the resource sample into ``history.resources`` (Fig. 2.5) and, with a tracker, into its log;
    the running loss when the progress bar refreshes."""

    def __init__(self, history: History, monitor: ResourceMonitor, tracker: Tracker | None):
        self.history, self.monitor, self.tracker = history, monitor, tracker
        self.on = is_main_process()

    def step(self, global_step: int) -> None:
        if self.on:
            sample = self.monitor.sample()
            self.history.record_resources(global_step, sample)
            if self.tracker is not None:
                self.tracker.log_resources(global_step, sample)

    def loss(self, global_step: int, running: float) -> None:
        if self.on and self.tracker is not None:
            self.tracker.log_step(global_step, {"loss": running})


#: The folders :func:`tracking_to` opened, innermost last.
_ROOTS: list[Path] = []


@contextlib.contextmanager
def tracking_to(root: str | Path | None) -> Iterator[None]:
    """Within the block, every :func:`course_utils.train.fit` without a ``track_dir`` logs to
    ``root/<its desc>`` (the command line's ``--track DIR``).  ``None``: nothing changes."""
    if root is None:
        yield
        return
    _ROOTS.append(Path(root))
    try:
        yield
    finally:
        _ROOTS.pop()


def default_log_dir(desc: str) -> Path | None:
    """Where a run labelled ``desc`` logs inside :func:`tracking_to` (``None`` outside it)."""
    if not _ROOTS:
        return None
    return _ROOTS[-1] / (re.sub(r"[^A-Za-z0-9_.-]+", "_", desc).strip("_") or "run")

