"""The record of one training run: per-epoch metrics, learning rate, wall time and resources.

:class:`History` is what :func:`course_utils.train.fit` returns and what every checkpoint carries
(:mod:`course_utils.checkpoints`), so a resumed run continues the same record.  Besides the
per-epoch numbers it keeps one :class:`course_utils.resources.ResourceMonitor` sample per
optimizer step, drawn by :meth:`History.plot_resources` (seed 004, Fig. 2.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .resources import RESOURCE_KEYS

if TYPE_CHECKING:  # matplotlib is imported lazily: training must not need a display
    from matplotlib.axes import Axes

__all__ = ["RESOURCE_SERIES", "History"]

#: The series of :attr:`History.resources`: the optimizer step, then every resource reading.
RESOURCE_SERIES: tuple[str, ...] = ("step", *RESOURCE_KEYS)

# (key, title, y label, upper y limit or None, text when the panel has no data) of Fig. 2.5.
_RESOURCE_PANELS: tuple[tuple[str, str, str, float | None, str], ...] = (
    ("cpu_percent", "CPU utilisation", "% of one core", None, "no data recorded"),
    ("gpu_util", "GPU utilisation", "% of time busy", 105.0, "no GPU in this run"),
    ("rss_gb", "host memory (RSS)", "GB", None, "no data recorded"),
    ("gpu_mem_gb", "GPU memory (allocated)", "GB", None, "no GPU in this run"),
)


@dataclass
class History:
    """Per-epoch records of one training run (epochs are 1-based).

    Attributes:
        epochs: the epoch numbers, ``[1, 2, ...]``.
        train: metric name -> one value per epoch, averaged over the epoch's training batches
            (weighted by batch size).  Always contains ``"loss"``.
        val: the same for the validation set; empty when ``fit`` got no ``val_set``.
        lr: learning rate of the first parameter group during each epoch.
        wall_s: wall-clock seconds of each epoch (training + validation).
        resources: one entry per optimizer step (:meth:`record_resources`): ``"step"`` (the
            optimizer step after which the reading was taken, counted across epochs) and each of
            :data:`course_utils.resources.RESOURCE_KEYS` (seconds, %, GB; NaN where a reading
            could not be had, e.g. the GPU ones on a CPU).  Empty when nothing was recorded.

    ``wall_s`` and ``resources`` are the fields that are not reproducible; compare runs with
    :meth:`numbers`.  ``==`` compares :meth:`to_dict` with NaN equal to NaN, so a history equals
    itself after a round trip through a checkpoint file.
    """

    epochs: list[int] = field(default_factory=list)
    train: dict[str, list[float]] = field(default_factory=dict)
    val: dict[str, list[float]] = field(default_factory=dict)
    lr: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    resources: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.epochs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return _nan_as_none(self.to_dict()) == _nan_as_none(other.to_dict())

    def append(
        self,
        epoch: int,
        train: Mapping[str, float],
        val: Mapping[str, float] | None,
        lr: float,
        wall_s: float,
    ) -> None:
        """Add one epoch's record; a metric missing in some epochs is stored as NaN there."""
        self.epochs.append(int(epoch))
        _append_metrics(self.train, train, len(self.epochs))
        if val:
            _append_metrics(self.val, val, len(self.epochs))
        self.lr.append(float(lr))
        self.wall_s.append(float(wall_s))

    def record_resources(self, step: int, sample: Mapping[str, float]) -> None:
        """Add one resource reading, taken after optimizer step ``step``.

        Args:
            step: the optimizer step just taken, counted across epochs; an int >= 0.
            sample: a :meth:`course_utils.resources.ResourceMonitor.sample`; a key it lacks is
                stored as NaN.

        Raises:
            ValueError: ``step`` is not an int >= 0, or ``sample`` has a key that is not one
                of :data:`course_utils.resources.RESOURCE_KEYS`.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"record_resources: step must be an int >= 0, got {step!r}")
        unknown = sorted(set(sample) - set(RESOURCE_KEYS))
        if unknown:
            raise ValueError(f"record_resources: unknown keys {unknown}; a sample has the keys "
                             f"{list(RESOURCE_KEYS)}")
        if not self.resources:
            self.resources = {key: [] for key in RESOURCE_SERIES}
        self.resources["step"].append(float(step))
        for key in RESOURCE_KEYS:
            self.resources[key].append(float(sample.get(key, math.nan)))

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats, lists and dicts only, so ``torch.load(weights_only=True)`` and
        ``json.dump`` both accept it.  A missing resource reading (NaN) is written as ``None``
        (JSON ``null``): it then compares equal after a round trip through a file."""
        return {
            "epochs": [int(e) for e in self.epochs],
            "train": {k: [float(x) for x in v] for k, v in self.train.items()},
            "val": {k: [float(x) for x in v] for k, v in self.val.items()},
            "lr": [float(x) for x in self.lr],
            "wall_s": [float(x) for x in self.wall_s],
            "resources": {k: [None if math.isnan(x) else float(x) for x in v]
                          for k, v in self.resources.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        """Inverse of :meth:`to_dict`; a dict written before ``resources`` existed has none."""
        return cls(
            epochs=[int(e) for e in d.get("epochs", [])],
            train={k: [float(x) for x in v] for k, v in d.get("train", {}).items()},
            val={k: [float(x) for x in v] for k, v in d.get("val", {}).items()},
            lr=[float(x) for x in d.get("lr", [])],
            wall_s=[float(x) for x in d.get("wall_s", [])],
            resources={k: [math.nan if x is None else float(x) for x in v]
                       for k, v in (d.get("resources") or {}).items()},
        )

    def numbers(self) -> dict[str, Any]:
        """Everything except wall-clock times and resource readings: two runs with the same seed
        give equal dicts."""
        d = self.to_dict()
        del d["wall_s"], d["resources"]
        return d

    def best(self, key: str = "loss", split: str = "val", mode: str = "min") -> tuple[int, float]:
        """Return ``(epoch, value)`` of the best epoch for ``split``'s metric ``key``.

        Falls back to the training metric when no validation was recorded.  ``mode="max"`` for
        metrics where larger is better (precision, recall).
        """
        series = (self.val if split == "val" and self.val else self.train).get(key)
        if not series:
            known = sorted(set(self.train) | set(self.val))
            raise KeyError(f"history has no metric {key!r}; known metrics: {known}")
        values = np.asarray(series, dtype=float)
        i = int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))
        return self.epochs[i], float(values[i])

    def plot(self, keys: Sequence[str] | None = None, ax: Axes | None = None) -> Axes:
        """Plot each metric per epoch: training solid, validation dashed, one colour per key.

        Args:
            keys: metrics to draw; default every training metric (``"loss"`` first).
            ax: axes to draw into; a new figure is made when ``None``.
        """
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        if ax is None:
            _, ax = plt.subplots(figsize=(5.5, 3.5))
        if keys is None:
            keys = sorted(self.train, key=lambda k: (k != "loss", k))
        colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        for i, key in enumerate(keys):
            color = colors[i % len(colors)]
            if key in self.train:
                ax.plot(self.epochs, self.train[key], "-o", ms=3, color=color, label=f"train {key}")
            if key in self.val:
                ax.plot(self.epochs, self.val[key], "--s", ms=3, color=color, label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if list(keys) == ["loss"] else "value")
        # Epochs are integers; fractional ticks would only confuse.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return ax

    def plot_resources(self, axes: Sequence[Axes] | np.ndarray | None = None) -> np.ndarray:
        """Seed 004's Fig. 2.5: CPU %, GPU %, host memory and GPU memory over training time.

        The x axis is minutes since training started.  A run resumed from a checkpoint started a
        new monitor, whose clock restarts at 0: its readings are drawn after the earlier ones
        (the time the run was stopped is left out).  A panel without a single reading (the GPU
        ones on a CPU) says so in its middle instead of staying empty.

        Args:
            axes: four axes to draw into, in the panel order above (any shape, e.g. a 2 x 2
                array); a new 2 x 2 figure is made when ``None``.

        Returns:
            The four axes, a flat ``(4,)`` array in panel order.

        Raises:
            ValueError: the history has no resource records, or ``axes`` are not four.
        """
        import matplotlib.pyplot as plt

        if not self.resources or not self.resources.get("time_s"):
            raise ValueError("this history has no resource records (it was made before fit "
                             "recorded them, or by a loop that does not)")
        if axes is None:
            _, axes = plt.subplots(2, 2, figsize=(9, 5.5), layout="constrained")
        flat = np.asarray(axes, dtype=object).ravel()
        if flat.size != len(_RESOURCE_PANELS):
            raise ValueError(f"plot_resources draws {len(_RESOURCE_PANELS)} panels, got "
                             f"{flat.size} axes")
        minutes = _run_seconds(self.resources["time_s"]) / 60.0
        for ax, (key, title, ylabel, top, empty) in zip(flat, _RESOURCE_PANELS):
            values = np.asarray(self.resources.get(key, [math.nan] * len(minutes)), dtype=float)
            _resource_panel(ax, minutes, values, title, ylabel, top, empty)
        return flat


