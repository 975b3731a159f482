"""Where a model lives, and moving what it is given there: the course's one device plumbing.

A notebook puts its models on ``env.device`` (``cuda`` on a Colab GPU) while datasets, cached
embeddings and the tensors a student builds by hand stay on the CPU.  The functions a student
calls therefore move their inputs to the model's device themselves (:func:`module_device`,
:func:`to_device`), and the model-free helpers (probability matrices, metrics) bring their
operands to one device first (:func:`common_device`, :func:`same_device`).  Moving a tensor to
the device it is already on returns the tensor itself, so on the CPU none of this changes a
number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["common_device", "module_device", "same_device", "to_device"]

_CPU = torch.device("cpu")


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else its first buffer; else the CPU).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return _CPU


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move every tensor of ``batch`` (a tensor, or nested tuples, lists and dicts) to ``device``.

    Anything else (strings, ints) passes through.  The copy is blocking unless ``non_blocking``:
    ``train.fit`` moves batches to the GPU without waiting, but a non-blocking copy from the GPU
    to the CPU could be read before it has arrived.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def common_device(*tensors: torch.Tensor | None) -> torch.device:
    """The device a computation on ``tensors`` should run on: the first one that is not the CPU
    (the accelerator holds the big operands), else the CPU.  ``None`` entries are skipped."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            return t.device
    return _CPU


def same_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` moved to their :func:`common_device` (each one unchanged when already there)."""
    device = common_device(*tensors)
    return tuple(t.to(device) for t in tensors)
