"""Per-class statistics of K MC samples, accumulated pass by pass.

Every moment-based score (entropy, margin, BALD, mean-std, BalEnt) needs only sums over the K
samples, so MC inference can fold each softmax into these sums instead of materialising
``[K, N, C, *S]``. The sums are float64: BalEnt's variance is a small difference of large sums,
and where the Beta fit is ill-conditioned BalEnt amplifies its rounding by orders of magnitude.
Float32 sums shifted by the first sample were 1.7-1.9x cheaper per pass, but put BalEnt 2.6e-4
(relative) off the stack's value (float64 sums: 5e-11), so they were taken out again.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

# Probabilities are clamped to this before a log (as al.scores does), so 0 log 0 = 0.
_LOG_EPS = 1e-12


def _sums_over_samples(probs: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_k p_k`` and ``sum_k p_k^2`` in float64; the copy is squared in place (in ``al.mc``
    these run on cache-sized blocks, where every extra tensor is another sweep)."""
    p = probs.detach().to(torch.float64, copy=True)  # a copy even in float64: squared in place
    return p.sum(0), p.square_().sum(0)


def sums_of_probs(probs: Tensor, class_dim: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The three sums of :class:`MCMoments` over K samples: ``sum_p``, ``sum_p2`` (float64) and
    ``sum_entropy`` (in ``probs``' dtype, ``p log p`` with ``p`` floored at ``_LOG_EPS`` in the log).

    Shape: ``[K, C, *S] -> (sum_p [C, *S], sum_p2 [C, *S], sum_entropy [*S])``; ``class_dim``
    names the class axis when others come before it (``[K, N, C, *S]``: 2).
    """
    entropy = probs.clamp_min(_LOG_EPS).log_().mul_(probs).sum((0, class_dim)).neg_()
    return *_sums_over_samples(probs), entropy


def sums_of_logits(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sums_of_probs` of the samples' softmax over classes. Shape: ``[K, C, *S]``.

    From logits the entropy needs no log of a probability: with ``y = z - max_c z`` and
    ``s = sum_c exp(y)``, ``H = log s - sum_c p_c y_c``, a sum of two non-negative terms (no
    cancellation, ``0 log 0 = 0`` exactly). It differs from the floored ``p log p`` only where
    some ``p < _LOG_EPS``, by less than ``_LOG_EPS`` a class. The softmax is spelt out to reuse
    ``y`` and ``s``: 12% cheaper a block than ``softmax`` + ``sums_of_probs``.
    """
    shifted = logits - logits.amax(1, keepdim=True)
    probs = shifted.exp()
    total = probs.sum(1, keepdim=True)
    probs.div_(total)
    entropy = total.log_().sum((0, 1)).sub_(shifted.mul_(probs).sum((0, 1)))
    return *_sums_over_samples(probs), entropy


@dataclass
class MCMoments:
    """Sums over K samples of class probabilities ``p_k`` of a batch ``[N, C, *S]``.

    - ``sum_p``, ``sum_p2``: ``sum_k p_k`` and ``sum_k p_k^2``, float64 ``[N, C, *S]``;
    - ``sum_entropy``: ``sum_k H[p_k]`` (nats), ``[N, *S]`` in the input's dtype (BALD's
      expected entropy).
    """

    count: int
    sum_p: Tensor
    sum_p2: Tensor
    sum_entropy: Tensor

    @classmethod
    def empty_like(cls, probs: Tensor) -> "MCMoments":
        """No samples yet, for a stream of ``probs``-shaped ``[N, C, *S]`` samples."""
        zeros = torch.zeros(probs.shape, dtype=torch.float64, device=probs.device)
        return cls(0, zeros, zeros.clone(), probs.new_zeros((probs.shape[0],) + tuple(probs.shape[2:])))

    @classmethod
    def of(cls, mc_probs: Tensor) -> "MCMoments":
        """The statistics of a materialised stack. Shape: ``[K, N, C, *S]``."""
        moments = cls.empty_like(mc_probs[0])
        for probs in mc_probs:
            moments.add(probs)
        return moments

    def add(self, probs: Tensor) -> None:
        """Fold one sample ``[N, C, *S]`` into the sums, in place."""
        for total, value in zip((self.sum_p, self.sum_p2, self.sum_entropy), sums_of_probs(probs[None], class_dim=2)):
            total.add_(value)
        self.count += 1

    def map(self, fn) -> "MCMoments":
        """The statistics with ``fn`` applied to each map (``[N, C, *S]``; ``sum_entropy`` as
        ``[N, 1, *S]``). For a linear ``fn`` with non-negative weights summing to 1 (bilinear
        upsampling) the variance stays >= 0 (Jensen: the map of p^2 bounds the square of the map)."""
        return MCMoments(self.count, fn(self.sum_p), fn(self.sum_p2), fn(self.sum_entropy[:, None])[:, 0])

    @property
    def shape(self) -> torch.Size:
        """``[K, N, C, *S]``: the shape of the stack these statistics summarise."""
        return torch.Size((self.count,) + tuple(self.sum_p.shape))

    @property
    def device(self) -> torch.device:
        return self.sum_p.device

    def mean(self) -> Tensor:
        """``mean_k p_k``, float64 ``[N, C, *S]``."""
        return self.sum_p / self.count

    def variance(self, correction: int = 1) -> Tensor:
        """``sum_k (p_k - mean)^2 / (K - correction)`` from the sums, float64 ``[N, C, *S]``;
        clamped at 0 (rounding can leave a tiny negative where all samples agree)."""
        if self.count <= correction:
            raise ValueError(f"a variance with correction={correction} needs more than {correction} samples, "
                             f"got {self.count}")
        centred = self.sum_p2 - self.sum_p * self.sum_p / self.count
        return (centred / (self.count - correction)).clamp_min_(0.0)
