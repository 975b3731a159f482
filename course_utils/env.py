"""Device choice, seeding and the environment banner printed by every notebook's first cell."""

from __future__ import annotations

import os
import platform
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from . import device_guard
from .profiles import Config, get_config
from .runtimes import expected_runtime


def get_device(prefer: str | None = None) -> torch.device:
    """Return ``prefer`` if given, else CUDA when available, else Apple MPS, else CPU.

    ``$COURSE_DEVICE`` overrides the automatic choice (useful to force ``cpu`` on a GPU box).
    ``virtual-cuda`` switches on :mod:`course_utils.device_guard` and returns ``cuda``: the code
    then runs on the CPU but fails, as on a GPU, wherever it mixes devices.
    """
    prefer = prefer or os.environ.get("COURSE_DEVICE")
    if prefer == device_guard.VIRTUAL_DEVICE_NAME:
        device_guard.activate()
        return torch.device("cuda")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) and return a seeded CPU generator.

    With ``deterministic=True`` cuDNN autotuning is switched off and torch is asked for
    deterministic kernels where they exist (``warn_only`` so that an op without one still runs).
    On CPU the same seed then gives the same numbers, bit for bit.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        # Needed by some cuBLAS kernels to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@dataclass
class NotebookEnv:
    """What a notebook's first cell hands to the rest of the notebook."""

    cfg: Config
    device: torch.device
    seed: int

    @property
    def profile(self) -> str:
        return self.cfg.name


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # pragma: no cover - an optional package that is not installed
        return "not installed"


def _expected(notebook: str, profile: str, device: torch.device) -> str:
    """The banner's run-time line (:func:`course_utils.runtimes.expected_runtime`)."""
    # The virtual CUDA device of the tests computes on the CPU: its times are CPU times.
    kind = "cpu" if device_guard.is_active() else device.type
    try:
        return expected_runtime(notebook, profile, kind)
    except ValueError:  # a name without its two-digit number
        return "not recorded for this notebook"


def setup_notebook(notebook: str, seed: int = 0) -> NotebookEnv:
    """Pick profile and device, seed everything and print one banner with versions.

    Args:
        notebook: the notebook's number and name, e.g. ``"01 anchors and labelling"``.
        seed: the notebook's seed; changing it changes every number downstream.
    """
    cfg = get_config()
    device = get_device()
    seed_everything(seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    import torchvision

    lines = [
        f"notebook : {notebook}",
        f"profile  : {cfg.name}  (to change it, edit COURSE_PROFILE in the set-up cell above and run "
        "the notebook again; outside a notebook, set the environment variable COURSE_PROFILE)",
        f"expected : {_expected(notebook, cfg.name, device)}",
        f"device   : {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""),
        f"seed     : {seed}",
        # the thread count changes the last digits of some trainings: make reproduce pins 1
        f"python   : {platform.python_version()} on {sys.platform}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch thread(s)",
        f"torch    : {torch.__version__}   torchvision: {torchvision.__version__}   "
        f"open_clip: {_version('open_clip_torch')}   segment-anything: {_version('segment-anything')}",
    ]
    print("\n".join(lines))
    return NotebookEnv(cfg=cfg, device=device, seed=seed)
