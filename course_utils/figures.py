"""Figure helpers: one folder for every figure, and the drawing routines notebooks share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle


def figures_dir() -> Path:
    """``$COURSE_FIGURES``, else the checkout's ``figures/`` folder, else ``./figures``.

    A notebook's kernel runs in ``solutions/`` or ``notebooks/``; without the checkout rule every
    folder of notebooks would grow its own ``figures/``.  Created on demand.
    """
    env = os.environ.get("COURSE_FIGURES")
    checkout = Path(__file__).resolve().parents[1]
    if env:
        path = Path(env)
    elif (checkout / "solutions").is_dir():
        path = checkout / "figures"
    else:  # installed as a package (Colab without a clone, pip): next to the notebook
        path = Path("figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def savefig(fig: plt.Figure, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` and return the path.

    ``name`` should start with the notebook number (``"01_anchor_grid"``) so the folder reads in
    course order.
    """
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(3, H, W)`` float tensor in [0, 1] or ``(H, W, 3)`` array -> ``(H, W, 3)`` array for imshow."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    return image


def draw_boxes(ax: plt.Axes, boxes: torch.Tensor | np.ndarray, color: str | Sequence[str] = "yellow",
               linewidth: float = 1.2, linestyle: str = "-", labels: Sequence[str] | None = None,
               alpha: float = 1.0) -> None:
    """Draw ``(N, 4)`` boxes ``(x1, y1, x2, y2)`` on ``ax``; ``color`` may be one per box."""
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes).reshape(-1, 4)
    colors = [color] * len(boxes) if isinstance(color, str) else list(color)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colors[i],
                               linewidth=linewidth, linestyle=linestyle, alpha=alpha))
        if labels is not None:
            ax.text(x1, y1 - 1, labels[i], color=colors[i], fontsize=7, va="bottom")


def show_image(ax: plt.Axes, image: torch.Tensor | np.ndarray, title: str | None = None) -> None:
    """``imshow`` without ticks, with an optional (wrapped) title."""
    ax.imshow(to_numpy_image(image))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, wrap=True)


def image_grid(n: int, ncols: int = 4, size: float = 2.6) -> tuple[plt.Figure, np.ndarray]:
    """A figure with ``n`` image axes in rows of ``ncols``; unused axes are hidden."""
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat[:n]
