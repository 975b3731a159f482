"""A virtual CUDA device on a CPU-only machine: catches device bugs without a GPU.

Code that runs on a laptop can still break on a Colab GPU: a model moved to ``cuda`` receives an
image straight from the dataset, which is on the CPU, and PyTorch stops with "Expected all
tensors to be on the same device".  This module lets the course find such bugs where there is
no GPU at all.  Inside :func:`virtual_cuda` (or after :func:`activate`):

* ``torch.device("cuda")`` works as a device: ``x.to("cuda")``, ``x.cuda()``, ``model.to("cuda")``
  and ``torch.zeros(3, device="cuda")`` really compute on the CPU, but the tensors they make are
  *marked* as living on the virtual GPU; ``x.device`` then reports ``cuda:0``;
  (``x.is_cuda`` stays False: PyTorch's own modules read it to pick CUDA kernels);
* every result of an operation on marked tensors is marked too (autograd's gradients included),
  and ``.cpu()`` / ``.to("cpu")`` give unmarked copies, exactly as on a real GPU;
* an operation that mixes a marked tensor with an unmarked one (other than a 0-d scalar, which
  PyTorch allows, or an index tensor on the CPU) raises :class:`DeviceMismatchError`, naming the
  operation, both tensors and the first line of course or notebook code on the call stack;
* ``.numpy()`` of a marked tensor raises as it does on a GPU.

The numbers are the CPU's, so a notebook runs to the end as on the CPU, only slower (every
operation passes through Python); in eval mode ``nn.MultiheadAttention`` skips its fused CPU
kernel under a torch-function mode, so attention outputs can differ in their last bits.  ``COURSE_DEVICE=virtual-cuda`` makes
:func:`course_utils.env.get_device` switch the guard on and return ``cuda``: ``make test`` runs
every solution notebook that way.

Usage::

    with virtual_cuda():
        model = Detector(...).to("cuda")
        model.search(image_on_cpu)   # raises DeviceMismatchError unless search moves the image
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["DeviceMismatchError", "VIRTUAL_DEVICE_NAME", "activate", "deactivate", "is_active", "is_on_virtual_cuda",
           "virtual_cuda"]

#: The value of ``COURSE_DEVICE`` that switches the guard on.
VIRTUAL_DEVICE_NAME = "virtual-cuda"

_MARK = "_course_virtual_cuda"
_CUDA0 = torch.device("cuda", 0)
_Tensor = torch.Tensor
# Property accessors arrive in the mode as fresh method-wrappers: compare them with ==.
_DEVICE_GET, _DATA_SET = _Tensor.device.__get__, _Tensor.data.__set__


class DeviceMismatchError(RuntimeError):
    """An operation mixed tensors of the (virtual) GPU and of the CPU."""


def is_on_virtual_cuda(t: torch.Tensor) -> bool:
    """Whether ``t`` is marked as living on the virtual GPU."""
    return bool(t.__dict__.get(_MARK, False)) if isinstance(t, _Tensor) else False


def _mark(t: Any, on: bool) -> None:
    if isinstance(t, _Tensor):
        t.__dict__[_MARK] = on


def _target(device: Any) -> bool | None:
    """True for a CUDA device, False for the CPU, None when ``device`` is None."""
    if device is None:
        return None
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        return True
    if dev.type == "cpu":
        return False
    raise DeviceMismatchError(f"device guard: only cpu and (virtual) cuda are emulated, got {dev}")


def _where() -> str:
    """The innermost frame of the call stack outside torch and this module."""
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path != here and not path.startswith(torch_dir) and "site-packages" not in path:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "(no course code on the stack)"


def _describe(t: torch.Tensor) -> str:
    return f"{'cuda:0' if is_on_virtual_cuda(t) else 'cpu'} {t.dtype} tensor of shape {tuple(t.shape)}"


def _name(func: Callable[..., Any]) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if qual == "__get__" or qual == "__set__":
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        return f"Tensor.{owner}.{qual}"
    if "_VariableFunctions" in qual:
        return f"torch.{func.__name__}"
    if "TensorBase" in qual or qual.startswith("Tensor."):
        return f"Tensor.{func.__name__}"
    return f"{module}.{qual}" if module else qual


# Methods whose tensor arguments may legitimately sit on different devices.
_CROSS_DEVICE_OK = {"copy_", "to", "cuda", "cpu", "__set__", "__get__", "__repr__", "__format__",
                    "__str__", "item", "tolist", "numel", "size", "dim", "__len__", "__reduce_ex__",
                    "__deepcopy__", "__setstate__", "share_memory_", "pin_memory",
                    "_has_compatible_shallow_copy_type",
                    # lengths must be a CPU tensor, whatever the device of the data
                    "_pack_padded_sequence"}
# Recurrent ops over a PackedSequence read its batch_sizes, which PyTorch keeps on the CPU.
_PACKED_OPS = {"gru", "lstm", "rnn_tanh", "rnn_relu", "_pad_packed_sequence"}
# Methods that must not run on a GPU tensor without .cpu() first.
_HOST_ONLY = {"numpy", "__array__"}
# Indexing: the indexed tensor may be on the GPU with CPU indices (PyTorch moves them).
_INDEXING = {"__getitem__", "__setitem__"}


class _VirtualCudaMode(TorchFunctionMode):
    """The torch-function mode that marks, propagates and checks (see the module docstring)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if func == _DEVICE_GET:
            return _CUDA0 if is_on_virtual_cuda(args[0]) else func(*args, **kwargs)
        if name == "get_device" and isinstance(args[0], _Tensor):
            return 0 if is_on_virtual_cuda(args[0]) else -1
        if func == _DATA_SET:
            out = func(*args, **kwargs)
            _mark(args[0], is_on_virtual_cuda(args[1]))
            return out
        if name in ("to", "cuda", "cpu") and args and isinstance(args[0], _Tensor):
            return self._move(func, name, args, kwargs)
        if name in _HOST_ONLY and is_on_virtual_cuda(args[0]):
            raise DeviceMismatchError(
                f"device guard: {name}() of a {_describe(args[0])}: a GPU tensor must be moved "
                f"with .cpu() first (at {_where()})")
        target = None
        if "device" in kwargs:
            target = _target(kwargs["device"])
            if target is not None:
                kwargs["device"] = "cpu"
        on_gpu = self._check(func, name, args, kwargs, target) if name not in _CROSS_DEVICE_OK else None
        out = func(*args, **kwargs)
        if target is None:
            target = on_gpu if on_gpu is not None else any(
                is_on_virtual_cuda(t) for t in tree_leaves((args, kwargs)))
        if name == "_pack_padded_sequence":  # (data on the input's device, batch_sizes on the CPU)
            _mark(out[0], is_on_virtual_cuda(args[0]))
            _mark(out[1], False)
            return out
        # In-place results keep the argument's device; a fresh result follows the inputs.
        for t in tree_leaves(out):
            if isinstance(t, _Tensor) and not (t is (args[0] if args else None) and name.endswith("_")):
                _mark(t, target)
        return out

    @staticmethod
    def _move(func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """``to`` / ``cuda`` / ``cpu``: compute on the CPU, copy when the virtual device changes."""
        src = args[0]
        if name == "cuda":
            want, dtype, non_blocking = True, None, bool(kwargs.get("non_blocking", False))
            copy, fmt = False, torch.preserve_format
        elif name == "cpu":
            want, dtype, non_blocking, copy, fmt = False, None, False, False, torch.preserve_format
        else:
            rest, kw = args[1:], dict(kwargs)
            copy = bool(kw.pop("copy", False))
            if rest and isinstance(rest[0], _Tensor):
                want = is_on_virtual_cuda(rest[0])
            dev, dtype, non_blocking, fmt = torch._C._nn._parse_to(*rest, **kw)
            if not (rest and isinstance(rest[0], _Tensor)):
                want = _target(dev)
            fmt = fmt if fmt is not None else torch.preserve_format
        here = is_on_virtual_cuda(src)
        if want is None:
            want = here
        out = _Tensor.to(src, "cpu", dtype=dtype, non_blocking=non_blocking,
                         copy=copy or want != here, memory_format=fmt)
        if out is not src:
            _mark(out, want)
        return out

    @staticmethod
    def _check(func: Callable[..., Any], name: str, args: tuple, kwargs: dict,
               target: bool | None) -> bool | None:
        """Raise on mixed devices; return the inputs' device (None: no tensor input)."""
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, _Tensor)]
        if name in _PACKED_OPS:
            leaves = [t for t in leaves if is_on_virtual_cuda(t) or t.dtype != torch.int64]
        if name in _INDEXING and args and isinstance(args[0], _Tensor):
            base = is_on_virtual_cuda(args[0])
            index_leaves = [t for t in tree_leaves(args[1:2]) if isinstance(t, _Tensor)]
            bad = [t for t in index_leaves if is_on_virtual_cuda(t) and not base]
            values = [t for t in tree_leaves(args[2:]) if isinstance(t, _Tensor)
                      and is_on_virtual_cuda(t) != base and (t.dim() > 0 or not base)]
            if bad or values:
                raise DeviceMismatchError(
                    f"device guard: {name} of a {_describe(args[0])} with a "
                    f"{_describe((bad or values)[0])} (at {_where()})")
            return base
        if not leaves:
            on_gpu = None
        elif target is not None and name.endswith("_like"):
            return target  # zeros_like(x, device=...) changes device on purpose
        else:
            big = {is_on_virtual_cuda(t) for t in leaves if t.dim() > 0}
            # PyTorch lets a 0-d CPU tensor join a GPU operation, not the other way round.
            if len(big) > 1 or (big == {False} and any(is_on_virtual_cuda(t) for t in leaves)):
                gpu = next(t for t in leaves if is_on_virtual_cuda(t))
                cpu = next(t for t in leaves if t.dim() > 0 and not is_on_virtual_cuda(t))
                raise DeviceMismatchError(
                    f"device guard: {_name(func)} got a {_describe(gpu)} and a {_describe(cpu)}; "
                    f"move the cpu one with .to(device) (at {_where()})")
            on_gpu = big.pop() if big else any(is_on_virtual_cuda(t) for t in leaves)
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and gen.device.type == "cpu" and (target or on_gpu):
            raise DeviceMismatchError(
                f"device guard: {_name(func)} draws GPU numbers from a CPU torch.Generator; "
                f"create the generator with device=... or draw on the CPU and move (at {_where()})")
        return on_gpu


