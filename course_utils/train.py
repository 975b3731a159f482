"""The one training loop every notebook uses: progress, history, checkpoints, exact resume.

Every notebook trains through :func:`fit`::

    def step_fn(model, batch):                       # batch is already on the device
        images, targets = batch
        losses = model(images, targets)              # e.g. {"rpn": ..., "align": ...}
        return {"loss": losses["rpn"] + losses["align"], **losses}

    history = fit(model, step_fn, train_set, epochs=cfg.train.epochs, batch_size=8,
                  optimizer=torch.optim.AdamW(model.parameters(), 1e-3),
                  val_set=val_set, ckpt_dir="runs/03_align")
    history.plot()

Why it looks the way it does:

* **Exact resume.**  A Colab runtime can disconnect at any time.  Each epoch ends with a
  checkpoint holding the model, optimizer, scheduler, :class:`History` and every RNG state
  (torch CPU/CUDA, NumPy, Python ``random``).  The shuffling order of epoch ``e`` depends only on
  ``(seed, e)`` (a fresh generator seeded with ``seed + e``), so an interrupted and resumed run
  ends with the same weights, bit for bit on CPU, as one that never stopped.
* **Several processes.**  Launched by ``torchrun`` (world size ``W > 1``), ``fit`` wraps the model
  in ``DistributedDataParallel``: ``batch_size`` stays the *global* batch, each epoch's order is
  the one-process order, and each global batch is cut into ``W`` contiguous, equal shares, one per
  rank.  Batch norms use global-batch statistics (:func:`course_utils.distributed.sync_batch_norm`),
  metrics are averaged over ranks, and only rank 0 prints and writes checkpoints.  With a loss
  that is a mean over examples (or uses :func:`course_utils.distributed.global_mean` for its
  counts), ``W`` processes compute the weights one process would.  A single process runs the
  one-process code, unchanged.
* **Safe files.**  Checkpoints load with ``torch.load(..., weights_only=True)`` (no arbitrary
  pickles), are written atomically (temporary file + ``os.replace``), and a truncated or foreign
  file raises :class:`CheckpointError` that names the file and says what to do.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import distributed
from .checkpoints import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    optimizer_hparams,
    prune_checkpoints,
    save_checkpoint,
)
from .devices import to_device
from .env import seed_everything
from .history import History
from .loaders import make_loader, rank_loader
from .resources import ResourceMonitor
from .tracking import StepRecorder, Tracker, default_log_dir, weights_sha256

__all__ = ["History", "StepFn", "batch_size_of", "evaluate", "fit"]

#: ``step_fn(model, batch) -> {"loss": scalar tensor, "<component>": scalar tensor, ...}``
StepFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def batch_size_of(batch: Any) -> int:
    """Number of examples in ``batch``, used to weight per-batch averages (a short last batch
    counts less).

    Convention: a tensor's first dimension; a dict's first value; a tuple/list is a batch of
    fields (``(images, targets)``), sized by its first field, where a field that is itself a
    list/tuple (per-image tensors of different sizes) counts by its length; a list of dicts is a
    list of examples.  When this guess is wrong for a batch layout, return the size from
    ``step_fn`` as ``"batch_size"`` (used for weighting, not logged).
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values()))) if batch else 1
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if isinstance(first, torch.Tensor):
            return batch_size_of(first)
        if isinstance(first, (list, tuple)):
            return len(first)
        if isinstance(first, Mapping) and not all(isinstance(b, Mapping) for b in batch):
            return batch_size_of(first)
        return len(batch)
    return 1


