"""Several processes, one run: what ``train.fit`` needs from ``torch.distributed``.

A run launched by ``torchrun --nproc_per_node=N`` has ``N`` processes (ranks), each with its own
copy of the model and its own share of every batch.  This module is the one place that knows
about them:

* :func:`init_from_env` -- join the process group ``torchrun`` describes (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``...), NCCL on CUDA and gloo on the CPU, with a timeout so that
  a rank that died makes the others fail instead of waiting for ever;
* :func:`rank`, :func:`world_size`, :func:`is_main_process`, :func:`is_distributed` -- who am I;
  only the main process (rank 0) prints progress and writes files;
* :func:`global_count`, :func:`global_mean` -- a loss normalised by a count over the *whole*
  global batch (the number of sampled anchors, of positive boxes), so that the gradient averaged
  over ranks is the gradient of one process holding the whole batch (DETR all-reduces its number
  of boxes for the same reason);
* :func:`example_generators` -- one random generator per example, seeded by its place in the
  global batch, so per-example random choices do not depend on how many processes share it;
* :func:`all_gather_rows` -- every rank's rows of a tensor, differentiable, for losses that
  compare each example with every other one of the global batch (CLIP's contrastive loss);
* :func:`sync_batch_norm` -- batch statistics over the global batch: ``torch.nn.SyncBatchNorm``
  on CUDA, :class:`GlobalBatchNorm` (all-reduced sums) with gloo, where torch's has no kernel;
* :func:`all_reduce_mean` -- metrics averaged over ranks for the printed lines and the history.

In a single process every function is the identity of the one-process computation: nothing here
changes a number of a run that ``torchrun`` did not start.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedError",
    "example_generators",
    "GlobalBatchNorm",
    "all_gather_rows",
    "all_reduce_mean",
    "StepModule",
    "barrier",
    "check_launch",
    "ddp_runner",
    "global_count",
    "global_mean",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "main_process_first",
    "peer_failures_named",
    "rank",
    "shutdown",
    "sync_batch_norm",
    "world_size",
]

#: Seconds a collective waits for the other ranks before it fails (``COURSE_DIST_TIMEOUT``
#: overrides).  Long enough for a slow first batch, short enough that a dead rank is noticed.
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A multi-process run cannot start or go on (bad launch, a rank that failed, a timeout)."""


def is_distributed() -> bool:
    """True in a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes of the run (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the one process that prints progress and writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (``torchrun`` sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("COURSE_DIST_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"COURSE_DIST_TIMEOUT={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise DistributedError(f"COURSE_DIST_TIMEOUT={raw!r}: must be > 0 seconds")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: torch.device | str | None = None) -> torch.device:
    """Join the process group described by ``torchrun``'s environment; return this rank's device.

    Outside ``torchrun`` (no ``WORLD_SIZE``/``RANK``) nothing happens and ``device`` (default: a
    GPU if there is one, else the CPU) is returned.  Under ``torchrun`` each rank takes GPU
    ``LOCAL_RANK`` and NCCL when CUDA is there, else the CPU and gloo.

    Raises:
        DistributedError: the environment is incomplete or inconsistent, or the group cannot be
            formed within the timeout.
    """
    want = torch.device(device) if device is not None else None
    if want is not None and want.type == "cuda" and not torch.cuda.is_available():
        raise DistributedError(f"device {device!r} was asked for, but torch sees no GPU on this machine")
    if not launched_by_torchrun():
        return want if want is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", r))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                               f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                               f"{os.environ.get('LOCAL_RANK')!r}") from None
    if not 0 <= r < w:
        raise DistributedError(f"RANK={r} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={w})")
    use_cuda = torch.cuda.is_available() and (want is None or want.type == "cuda")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but this machine has "
                                   f"{torch.cuda.device_count()} GPU(s): start at most that many "
                                   "processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_timeout())
        except Exception as e:  # noqa: BLE001 - re-raised with what to check
            raise DistributedError(
                f"rank {r}/{w}: could not join the process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({e}); "
                "start every rank with torchrun, on one free port") from e
    return dev


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group (at the end of a command-line run).

    ``wait_for_peers`` (after a run that succeeded on this rank) first waits until every rank is
    done, so that no rank closes its connections while another still talks over them, then frees
    what still holds the group (a finished ``DistributedDataParallel`` waiting for the garbage
    collector) while Python is fully alive: a gloo group that is torn down later, during the
    interpreter's own exit, can abort the process after its work is done.  After a failure there
    is no waiting: the other ranks may be stuck in a collective this rank will never join.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            with contextlib.suppress(RuntimeError):  # a peer that died is reported by torchrun
                dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


#: What gloo and NCCL say when another rank died or stopped answering.
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                 "Timeout", "NCCL communicator was aborted", "Broken pipe")


@contextlib.contextmanager
def peer_failures_named(what: str) -> Iterator[None]:
    """Turn a collective's failure caused by another rank into one :class:`DistributedError`.

    When one rank raises, the others are waiting in a gradient average or a barrier; gloo then
    reports a closed connection, NCCL a timeout, neither says which process failed or why.  This
    names the run and the rank and points to the failing process's own message.
    """
    try:
        yield
    except RuntimeError as e:
        if is_distributed() and not isinstance(e, DistributedError) and any(p in str(e) for p in _PEER_FAILURE):
            raise DistributedError(
                f"rank {rank()}/{world_size()} ({what}): another process of this run failed or "
                f"stopped answering, so this one stops too; that process's own error says why "
                f"(from {type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        raise


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Let rank 0 run the block first (building a cache), then the other ranks (reading it).

    Only rank 0 writes: the block must write only where :func:`is_main_process` allows, or
    find its files already written when the others run it.
    """
    if is_main_process():
        yield
        barrier()
    else:
        barrier()
        yield


