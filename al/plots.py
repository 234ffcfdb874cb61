"""PNG plots: learning curves and uncertainty maps (matplotlib's object API, no global state)."""

from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from al.atomic import atomic_write_bytes


def save_figure(figure: Figure, path: Union[str, os.PathLike]) -> None:
    """Render to PNG and replace ``path`` atomically; processes sharing an output folder (the
    experiment's seeds) may write the same plot at once, so the temporary name is per process."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(Path(path), buffer.getvalue())


def class_colours(num_classes: int) -> np.ndarray:
    """A fixed, distinguishable RGB colour per class id: ``[C, 3]`` in [0, 1]."""
    from matplotlib import colormaps

    table = colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    return np.concatenate([table] * (num_classes // 20 + 1))[:num_classes]


def plot_learning_curves(
    rows: Sequence[Mapping], path: Union[str, os.PathLike], reference: Optional[Mapping[str, float]] = None, title: str = ""
) -> None:
    """mIoU vs labelled pixels, one line (mean +- std over seeds) per acquisition.

    ``rows``: dicts with acquisition, seed, cycle, labelled_pixels, miou. ``reference``: name ->
    mIoU drawn as a horizontal dashed line (e.g. fully supervised).
    """
    grouped: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[row["acquisition"]][int(row["cycle"])].append((float(row["labelled_pixels"]), float(row["miou"])))
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.add_subplot()
    for acquisition, cycles in sorted(grouped.items()):
        order = sorted(cycles)
        x = np.array([np.mean([p for p, _ in cycles[c]]) for c in order])
        values = [[m for _, m in cycles[c]] for c in order]
        mean, std = np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])
        seeds = len(values[0])
        axes.plot(x, 100 * mean, marker="o", label=f"{acquisition} (n={seeds})")
        axes.fill_between(x, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    for name, value in (reference or {}).items():
        axes.axhline(100 * value, linestyle="--", color="black", linewidth=1, label=name)
    axes.set_xlabel("labelled pixels")
    axes.set_ylabel("validation mIoU (%)")
    axes.set_title(title or "Sparse-pixel active learning")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(figure, path)


def plot_uncertainty_maps(
    images: np.ndarray,
    masks: np.ndarray,
    predictions: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: Union[str, os.PathLike],
    num_classes: int,
    ignore_index: int = 255,
) -> None:
    """One row per image: image | ground truth | prediction | one column per map.

    ``images`` uint8 ``[N, H, W, 3]``; ``masks``, ``predictions`` ``[N, H, W]``; each map ``[N, H, W]``
    (or lists of N arrays, one size per row).
    """
    colours = np.concatenate([class_colours(num_classes), [[0.0, 0.0, 0.0]]])
    cmap = ListedColormap(colours)
    titles = ["image", "ground truth", "prediction", *maps]
    rows = len(images)
    figure = Figure(figsize=(1.9 * len(titles), 1.9 * rows))
    for r in range(rows):
        mask = np.where(masks[r] == ignore_index, num_classes, masks[r])
        panels = [images[r], mask, predictions[r], *[m[r] for m in maps.values()]]
        for c, (title, panel) in enumerate(zip(titles, panels)):
            axes = figure.add_subplot(rows, len(titles), r * len(titles) + c + 1)
            if c == 0:
                axes.imshow(panel)
            elif c < 3:
                axes.imshow(panel, cmap=cmap, vmin=0, vmax=num_classes, interpolation="nearest")
            else:
                shown = axes.imshow(panel, cmap="viridis")
                figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)
            axes.set_xticks([])
            axes.set_yticks([])
            if r == 0:
                axes.set_title(title, fontsize=9)
    save_figure(figure, path)
