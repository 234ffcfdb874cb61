"""Per-class statistics of K MC samples, accumulated pass by pass.

Every moment-based score (entropy, margin, BALD, mean-std, BalEnt) needs only sums over the K
samples, so MC inference can fold each softmax into these sums instead of materialising
``[K, N, C, *S]``. BalEnt's variance is a small difference of large sums, so the sums are
*shifted*: they add up ``p_k - p_1`` (the first sample), whose squares are of the order of the
variance itself, and then float32 keeps the variance to about 1e-7 relative. Unshifted float32
sums of ``p_k^2`` would lose it where the variance is far below ``mean^2``; float64 sums
took 1.7-1.9x as long per pass at one thread (2.9 vs 1.5 ms on the DigitScenes Unet's
[32, 11, 64, 64], 49 vs 28 ms on DeepLabV3+'s [2, 19, 512, 512]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Probabilities are clamped to this before a log (as al.scores does), so 0 log 0 = 0.
_LOG_EPS = 1e-12


@dataclass
class MCMoments:
    """Sums over K samples of class probabilities ``p_k`` of a batch ``[N, C, *S]``.

    - ``shift``: the first sample ``p_1``, ``[N, C, *S]``;
    - ``sum_shifted``, ``sum_shifted2``: ``sum_k (p_k - p_1)`` and ``sum_k (p_k - p_1)^2``;
    - ``sum_entropy``: ``sum_k H[p_k]`` (nats), ``[N, *S]`` (BALD's expected entropy).

    All in the samples' dtype; :meth:`mean` and :meth:`variance` return float64.
    """

    count: int
    shift: Tensor
    sum_shifted: Tensor
    sum_shifted2: Tensor
    sum_entropy: Tensor

    @classmethod
    def empty_like(cls, probs: Tensor) -> "MCMoments":
        """No samples yet, for a stream of ``probs``-shaped ``[N, C, *S]`` samples; the first
        :meth:`add` sets the shift."""
        probs = probs.detach()
        return cls(0, torch.empty_like(probs), torch.zeros_like(probs), torch.zeros_like(probs),
                   probs.new_zeros((probs.shape[0],) + tuple(probs.shape[2:])))

    @classmethod
    def of(cls, mc_probs: Tensor) -> "MCMoments":
        """The statistics of a materialised stack. Shape: ``[K, N, C, *S]``."""
        moments = cls.empty_like(mc_probs[0])
        for probs in mc_probs:
            moments.add(probs)
        return moments

    def add(self, probs: Tensor) -> None:
        """Fold one sample ``[N, C, *S]`` into the sums, in place."""
        probs = probs.detach()
        if self.count == 0:
            self.shift.copy_(probs)  # its own deviation is 0: nothing to add to the shifted sums
        else:
            deviation = probs - self.shift
            self.sum_shifted.add_(deviation)
            self.sum_shifted2.addcmul_(deviation, deviation)
        self.sum_entropy.sub_((probs * probs.clamp_min(_LOG_EPS).log()).sum(1))
        self.count += 1

    def map(self, fn) -> "MCMoments":
        """The statistics with ``fn`` applied to each map (``[N, C, *S]``; ``sum_entropy`` as
        ``[N, 1, *S]``). For a linear ``fn`` with non-negative weights summing to 1 (bilinear
        upsampling) the result is the statistics of interpolated samples up to the shift's
        interpolation, and its variance stays >= 0."""
        return MCMoments(self.count, fn(self.shift), fn(self.sum_shifted), fn(self.sum_shifted2),
                         fn(self.sum_entropy[:, None])[:, 0])

    @property
    def shape(self) -> torch.Size:
        """``[K, N, C, *S]``: the shape of the stack these statistics summarise."""
        return torch.Size((self.count,) + tuple(self.shift.shape))

    @property
    def device(self) -> torch.device:
        return self.shift.device

    def mean(self) -> Tensor:
        """``mean_k p_k``, float64 ``[N, C, *S]``."""
        return self.shift.double() + self.sum_shifted.double() / self.count

    def variance(self, correction: int = 1) -> Tensor:
        """``sum_k (p_k - mean)^2 / (K - correction)`` from the sums, float64 ``[N, C, *S]``;
        clamped at 0 (rounding can leave a tiny negative where all samples agree)."""
        if self.count <= correction:
            raise ValueError(f"a variance with correction={correction} needs more than {correction} samples, "
                             f"got {self.count}")
        shifted = self.sum_shifted.double()
        centred = self.sum_shifted2.double() - shifted * shifted / self.count
        return (centred / (self.count - correction)).clamp_min_(0.0)
