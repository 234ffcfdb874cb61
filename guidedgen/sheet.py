"""Contact sheet: mask | unguided | guided | segmenter entropy, one row per sample."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from matplotlib.figure import Figure

from al.plots import save_figure


def contact_sheet(control: np.ndarray, unguided: np.ndarray, guided: np.ndarray, entropy: np.ndarray,
                  captions: list[str], path: Union[str, os.PathLike]) -> None:
    """``control``, ``unguided``, ``guided`` uint8 ``[N, H, W, 3]``; ``entropy`` ``[N, H, W]``."""
    titles = ["mask (control image)", "unguided", "guided", "segmenter entropy (guided)"]
    rows = len(control)
    figure = Figure(figsize=(2.2 * len(titles), 2.3 * rows))
    for r in range(rows):
        for c, panel in enumerate([control[r], unguided[r], guided[r], entropy[r]]):
            axes = figure.add_subplot(rows, len(titles), r * len(titles) + c + 1)
            if c == 3:
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