def _check_step_output(out: Any, where: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """Validate what ``step_fn`` returned, with a message a student can act on.

    Returns the metrics to log and the ``"batch_size"`` entry if ``step_fn`` gave one.
    """
    if not isinstance(out, Mapping) or "loss" not in out:
        got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(
            f"step_fn must return a dict with a 'loss' entry (plus optional components such "
            f"as 'rpn'), got {got} {where}"
        )
    metrics = {}
    n = out.get("batch_size")
    for k, v in out.items():
        if k == "batch_size":
            continue
        if isinstance(v, torch.Tensor) and v.numel() != 1:
            raise ValueError(
                f"step_fn returned {k!r} with shape {tuple(v.shape)} {where}; every entry must "
                "be a scalar (reduce it with .mean() or .sum())"
            )
        metrics[k] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    return metrics, (int(n) if n is not None else None)


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    step_fn: StepFn,
    train_set: Dataset,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    val_set: Dataset | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    ckpt_dir: str | Path | None = None,
    resume: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    keep_epochs: Iterable[int] | None = None,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[int, History], None] | None = None,
    num_workers: int = 0,
    mixed_precision: bool = False,
    track_dir: str | Path | None = None,
    override_hparams: bool = False,
) -> History:
    """Train ``model`` for ``epochs`` epochs, checkpointing every epoch, and return its History.

    Each step: the batch (a tensor or nested tuple/list/dict of tensors, shapes as produced by
    ``collate_fn``) is moved to ``device``, ``step_fn(model, batch)`` returns a dict of scalar
    tensors (plus, optionally, ``"batch_size"``: see :func:`batch_size_of`), ``out["loss"]`` is
    back-propagated (gradients clipped to ``grad_clip`` in total L2 norm when given) and the
    optimizer steps.  Every other entry of the dict is logged too.  After each
    epoch the same ``step_fn`` runs on ``val_set`` under ``model.eval()`` and ``torch.no_grad()``,
    the scheduler steps once (``ReduceLROnPlateau`` gets the validation loss, or the training
    loss without validation), a line is printed and ``ckpt_dir/epoch_{e:03d}.pt`` is written.

    Args:
        model: the network; moved to ``device``.
        step_fn: ``(model, batch) -> {"loss": scalar, **components}``.
        train_set, val_set: map-style datasets.
        epochs: total number of epochs of the run (not "more epochs"): a resumed run trains
            only the epochs that are missing.
        batch_size: examples per step (under ``torchrun``: the global batch, split evenly over
            the ranks, so it must be a multiple of the world size); the last batch may be
            smaller (under ``torchrun`` it is cut to a multiple of the world size).
        optimizer, scheduler: built by the caller over ``model``'s parameters.
        collate_fn: passed to the DataLoader (e.g. to keep per-image box lists).
        ckpt_dir: where checkpoints go; ``None`` disables checkpointing (and resuming).
        resume: continue from the latest checkpoint in ``ckpt_dir`` if there is one.  With
            ``resume=False`` old checkpoints there are removed and training starts over.
        seed: a fresh run seeds Python, NumPy and torch with it; epoch ``e`` shuffles with a
            generator seeded ``seed + e``.  Same seed, same data, same model init -> same run.
        device: where to train; default the device of the model's parameters.
        keep_epochs: if given, only these epochs' checkpoints (and always the latest) are kept.
            Only the latest keeps the optimizer state (resume needs nothing else); the others
            hold the model, history and RNG states.
        max_steps: stop after this many optimizer steps in this call, mid-epoch and without
            writing a checkpoint: simulates a runtime that disconnected.
        grad_clip: maximum total gradient norm, or ``None`` for no clipping.
        progress: show a ``tqdm`` bar per epoch.
        desc: label of the progress bar and the printed lines.
        on_epoch_end: called as ``on_epoch_end(epoch, history)`` after each checkpoint (on rank 0
            only under ``torchrun``).
        num_workers: processes that load the batches (``0``: the main process).  On a GPU,
            decoding or rendering images in the main process can take longer than the step.  With
            workers the DataLoader shuffles in another order than with ``num_workers=0``
            (measured), so the numbers differ from a main-process run; the same seed and
            ``num_workers`` repeat a run exactly (the course's datasets draw no random numbers).
        mixed_precision: on a CUDA device, run ``step_fn`` under ``torch.autocast`` (float16)
            with a ``GradScaler``: the activations saved for backward take half the memory.
            Ignored elsewhere, so a CPU run is the same with or without it.
        track_dir: also log the run to TensorBoard event files in this folder
            (:class:`course_utils.tracking.Tracker`): the settings and the sha256 of the initial
            weights (so that a run can be repeated), per-step loss and resource use, per-epoch
            metrics.  ``None`` (the default): no log.  Either way the history records, after
            every optimizer step, the process's CPU %, RSS and, on a GPU, its utilisation and
            memory (``history.resources``, Fig. 2.5; :meth:`History.plot_resources`).
        override_hparams: on resume, an optimizer of another class or with other
            hyper-parameters (``lr``, ``betas``, ...) than the checkpoint's raises
            :class:`CheckpointError` listing them; ``True`` continues with the new ones (said).

    Returns:
        The run's :class:`History`, including epochs restored from a checkpoint.

    Note:
        The scheduler steps per epoch, never per batch: use epoch-based schedules (StepLR,
        CosineAnnealingLR with ``T_max=epochs``, ReduceLROnPlateau).  Build and initialise the
        model *before* calling ``fit`` (after ``seed_everything``): ``fit`` re-seeds the global
        RNGs at the start of a fresh run, so only the init is up to the caller.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ValueError("train_set is empty: there is nothing to train on")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if distributed.is_distributed():
        distributed.check_launch(len(train_set), batch_size)  # type: ignore[arg-type]

    device = _resolve_device(model, device)
    model.to(device)
    model = distributed.sync_batch_norm(model, device)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    keep = set(int(e) for e in keep_epochs) if keep_epochs is not None else None
    run_info = {"seed": int(seed), "batch_size": int(batch_size), "epochs": int(epochs)}

    history, start_epoch, hparams = _start_or_resume(
        model, optimizer, scheduler, ckpt_dir, resume, seed, batch_size, epochs, desc, override_hparams
    )
    if start_epoch > epochs:
        return history
    runner = distributed.ddp_runner(model, step_fn, device) if distributed.is_distributed() else None

    scaler = None
    if mixed_precision and device.type == "cuda" and torch.cuda.is_available():
        scaler = torch.amp.GradScaler("cuda")
    steps_left = max_steps
    monitor, tracker = ResourceMonitor(device), None
    track_dir = track_dir if track_dir is not None else default_log_dir(desc)
    if track_dir is not None and distributed.is_main_process():
        tracker = Tracker(track_dir)
        if start_epoch == 1:
            tracker.log_run({**run_info, "world_size": distributed.world_size(), "desc": desc},
                            weights_sha256(model))
    try:
        with distributed.peer_failures_named(desc):
            for epoch in range(start_epoch, epochs + 1):
                t0 = time.perf_counter()
                lr = float(optimizer.param_groups[0]["lr"])
                train_metrics, steps_left = _train_one_epoch(
                    model, step_fn, train_set, optimizer, device,
                    batch_size=batch_size, collate_fn=collate_fn, seed=seed, epoch=epoch,
                    epochs=epochs, grad_clip=grad_clip, steps_left=steps_left,
                    progress=progress, desc=desc, num_workers=num_workers, scaler=scaler, runner=runner,
                    watch=StepRecorder(history, monitor, tracker),
                )
                if train_metrics is None:  # max_steps reached mid-epoch: behave like a crash
                    _say(f"[{desc}] stopped after max_steps={max_steps} optimizer steps in epoch "
                          f"{epoch}; no checkpoint written for it (rerun to resume).")
                    return history
                val_metrics = (
                    evaluate(model, step_fn, val_set, batch_size=batch_size, collate_fn=collate_fn,
                             device=device, num_workers=num_workers)
                    if val_set is not None else None
                )
                _step_scheduler(scheduler, val_metrics or train_metrics)
                history.append(epoch, train_metrics, val_metrics, lr, time.perf_counter() - t0)
                _say(_epoch_line(desc, epoch, epochs, train_metrics, val_metrics, lr, history.wall_s[-1]))
                if tracker is not None:
                    tracker.log_epoch(epoch, train_metrics, val_metrics, lr)

                if ckpt_dir is not None and distributed.is_main_process():
                    save_checkpoint(checkpoint_path(ckpt_dir, epoch), model=model, optimizer=optimizer,
                                    scheduler=scheduler, epoch=epoch, history=history,
                                    extra={"fit": {**run_info, "world_size": distributed.world_size(),
                                                   "optimizer": hparams}})
                    prune_checkpoints(ckpt_dir, keep if keep is not None else set(range(1, epoch + 1)),
                                      latest=epoch)
                distributed.barrier()  # every rank leaves the epoch once its checkpoint is on disk
                if on_epoch_end is not None and distributed.is_main_process():
                    on_epoch_end(epoch, history)
            return history
    finally:
        if tracker is not None:
            tracker.close()


def _say(line: str) -> None:
    """Print on rank 0 only: ``W`` copies of every line would say nothing more."""
    if distributed.is_main_process():
        print(line)


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The requested device, else where the model's parameters already are, else CPU."""
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _start_or_resume(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None, ckpt_dir: Path | None,
    resume: bool, seed: int, batch_size: int, epochs: int, desc: str, override_hparams: bool = False,
) -> tuple[History, int, dict[str, Any]]:
    """Load the latest checkpoint (exact resume) or seed a fresh run.

    Returns the history so far, the first epoch still to train (``> epochs`` when done) and the
    optimizer record the checkpoints of this run hold (:func:`optimizer_hparams`).
    """
    if not resume and ckpt_dir is not None:
        # Stale files from an older run would be picked up by a later resume: remove them.
        stale = list_checkpoints(ckpt_dir)
        if stale:
            _say(f"[{desc}] resume=False: removing {len(stale)} old checkpoint(s) in {ckpt_dir}")
        if distributed.is_main_process():
            for p in stale.values():
                p.unlink(missing_ok=True)
        distributed.barrier()  # on every rank alike: the others must not list before rank 0 is done
    existing = list_checkpoints(ckpt_dir) if resume else {}
    if not existing:
        seed_everything(seed, deterministic=False)
        return History(), 1, optimizer_hparams(optimizer)

    path = existing[max(existing)]
    ckpt = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=True,
                           hparams="override" if override_hparams else "check")
    for note in ckpt["hparam_notes"]:
        _say(f"[{desc}] {path}: {note}")
    done = int(ckpt["epoch"])
    stored = (ckpt.get("extra") or {}).get("fit") or {}
    was = int(stored.get("world_size", 1))
    if was != distributed.world_size():
        _say(f"[{desc}] {path} was written by a run of {was} process(es); continuing with "
             f"{distributed.world_size()} (the global batch of {batch_size} is the same)")
    for key, now in (("seed", seed), ("batch_size", batch_size)):
        if key in stored and stored[key] != now:
            warnings.warn(
                f"{path} was written with {key}={stored[key]} but fit now has {key}={now}; the "
                "resumed run will not match an uninterrupted one.", stacklevel=3,
            )
    history: History = ckpt["history"]
    if done >= epochs:
        extra = f" (it holds {done} epochs, more than the {epochs} asked for)" if done > epochs else ""
        _say(f"[{desc}] already done: loaded {path}{extra}; returning its history without "
              f"training. Delete {ckpt_dir} or pass resume=False to train again.")
        return history, epochs + 1, ckpt["optimizer_hparams"]
    _say(f"[{desc}] resumed from {path}: continuing at epoch {done + 1}/{epochs}")
    return history, done + 1, ckpt["optimizer_hparams"]


