"""The per-step loss logs (CSV, one per stage) and the loss-curve figure drawn from them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from al.plots import save_figure


def write_losses(path: Path, losses: list[float], first_step: int = 0, mode: str = "w") -> None:
    with open(path, mode, newline="") as handle:
        writer = csv.writer(handle)
        if mode == "w":
            writer.writerow(["step", "loss"])
        writer.writerows((first_step + i, f"{loss:.6f}") for i, loss in enumerate(losses))


def truncate_losses(path: Path, first_step: int) -> None:
    """Drop logged steps at or after ``first_step`` (they are about to be redone)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) < first_step]))


def plot_losses(output: Path) -> Optional[Path]:
    # A run that reused a finished VAE has no VAE log: draw only the stages this folder logged.
    logged = [(output / name, title) for name, title in (("vae_losses.csv", "VAE"),
                                                        ("losses.csv", "UNet + ControlNet (denoising loss)"))
              if (output / name).exists()]
    if not logged:
        return None
    figure = Figure(figsize=(5 * len(logged), 3.5))
    for axis, (path, title) in zip(np.atleast_1d(figure.subplots(1, len(logged))), logged):
        rows = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        window = max(1, len(rows) // 50)
        smooth = np.convolve(rows[:, 1], np.ones(window) / window, mode="valid")
        axis.plot(rows[:, 0], rows[:, 1], alpha=0.25)
        axis.plot(rows[window - 1:, 0], smooth)
        axis.set(title=title, xlabel="step", ylabel="loss", yscale="log")
    figure.tight_layout()
    save_figure(figure, output / "loss_curve.png")
    return output / "loss_curve.png"