def _run_seconds(time_s: Sequence[float]) -> np.ndarray:
    """``(N,)`` monitor clocks -> ``(N,)`` seconds of training, continuous across resumes.

    Each resumed run restarts its monitor's clock at 0; a reading earlier than the one before
    it starts a new segment, which is shifted to begin where the previous one ended.
    """
    t = np.asarray(time_s, dtype=float)
    out = t.copy()
    offset = 0.0
    for i in range(1, len(t)):
        if t[i] < t[i - 1]:
            offset = out[i - 1]
        out[i] = t[i] + offset
    return out


def _resource_panel(ax: Axes, minutes: np.ndarray, values: np.ndarray, title: str,
                    ylabel: str, top: float | None, empty: str) -> None:
    """One panel of Fig. 2.5: ``values`` (N,) against ``minutes`` (N,), or ``empty`` centred.

    The y axis starts at 0 and ends at ``top``, else 10 % above the largest value (a flat
    memory curve then sits below the frame, not on it).
    """
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize="medium")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("training time (min)")
    ax.grid(alpha=0.3)
    if not np.isfinite(values).any():
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center",
                color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.plot(minutes, values, "-", lw=1.0)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.set_ylim(0.0, top if top is not None else 1.1 * float(np.nanmax(values)) or 1.0)


def _nan_as_none(obj: Any) -> Any:
    """``obj`` with every float NaN inside dicts and lists replaced by ``None`` (for ``==``)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_as_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_as_none(v) for v in obj]
    return obj


def _append_metrics(store: dict[str, list[float]], new: Mapping[str, float], n: int) -> None:
    """Append ``new`` to ``store`` so that every series has length ``n`` (NaN where absent)."""
    for key in new:
        store.setdefault(key, [math.nan] * (n - 1))
    for key, series in store.items():
        series.append(float(new.get(key, math.nan)))
