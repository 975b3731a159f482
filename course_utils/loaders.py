"""The batches of an epoch, for :func:`course_utils.train.fit`: one process, or one rank's share.

* :func:`make_loader` -- the one-process DataLoader, whose shuffling order depends on its seed
  alone (``seed + epoch`` in ``fit``: exact resume needs nothing else);
* :func:`shuffled_order` -- that order, read from the same loader;
* :class:`RankShares`, :func:`rank_loader` -- under ``torchrun``, each global batch of that order
  cut into one contiguous, equal share per rank, so that ``W`` processes see the batches one
  process sees.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed

__all__ = ["WORKER_START_METHOD", "RankShares", "make_loader", "rank_loader", "shuffled_order", "worker_context"]

#: How DataLoader workers start.  A notebook's kernel runs threads (ipykernel's I/O and control
#: threads, torch's OpenMP pool); a worker forked from it inherits whatever lock one of them held
#: at that instant and can wait on it forever.  ``forkserver`` forks every worker from a server
#: process that has no other thread (Python 3.14's default on Linux for the same reason); the
#: dataset and ``collate_fn`` reach the workers pickled, so they must be importable objects.
WORKER_START_METHOD = "forkserver"


def worker_context(num_workers: int) -> Any:
    """The multiprocessing context of a DataLoader with ``num_workers`` workers (``None`` for 0).

    The server imports torch and ``course_utils`` once, so that each worker it forks starts
    without importing them again.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return None
    multiprocessing.set_forkserver_preload(["torch", "course_utils.loaders"])
    return multiprocessing.get_context(WORKER_START_METHOD)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    shuffle_seed: int | None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose order, with ``shuffle_seed``, depends on it alone.

    The sampler draws the order in the main process from its own generator, so worker processes
    (``num_workers > 0``) change only who loads each batch, not which examples it holds.
    """
    generator = None
    if shuffle_seed is not None:
        generator = torch.Generator()
        generator.manual_seed(shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle_seed is not None,
                      generator=generator, collate_fn=collate_fn, num_workers=num_workers,
                      multiprocessing_context=worker_context(num_workers))


def shuffled_order(n: int, shuffle_seed: int) -> list[int]:
    """The order in which :func:`make_loader` visits ``n`` examples for ``shuffle_seed``.

    Read from the same loader, iterated through the same progress bar as
    :func:`course_utils.train.fit`, so that the order of a run split over ranks is the one-process
    order by construction: each iterator the loader makes draws its workers' seed from the
    shuffling generator first, and ``tqdm.auto`` makes one in advance.
    """
    from tqdm.auto import tqdm

    (order,) = tqdm(make_loader(range(n), max(n, 1), None, shuffle_seed), disable=True)  # type: ignore[arg-type]
    return order.tolist()


class RankShares(torch.utils.data.Sampler):
    """This rank's share of each global batch: the one-process batches of an epoch, each cut into
    ``world`` contiguous, equal shares (the last batch first cut to a multiple of ``world``)."""

    def __init__(self, order: list[int], batch_size: int, rank: int, world: int):
        self.order, self.batch_size, self.rank, self.world = order, batch_size, rank, world

    def __iter__(self):
        for s in range(0, len(self.order), self.batch_size):
            chunk = self.order[s:s + self.batch_size]
            share = len(chunk) // self.world
            if share:
                yield chunk[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        full, rest = divmod(len(self.order), self.batch_size)
        return full + (1 if rest >= self.world else 0)


def rank_loader(dataset: Dataset, batch_size: int, collate_fn: Callable[[list[Any]], Any] | None,
                 shuffle_seed: int, num_workers: int = 0) -> DataLoader:
    """The DataLoader of one rank under ``torchrun``: :class:`RankShares` of the epoch's order.

    It gets a generator of its own: a loader without one draws its workers' seed from the global
    RNG, which the one-process loader does not touch, and the ranks' global RNGs must stay in
    step with it (:func:`course_utils.distributed.example_generators` draws from them).
    """
    order = shuffled_order(len(dataset), shuffle_seed)  # type: ignore[arg-type]
    shares = RankShares(order, batch_size, distributed.rank(), distributed.world_size())
    return DataLoader(dataset, batch_sampler=shares, collate_fn=collate_fn, num_workers=num_workers,
                      generator=torch.Generator(), multiprocessing_context=worker_context(num_workers))