def global_count(n: int | float | torch.Tensor) -> float:
    """``n`` summed over ranks, as a float (``float(n)`` in a single process)."""
    if not is_distributed():
        return float(n)
    t = torch.tensor([float(n)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def global_mean(local_mean: torch.Tensor, local_count: int | float | torch.Tensor) -> torch.Tensor:
    """A rank's mean over its ``local_count`` items, rescaled so that training computes the mean
    over the whole global batch; ``local_mean`` itself in a single process.

    ``DistributedDataParallel`` *averages* the ranks' gradients, which equals the gradient of
    the global mean only when every rank averages over the same number of items.  Counts such as
    sampled anchors or positive boxes differ from image to image, so each rank returns
    ``local_mean * local_count * W / N`` with ``N`` the count summed over the ``W`` ranks:
    ``mean_r(local_sum_r * W / N) = sum_r(local_sum_r) / N``.  The rescaled values, averaged
    over ranks for the printed lines, are the global mean too.
    """
    if not is_distributed():
        return local_mean
    n = max(global_count(local_count), 1.0)
    return local_mean * (float(local_count) * world_size() / n)


def example_generators(n: int) -> list[torch.Generator]:
    """One CPU generator per example of this rank's share of a batch (``n`` examples).

    Seeded from one draw of the global torch RNG (the same on every rank: they are seeded alike
    and restore the same checkpoint) plus the example's position in the *global* batch (rank
    ``r`` holds positions ``r*n ... r*n + n - 1``: ``fit`` splits each global batch into
    contiguous, equal shares).  Random choices made per example (the RPN's anchor sampling) are
    then the same whether one process or several hold the batch.
    """
    if n < 0:
        raise ValueError(f"example_generators: n must be >= 0, got {n}")
    base = int(torch.randint(0, 2**62, (1,)).item())
    offset = rank() * n
    return [torch.Generator().manual_seed(base + offset + i) for i in range(n)]


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order: ``(B_r, ...) -> (sum B_r, ...)``.

    Differentiable: the gradient of each rank's rows comes back to that rank, summed over the
    ranks.  Each rank then computes the same loss of the whole global batch, and DDP's average of
    ``W`` identical contributions is the one-process gradient.  Every rank must pass the same
    number of rows (``fit`` splits each global batch evenly).  A single process gets ``x`` back.
    """
    if not is_distributed():
        return x
    return _GatherRows.apply(x)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated; backward: the sum over ranks of the gradient of the
    whole, of which each rank keeps its own rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        r = rank()
        return g[r * ctx.rows:(r + 1) * ctx.rows]


def all_reduce_mean(values: Mapping[str, float], weight: float) -> dict[str, float]:
    """Weighted mean of per-rank ``values`` over ranks (``weight`` = this rank's example count)."""
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}


class _SumOverRanks(torch.autograd.Function):
    """``sum_r x_r`` on every rank, differentiable: each rank's output feeds its own loss, so the
    gradient of ``x_r`` is the sum over ranks of the outputs' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation with statistics over every rank's share of the batch (gloo, CPU).

    ``torch.nn.SyncBatchNorm`` has kernels for GPUs only.  This layer all-reduces the per-channel
    sums ``sum x`` and ``sum x^2`` and the count (differentiably), so that a batch split over
    ranks is normalised as the whole batch would be; running statistics are updated as
    ``BatchNorm`` does (unbiased variance).  Outside training, or in a single process, it is a
    plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), n_local])
        stats = _SumOverRanks.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp(min=1)) * m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``BatchNorm*d`` of ``model`` by one with global-batch statistics.

    CUDA: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.  CPU (gloo):
    :class:`GlobalBatchNorm`, with the same weights and running statistics.  Returns the model
    (changed in place where possible); a single process gets it back unchanged.
    """
    if not is_distributed():
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_global_bn(model)


def _convert_global_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=None, dtype=None)
        # the same Parameter objects: the optimizer, built before fit, holds these
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_global_bn(child))
    return module


def check_launch(n_examples: int, batch_size: int) -> None:
    """Refuse, on every rank alike, a launch that cannot split the data evenly.

    Every rank runs the same checks on the same numbers, so all of them raise the same error
    before the first collective call instead of one rank waiting for the others.
    """
    w, n = world_size(), int(n_examples)
    if n < w:
        raise DistributedError(
            f"rank {rank()}: the training set has {n} examples but the run has {w} "
            f"processes; every process needs at least one example: start at most {n} processes")
    if batch_size % w:
        raise DistributedError(
            f"rank {rank()}: batch_size={batch_size} (the global batch) cannot be split "
            f"evenly over {w} processes; use a multiple of {w}")


class StepModule(nn.Module):
    """``step_fn(model, batch)`` as a module's forward.

    ``DistributedDataParallel`` prepares its gradient averaging in ``forward``; a ``step_fn``
    calls whatever methods of the model it needs (``encode_image``, ``rpn``...), so the whole
    step runs inside this forward and DDP sees every parameter it uses.
    """

    def __init__(self, model: nn.Module, step_fn: Callable):
        super().__init__()
        self.model = model
        self.step_fn = step_fn

    def forward(self, batch: Any) -> Mapping[str, torch.Tensor]:
        return self.step_fn(self.model, batch)


def ddp_runner(model: nn.Module, step_fn: Callable, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over :class:`StepModule` (``fit``'s model and step); rank 0's
    weights are broadcast to the others."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(StepModule(model, step_fn), device_ids=ids)
