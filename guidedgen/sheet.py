"""Contact sheets: generated samples beside their masks (and real images), and generated sets side by side."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from matplotlib.figure import Figure

from al.plots import save_figure


def contact_sheet(panels: dict[str, np.ndarray], entropy: np.ndarray, captions: list[str],
                  path: Union[str, os.PathLike]) -> None:
    """One row per sample: the ``panels`` (title -> uint8 ``[N, H, W, 3]``), then the segmenter's
    entropy ``[N, H, W]`` on the last of them (the written samples)."""
    titles = [*panels, "segmenter entropy"]
    rows = len(entropy)
    figure = Figure(figsize=(2.2 * len(titles), 2.3 * rows))
    for r in range(rows):
        for c, panel in enumerate([images[r] for images in panels.values()] + [entropy[r]]):
            axes = figure.add_subplot(rows, len(titles), r * len(titles) + c + 1)
            if c == len(panels):
                shown = axes.imshow(panel, cmap="magma", vmin=0)
                figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)
            else:
                axes.imshow(panel)
            axes.set_xticks([])
            axes.set_yticks([])
            if r == 0:
                axes.set_title(titles[c], fontsize=9)
            if c == 0:
                axes.set_ylabel(captions[r], fontsize=7)
    save_figure(figure, path)


def sets_sheet(masks: np.ndarray, images: dict[str, np.ndarray], num_classes: int,
               path: Union[str, os.PathLike]) -> None:
    """The same masks drawn by several generated sets: the masks on the top row, then one row per
    set. ``masks`` int ``[N, H, W]`` (values >= ``num_classes`` are unlabelled, shown white);
    ``images`` name -> float ``[N, 3, H, W]`` in [0, 1]."""
    rows, count = 1 + len(images), len(masks)
    figure = Figure(figsize=(1.2 * count + 1.2, 1.25 * rows))
    shown_masks = np.ma.masked_greater_equal(masks, num_classes)
    panels = [("masks", [(m, dict(cmap="tab10", vmin=0, vmax=9, interpolation="nearest")) for m in shown_masks])]
    panels += [(name, [(np.asarray(i).transpose(1, 2, 0).clip(0, 1), {}) for i in set_images])
               for name, set_images in images.items()]
    for r, (name, row) in enumerate(panels):
        for c, (panel, style) in enumerate(row):
            axes = figure.add_subplot(rows, count, r * count + c + 1)
            axes.imshow(panel, **style)
            axes.set_xticks([])
            axes.set_yticks([])
            if c == 0:
                axes.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    save_figure(figure, path)
