"""What each notebook's ``full`` run would cost on a Colab T4, estimated without a GPU.

For every notebook the heavy phases of its ``full`` run are listed with the full profile's own
counts (images, epochs, batch sizes).  Each phase's step is measured here, on the real ``full``
architecture:

* **FLOPs** of the forward pass with ``torch.utils.flop_counter.FlopCounterMode`` (a training
  step counts three forward passes) -- on the ``meta`` device where the model is too large to run on two CPU cores
  (SAM ViT-B's 1024 px encoder), otherwise on a small CPU batch scaled linearly to the profile's;
* **GPU memory** = weights + gradients + optimizer state (Adam 2x, SGD momentum 1x) + the
  activations autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``, at the
  profile's batch size) + :data:`CUDA_CONTEXT_GIB`;
* **host time** per example (rendering or decoding images, SAM's mask post-processing), measured
  on this CPU and divided by the profile's ``loader_workers`` where a DataLoader does it.

T4 time = FLOPs / (:data:`T4_FP32_FLOPS` x :data:`T4_UTILISATION`) + host time.  The utilisation
is an assumption (fp32, no mixed precision), stated in every result; so is everything else here:
the numbers are labelled *estimated* wherever they are shown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: NVIDIA T4: 8.1 TFLOP/s fp32 peak (datasheet), 15 GiB memory.
T4_FP32_FLOPS = 8.1e12
#: NVIDIA T4: 320 GB/s memory bandwidth (datasheet), for memory-bound work.
T4_BANDWIDTH = 320e9
#: Assumed share of the peak a training or inference step reaches in fp32.
T4_UTILISATION = 0.25
#: What the CUDA context and the caching allocator's slack add to the tensors (assumed).
CUDA_CONTEXT_GIB = 0.8
#: The limits a notebook's ``full`` run must fit (Colab T4 session).
LIMITS = {"t4_minutes": 30.0, "gpu_gib": 14.0, "host_gb": 12.0, "disk_gb": 20.0}
GIB = 1024 ** 3


@dataclass
class Phase:
    """One heavy part of a ``full`` run: ``steps`` steps of ``flops_per_step``."""

    name: str
    steps: float
    flops_per_step: float
    gpu_bytes: float = 0.0
    host_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.steps * self.flops_per_step / (T4_FP32_FLOPS * T4_UTILISATION) + self.host_s


@dataclass
class Estimate:
    """A notebook's estimated ``full`` footprint; ``phases`` says where the time goes."""

    notebook: str
    phases: list[Phase] = field(default_factory=list)
    disk_bytes: float = 0.0
    host_bytes: float = 0.0

    def summary(self) -> dict[str, Any]:
        t = sum(p.seconds for p in self.phases)
        gpu = max([p.gpu_bytes for p in self.phases] or [0.0]) / GIB + CUDA_CONTEXT_GIB
        return {"t4_minutes": round(t / 60, 2), "gpu_gib": round(gpu, 2),
                "host_gb": round(self.host_bytes / 1e9, 2), "disk_gb": round(self.disk_bytes / 1e9, 2),
                "phases": [dict(asdict(p), seconds=round(p.seconds, 1)) for p in self.phases],
                "basis": f"estimated: FLOPs counted by torch.utils.flop_counter on the full "
                         f"architectures, T4 fp32 peak {T4_FP32_FLOPS / 1e12:.1f} TFLOP/s at an assumed "
                         f"{T4_UTILISATION:.0%} utilisation, + host time measured on this CPU"}


def step_cost(model: nn.Module, step: Callable[[], torch.Tensor], train: bool) -> tuple[float, float]:
    """``(FLOPs, bytes saved for backward)`` of one call of ``step`` (which returns a loss).

    Only the forward pass is counted, and a training step is taken as three forward passes (the
    backward pass costs about twice the forward): ``FlopCounterMode`` counts the backward of a
    depthwise convolution as if it were dense (MobileNetV2 at 512 px: 64 GFLOPs for a 3.1 GFLOP
    forward), which would make the estimate ten times too slow.
    """
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter:
        if train:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                step()
        else:
            with torch.no_grad():
                step()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) * (3 if train else 1), float(saved[0])


def state_bytes(model: nn.Module, optimizer_moments: int) -> float:
    """Weights + gradients + optimizer moments of the trainable parameters, in bytes."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total + trainable * (1 + optimizer_moments)


def model_bytes(model: nn.Module) -> float:
    """A model-only checkpoint's size: its state dict."""
    return float(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of ``fn()``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def training_phase(name: str, model: nn.Module, step: Callable[[int], torch.Tensor], probe_batch: int,
                   batch: int, examples: float, epochs: float, moments: int,
                   host_s_per_example: float = 0.0, workers: int = 0, float16: bool = False) -> Phase:
    """``epochs`` passes over ``examples`` at ``batch``; ``step(b)`` runs a batch of ``b``.

    ``float16``: the step runs under float16 autocast, which stores the activations it saves for
    backward in half the bytes (counted here in float32; halved, an approximation: a few ops
    such as batch norm keep float32 inputs).  The time is still costed at the fp32 peak.
    """
    flops, saved = step_cost(model, lambda: step(probe_batch), train=True)
    saved = saved / 2 if float16 else saved
    scale = batch / probe_batch
    steps = math.ceil(examples / batch) * epochs
    host = host_s_per_example * examples * epochs / max(1, workers)
    return Phase(name, steps, flops * scale, state_bytes(model, moments) + saved * scale, host)


def inference_phase(name: str, model: nn.Module, step: Callable[[int], Any], probe_batch: int,
                    examples: float, host_s_per_example: float = 0.0, batch: int | None = None) -> Phase:
    """One forward pass over ``examples``, ``batch`` at a time (default ``probe_batch``)."""
    flops, _ = step_cost(model, lambda: step(probe_batch), train=False)
    per_example = flops / probe_batch
    batch = batch or probe_batch
    # Activations of a no-grad forward are freed layer by layer: weights plus ~one layer's output.
    return Phase(name, examples / batch, per_example * batch,
                 sum(p.numel() * p.element_size() for p in model.parameters()),
                 host_s_per_example * examples)


def quadratic_probe(cost: Callable[[int], tuple[float, float]], b1: int, b2: int, batch: int) -> tuple[float, float]:
    """Cost at ``batch`` from probes at ``b1 < b2``, fitting ``a b + c b^2`` to each number.

    Contrastive steps score every image of a batch against every caption, so part of their cost
    grows with the square of the batch; a linear scale-up from a small probe would miss it.
    """
    (f1, s1), (f2, s2) = cost(b1), cost(b2)

    def fit(y1: float, y2: float) -> float:
        c = (y2 / b2 - y1 / b1) / (b2 - b1)
        a = y1 / b1 - c * b1
        return max(0.0, a * batch + c * batch * batch)

    return fit(f1, f2), fit(s1, s2)
