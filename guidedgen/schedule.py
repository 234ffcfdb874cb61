"""Which denoising steps are guided, how strongly, and how the gradient is normalised."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

NORMALISATIONS = ("rms", "none")


@dataclass
class GuidanceSchedule:
    """Guide steps with index in ``[start * T, end * T)`` and every ``every``-th step of them.

    ``strength`` scales the normalised step on the latent: with ``normalize="rms"`` the update
    has root-mean-square ``strength * sqrt(1 - alpha_bar_t)`` per element, whatever the
    objective's scale; the noise-level factor keeps late steps, where little noise is left to
    hide a change, from overshooting. The strength is per guided step: with ``every=k``, k times
    the strength gives about the same total push from k times fewer steps (and decoder passes).
    ``decay="linear"`` ramps the strength down to 0 at ``end``.
    """

    strength: float = 0.0
    start: float = 0.0
    end: float = 0.8
    every: int = 1
    normalize: str = "rms"
    clip: Optional[float] = None  # max |element| of the update, after normalisation and strength
    decay: str = "constant"

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"guidance window must satisfy 0 <= start <= end <= 1, got [{self.start}, {self.end})")
        if self.every < 1:
            raise ValueError(f"guidance every={self.every}; must be >= 1")
        if self.normalize not in NORMALISATIONS:
            raise ValueError(f"guidance normalize={self.normalize!r}; choose one of {NORMALISATIONS}")
        if self.decay not in ("constant", "linear"):
            raise ValueError(f"guidance decay={self.decay!r}; choose 'constant' or 'linear'")
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"guidance.strength={self.strength}; must be a finite number >= 0 (0 = unguided)")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"guidance clip={self.clip}; must be null (no clipping) or a finite number > 0")

    def _window(self, num_steps: int) -> tuple[int, int]:
        return round(self.start * num_steps), round(self.end * num_steps)

    def is_guided(self, step: int, num_steps: int) -> bool:
        first, stop = self._window(num_steps)
        return self.strength > 0 and first <= step < stop and (step - first) % self.every == 0

    def strength_at(self, step: int, num_steps: int) -> float:
        if self.decay == "constant":
            return self.strength
        first, stop = self._window(num_steps)
        return self.strength * (stop - step) / max(1, stop - first)

    def update(self, gradient: Tensor, step: int, num_steps: int, noise_level: float = 1.0,
               region: Optional[Tensor] = None) -> Tensor:
        """The latent update for a raw gradient ``[N, ...]`` (per-sample normalisation);
        ``noise_level`` is ``sqrt(1 - alpha_bar_t)`` of the step. With ``region`` (1 where the
        latents are generated, broadcastable to the gradient, which is 0 elsewhere) the RMS is taken
        over the region, so a regenerated object gets the per-element step of a whole image."""
        if self.normalize == "rms":
            squares = gradient.flatten(1).square()
            mean = squares.mean(1) if region is None else squares.sum(1) / region.expand_as(gradient).flatten(1).sum(1).clamp_min(1)
            rms = mean.sqrt().clamp_min(1e-12)
            gradient = gradient / rms.view(-1, *([1] * (gradient.ndim - 1))) * noise_level
        update = self.strength_at(step, num_steps) * gradient
        if self.clip is not None:
            update = update.clamp(-self.clip, self.clip)
        return update
