"""The record of one training run: per-epoch metrics, learning rate and wall time.

:class:`History` is what :func:`course_utils.train.fit` returns and what every checkpoint carries
(:mod:`course_utils.checkpoints`), so a resumed run continues the same record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported lazily: training must not need a display
    from matplotlib.axes import Axes

__all__ = ["History"]


@dataclass
class History:
    """Per-epoch records of one training run (epochs are 1-based).

    Attributes:
        epochs: the epoch numbers, ``[1, 2, ...]``.
        train: metric name -> one value per epoch, averaged over the epoch's training batches
            (weighted by batch size).  Always contains ``"loss"``.
        val: the same for the validation set; empty when ``fit`` got no ``val_set``.
        lr: learning rate of the first parameter group during each epoch.
        wall_s: wall-clock seconds of each epoch (training + validation).  This is the only
            field that is not reproducible; compare runs with :meth:`numbers`.
    """

    epochs: list[int] = field(default_factory=list)
    train: dict[str, list[float]] = field(default_factory=dict)
    val: dict[str, list[float]] = field(default_factory=dict)
    lr: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epochs)

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

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats, lists and dicts only, so ``torch.load(weights_only=True)`` and
        ``json.dump`` both accept it."""
        return {
            "epochs": [int(e) for e in self.epochs],
            "train": {k: [float(x) for x in v] for k, v in self.train.items()},
            "val": {k: [float(x) for x in v] for k, v in self.val.items()},
            "lr": [float(x) for x in self.lr],
            "wall_s": [float(x) for x in self.wall_s],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        """Inverse of :meth:`to_dict`."""
        return cls(
            epochs=[int(e) for e in d.get("epochs", [])],
            train={k: [float(x) for x in v] for k, v in d.get("train", {}).items()},
            val={k: [float(x) for x in v] for k, v in d.get("val", {}).items()},
            lr=[float(x) for x in d.get("lr", [])],
            wall_s=[float(x) for x in d.get("wall_s", [])],
        )

    def numbers(self) -> dict[str, Any]:
        """Everything except wall-clock times: two runs with the same seed give equal dicts."""
        d = self.to_dict()
        del d["wall_s"]
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


def _append_metrics(store: dict[str, list[float]], new: Mapping[str, float], n: int) -> None:
    """Append ``new`` to ``store`` so that every series has length ``n`` (NaN where absent)."""
    for key in new:
        store.setdefault(key, [math.nan] * (n - 1))
    for key, series in store.items():
        series.append(float(new.get(key, math.nan)))