_state: dict[str, Any] = {"mode": None, "patches": []}


def _patch(obj: Any, attr: str, new: Any) -> None:
    _state["patches"].append((obj, attr, getattr(obj, attr)))
    setattr(obj, attr, new)


def _install_patches() -> None:
    """What the mode cannot see: Parameter construction, torch.load onto cuda, CUDA statistics."""
    param_new = torch.nn.Parameter.__new__

    def parameter_new(cls: type, data: torch.Tensor | None = None, requires_grad: bool = True) -> Any:
        p = param_new(cls, data, requires_grad)
        _mark(p, data is not None and is_on_virtual_cuda(data))
        return p

    _patch(torch.nn.Parameter, "__new__", staticmethod(parameter_new))
    torch_load = torch.load

    def load(f: Any, map_location: Any = None, *a: Any, **kw: Any) -> Any:
        on_gpu = isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "cuda"
        obj = torch_load(f, "cpu" if on_gpu else map_location, *a, **kw)
        if on_gpu:
            for t in tree_leaves(obj):
                _mark(t, True)
        return obj

    _patch(torch, "load", load)
    _patch(torch.cuda, "get_device_name", lambda *a, **k: "virtual CUDA device (course_utils.device_guard)")
    for stat in ("max_memory_allocated", "memory_allocated", "max_memory_reserved", "memory_reserved"):
        _patch(torch.cuda, stat, lambda *a, **k: 0)
    for noop in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        _patch(torch.cuda, noop, lambda *a, **k: None)


def is_active() -> bool:
    """True while the guard is on (a ``cuda`` device is then the virtual one: no GPU to query)."""
    return _state["mode"] is not None


def activate() -> None:
    """Switch the guard on for the rest of the process (a notebook kernel); idempotent."""
    if _state["mode"] is not None:
        return
    _install_patches()
    mode = _VirtualCudaMode()
    mode.__enter__()
    _state["mode"] = mode


def deactivate() -> None:
    """Switch the guard off and undo its patches."""
    mode = _state["mode"]
    if mode is None:
        return
    mode.__exit__(*sys.exc_info())
    for obj, attr, old in reversed(_state["patches"]):
        setattr(obj, attr, old)
    _state.update(mode=None, patches=[])


@contextlib.contextmanager
def virtual_cuda() -> Iterator[torch.device]:
    """Run the block with the guard on; yields the device to use, ``torch.device("cuda")``."""
    already = _state["mode"] is not None
    activate()
    try:
        yield torch.device("cuda")
    finally:
        if not already:
            deactivate()