def _train_one_epoch(
    model: nn.Module,
    step_fn: StepFn,
    train_set: Dataset,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    seed: int,
    epoch: int,
    epochs: int,
    grad_clip: float | None,
    steps_left: int | None,
    progress: bool,
    desc: str,
    num_workers: int = 0,
    scaler: torch.amp.GradScaler | None = None,
    runner: nn.Module | None = None,
    watch: StepRecorder | None = None,
) -> tuple[dict[str, float] | None, int | None]:
    """One pass over ``train_set``.

    ``runner`` (under ``torchrun``) is the ``DistributedDataParallel`` wrapper of the step; this
    rank then loads its share of each global batch.

    Returns the epoch's batch-size-weighted mean metrics (averaged over ranks; ``None`` if
    ``steps_left`` ran out before the epoch ended) and the remaining step budget.
    """
    from tqdm.auto import tqdm

    model.train()
    if runner is None:
        loader = make_loader(train_set, batch_size, collate_fn, shuffle_seed=seed + epoch,
                              num_workers=num_workers)
        run_step = lambda b: step_fn(model, b)  # noqa: E731
    else:
        loader = rank_loader(train_set, batch_size, collate_fn, seed + epoch, num_workers)
        runner.train()
        run_step = runner
        progress = progress and distributed.is_main_process()
    sums: dict[str, torch.Tensor] = {}
    n_seen = 0
    bar = tqdm(loader, desc=f"{desc} {epoch}/{epochs}", disable=not progress, leave=False)
    # Refreshing the postfix needs .item(), a GPU sync: do it ~20 times an epoch, not every step.
    refresh_every = max(1, len(loader) // 20)
    try:
        for step, batch in enumerate(bar):
            if steps_left is not None and steps_left <= 0:
                return None, 0
            batch = to_device(batch, device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
                out, n = _check_step_output(run_step(batch), f"(epoch {epoch}, step {step})")
            n = n if n is not None else batch_size_of(batch)
            loss = out["loss"]
            if not loss.requires_grad:
                raise RuntimeError(
                    "step_fn's 'loss' does not require grad: it was computed under "
                    "torch.no_grad() or from detached tensors, so nothing can be trained."
                )
            if scaler is None:
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
            else:  # float16 gradients are scaled up so that small ones do not underflow
                scaler.scale(loss).backward()
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
            if steps_left is not None:
                steps_left -= 1
            _accumulate(sums, out, n)
            n_seen += n
            global_step = (epoch - 1) * len(loader) + step + 1
            if watch is not None:
                watch.step(global_step)
            if step % refresh_every == 0:
                running = (sums["loss"] / n_seen).item()
                _check_finite(running, epoch, step)
                bar.set_postfix(loss=f"{running:.4f}")
                if watch is not None:
                    watch.loss(global_step, running)
    finally:
        bar.close()
    metrics = {k: (v / n_seen).item() for k, v in sums.items()}
    metrics = distributed.all_reduce_mean(metrics, n_seen)
    _check_finite(metrics["loss"], epoch, step)
    return metrics, steps_left


def _check_finite(running_loss: float, epoch: int, step: int) -> None:
    """Stop at a NaN/inf loss instead of training on garbage.  Checked only when the running
    loss is read anyway (a check per step would force a GPU sync per step)."""
    if not math.isfinite(running_loss):
        raise FloatingPointError(
            f"the training loss became {running_loss} in epoch {epoch} (by step {step}): lower "
            "the learning rate, set grad_clip, or check the inputs and targets."
        )


def _accumulate(sums: dict[str, torch.Tensor], out: Mapping[str, torch.Tensor], n: int) -> None:
    """Add ``n * value`` of each metric; stays on the device to avoid a sync per step."""
    for k, v in out.items():
        v = v.detach().float() * n
        sums[k] = sums[k] + v.to(sums[k].device) if k in sums else v


@torch.no_grad()
def evaluate(
    model: nn.Module,
    step_fn: StepFn,
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Mean of ``step_fn``'s metrics over ``dataset`` in eval mode (weighted by batch size),
    batches loaded by ``num_workers`` processes (0: the main process).

    The model is put back in training mode afterwards only if it was in it before.  Under
    ``torchrun`` each rank evaluates every ``W``-th example and the means are combined (a set
    smaller than the world size is evaluated whole by every rank).
    """
    device = _resolve_device(model, device)
    w = distributed.world_size()
    sharded = distributed.is_distributed() and len(dataset) >= w  # type: ignore[arg-type]
    if sharded:
        dataset = torch.utils.data.Subset(dataset, range(distributed.rank(), len(dataset), w))  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    n_seen = 0
    try:
        for step, batch in enumerate(make_loader(dataset, batch_size, collate_fn, None, num_workers)):
            batch = to_device(batch, device, non_blocking=True)
            out, n = _check_step_output(step_fn(model, batch), f"(validation step {step})")
            n = n if n is not None else batch_size_of(batch)
            _accumulate(sums, out, n)
            n_seen += n
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise ValueError("the validation set is empty")
    metrics = {k: (v / n_seen).item() for k, v in sums.items()}
    return distributed.all_reduce_mean(metrics, n_seen) if sharded else metrics


def _step_scheduler(scheduler: Any | None, metrics: Mapping[str, float]) -> None:
    """Step once per epoch; ReduceLROnPlateau needs the monitored value."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(metrics["loss"])
    else:
        scheduler.step()


def _epoch_line(
    desc: str,
    epoch: int,
    epochs: int,
    train: Mapping[str, float],
    val: Mapping[str, float] | None,
    lr: float,
    wall_s: float,
) -> str:
    """``[train] epoch 2/10  train loss 0.4123 (rpn 0.2 align 0.2)  val loss ...  lr 1e-03  3.1s``"""

    def fmt(m: Mapping[str, float]) -> str:
        parts = [f"loss {m['loss']:.4f}"]
        comps = [f"{k} {v:.4f}" for k, v in m.items() if k != "loss"]
        return " ".join(parts) + (f" ({' '.join(comps)})" if comps else "")

    line = f"[{desc}] epoch {epoch}/{epochs}  train {fmt(train)}"
    if val:
        line += f"  val {fmt(val)}"
    return line + f"  lr {lr:.2e}  {wall_s:.1f}s"
