"""What one training process uses while it runs: CPU, host memory, GPU utilisation, GPU memory.

Seed 004 (§2.2.2, Fig. 2.5) tracks four curves over its fine-tuning run: CPU utilisation, GPU
utilisation, host memory and GPU memory.  :class:`ResourceMonitor` reads the same four numbers
for *this* process, cheaply enough to be read after every optimizer step::

    monitor = ResourceMonitor(env.device)
    for step, batch in enumerate(loader, start=1):
        ...                                     # forward, backward, optimizer.step()
        history.record_resources(step, monitor.sample())
    history.plot_resources()                    # Fig. 2.5

What each number is (all floats; a reading that cannot be had is NaN, never an exception):

* ``time_s``: seconds since the monitor was created (``time.perf_counter``).
* ``cpu_percent``: CPU time of this process since the previous sample, in % of one core
  (``psutil.Process().cpu_percent(None)``): 100 = one core busy, 200 = two.  Its own threads
  count, its DataLoader worker processes do not.  The kernel counts CPU time in clock ticks
  (10 ms on Linux), so between samples a few ms apart the value jumps by whole ticks (a 20 ms
  step reads 0, 50, 100 % ...); over many steps it averages out.
* ``rss_gb``: resident set size of this process, GB (1e9 bytes).
* ``gpu_util``: % of the last NVML sampling period (1/6 s to 1 s, set by the driver) during
  which a kernel ran on the device: ``torch.cuda.utilization``, which needs the ``pynvml``
  package (``nvidia-ml-py``; Colab has it).  NaN on a CPU device, or when it does not work.
* ``gpu_mem_gb``: memory held by this process's tensors on the device
  (``torch.cuda.memory_allocated``), GB; the caching allocator reserves more.  NaN off CUDA.
"""

from __future__ import annotations

import math
import time

import torch

from . import device_guard

__all__ = ["RESOURCE_KEYS", "ResourceMonitor"]

#: The keys of every :meth:`ResourceMonitor.sample`, in this order.
RESOURCE_KEYS: tuple[str, ...] = ("time_s", "cpu_percent", "rss_gb", "gpu_util", "gpu_mem_gb")

_GB = 1e9


class ResourceMonitor:
    """Sample the current process's resource use; :meth:`sample` returns :data:`RESOURCE_KEYS`.

    Cost: about 50 µs per sample on a CPU device (measured: median of 2,000 samples, 48-51 µs
    over repeats, on a shared 2-core cloud VM, Linux, psutil 7.2.2; psutil's two ``/proc``
    reads, ``cpu_percent`` and ``memory_info``, are almost all of it).  On CUDA the allocator
    counter adds about a microsecond, and the NVML utilisation query (its cost was not measured:
    no GPU) is made at most once per ``gpu_util_every_s``.  NVML itself only refreshes the figure once per
    sampling period (1/6 s to 1 s), so reading it more often would add cost and no information:
    between two queries ``gpu_util`` repeats the last reading.

    Args:
        device: the device the run trains on, e.g. ``env.device``, ``"cpu"``, ``"cuda:0"``.
            ``"cuda"`` without an index means the current CUDA device.
        gpu_util_every_s: the shortest time between two NVML queries, seconds (>= 0; 0 queries
            on every sample).

    Attributes:
        device: the device, as a ``torch.device`` (with an index on CUDA).
        gpu_util_error: why ``gpu_util`` is NaN on a CUDA device (e.g. ``pynvml`` is missing),
            else ``None``.  The first failure switches the query off for the monitor's life.

    Raises:
        TypeError: ``device`` is neither a ``torch.device`` nor a string.
        ValueError: ``device`` is not a valid device name, or names a CUDA device this process
            cannot use.
    """

    def __init__(self, device: torch.device | str, *, gpu_util_every_s: float = 0.2) -> None:
        self.device = _check_device(device)
        if not (isinstance(gpu_util_every_s, (int, float)) and gpu_util_every_s >= 0):
            raise ValueError(f"gpu_util_every_s must be a number >= 0 (seconds), got {gpu_util_every_s!r}")
        self._gpu_every = float(gpu_util_every_s)
        # the course's virtual CUDA device (tests on a CPU machine) has no GPU to read
        self._cuda = self.device.type == "cuda" and not device_guard.is_active()
        self.gpu_util_error: str | None = None if self._cuda else "not a CUDA device"
        self._gpu_util = math.nan
        self._gpu_util_at = -math.inf
        import psutil  # here, not at the top: History imports RESOURCE_KEYS and must stay light

        self._process = psutil.Process()
        # psutil's first cpu_percent(None) has no previous reading and returns 0.0: take it now,
        # so the first sample measures the CPU used since the monitor was created.
        self._process.cpu_percent(None)
        self._t0 = time.perf_counter()

    def __repr__(self) -> str:
        return f"ResourceMonitor(device={str(self.device)!r})"

    def sample(self) -> dict[str, float]:
        """One reading of :data:`RESOURCE_KEYS` (see the module docstring for units)."""
        now = time.perf_counter()
        return {
            "time_s": now - self._t0,
            "cpu_percent": float(self._process.cpu_percent(None)),
            "rss_gb": self._process.memory_info().rss / _GB,
            "gpu_util": self._read_gpu_util(now),
            "gpu_mem_gb": torch.cuda.memory_allocated(self.device) / _GB if self._cuda else math.nan,
        }

    def _read_gpu_util(self, now: float) -> float:
        """``torch.cuda.utilization`` at most every ``gpu_util_every_s``; NaN once it failed."""
        if self.gpu_util_error is not None:
            return math.nan
        if now - self._gpu_util_at >= self._gpu_every:
            try:
                self._gpu_util = float(torch.cuda.utilization(self.device))
            except Exception as exc:  # no pynvml, no NVML driver, a MIG slice, ...: never fatal
                self.gpu_util_error = f"{type(exc).__name__}: {exc}"
                return math.nan
            self._gpu_util_at = now
        return self._gpu_util


def _check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, CUDA with an explicit index, or a clear error."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"ResourceMonitor: device {device!r} is not a device name "
                             "(expected e.g. 'cpu', 'cuda', 'cuda:0')") from exc
    elif not isinstance(device, torch.device):
        raise TypeError(f"ResourceMonitor: device must be a torch.device or a string, "
                        f"got {type(device).__name__} {device!r}")
    if device.type != "cuda" or device_guard.is_active():
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"ResourceMonitor: device {str(device)!r} is CUDA but this process has no "
                         "usable GPU (torch.cuda.is_available() is False); pass env.device")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"ResourceMonitor: device {str(device)!r} does not exist: this process "
                         f"sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)
