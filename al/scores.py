"""Per-pixel acquisition scores as pure tensor functions.

Every score maps ``mc_probs: Tensor[K, N, C, *S]`` -- K stochastic softmax outputs (MC dropout
samples, or ensemble members) of a model's usual ``[N, C, *S]`` prediction -- to a
``Tensor[N, *S]`` where higher means more worth labelling. K = 1 is a deterministic model.

``entropy``, ``margin``, ``bald`` and ``mean_std`` are differentiable, so ``guidedgen.guidance``
reuses them: a score means the same thing when ranking real pixels and when guiding generation.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

# Probabilities are clamped to this before a log, so gradients stay finite at p = 0.
_LOG_EPS = 1e-12
# BalEnt reference constants (jaeohwoo/BalancedEntropy, src/torch_utils.py).
_BETA_FIT_FLOOR = 1e-9
_NAN_MJENT = -99999999999.0
_LN2 = math.log(2.0)
# fp64 elements per BalEnt chunk (K * C * pixels): bounds the scorer's extra memory to ~100 MB.
_BALENT_CHUNK_ELEMENTS = 2**22


def _check_mc(mc_probs: Tensor, min_samples: int = 1) -> None:
    if mc_probs.ndim < 3:
        raise ValueError(
            f"mc_probs must be [K, N, C, *S] (MC samples first, then batch, then classes); "
            f"got shape {tuple(mc_probs.shape)}"
        )
    if mc_probs.shape[0] < min_samples:
        raise ValueError(
            f"this score needs at least {min_samples} MC samples on axis 0, got "
            f"{mc_probs.shape[0]}; raise the number of dropout passes (mc_samples)"
        )


def _entropy_over(probs: Tensor, dim: int) -> Tensor:
    """Shannon entropy (nats) along ``dim``; 0 log 0 = 0 with a finite gradient."""
    return -(probs * probs.clamp_min(_LOG_EPS).log()).sum(dim)


def entropy(mc_probs: Tensor) -> Tensor:
    """Entropy of the mean prediction, ``H[mean_k p_k]``.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    return _entropy_over(mc_probs.mean(0), dim=1)


def margin(mc_probs: Tensor) -> Tensor:
    """One minus the gap between the two most likely classes of the mean prediction.

    Shape: ``[K, N, C, *S] -> [N, *S]``; values in [0, 1], 1 = a tie.
    """
    _check_mc(mc_probs)
    top2 = mc_probs.mean(0).topk(2, dim=1).values  # [N, 2, *S]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def bald(mc_probs: Tensor) -> Tensor:
    """BALD mutual information ``H[mean_k p_k] - mean_k H[p_k]`` (0 for K = 1).

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    expected_entropy = _entropy_over(mc_probs, dim=2).mean(0)  # [N, *S]
    return entropy(mc_probs) - expected_entropy


def mean_std(mc_probs: Tensor) -> Tensor:
    """Mean over classes of the (population) std over samples of each class probability.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    return mc_probs.std(0, correction=0).mean(1)


def power_bald(mc_probs: Tensor, generator: Optional[torch.Generator] = None, beta: float = 1.0) -> Tensor:
    """PowerBALD: ``log BALD + Gumbel / beta``.

    Taking the top n of this equals drawing n pixels without replacement with probability
    proportional to ``BALD ** beta`` (Kirsch et al., stochastic batch acquisition), so a batch is
    diverse instead of n near-copies. ``generator`` must live on ``mc_probs.device``.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    log_bald = bald(mc_probs).clamp_min(_BETA_FIT_FLOOR).log()
    uniform = torch.rand(log_bald.shape, generator=generator, device=log_bald.device, dtype=log_bald.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(_LOG_EPS, 1.0 - 1e-7)))
    return log_bald + gumbel / beta


def random_score(mc_probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform noise in [0, 1): the random-acquisition baseline.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    shape = (mc_probs.shape[1],) + tuple(mc_probs.shape[3:])
    return torch.rand(shape, generator=generator, device=mc_probs.device)


def _balent_terms(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Ent and MJEnt of SPEC section 1 for one chunk, in float64.

    Shape: ``probs [K, C, P] -> (ent [P], mjent [P])``.
    """
    p = probs.double()
    # 1. Moments over the MC axis; unbiased variance as the reference (torch.var default).
    mean = p.mean(0)  # [C, P]
    var = p.var(0, correction=1)
    ent = -torch.xlogy(mean, mean).sum(0)  # [P], 0 log 0 = 0
    m = mean.clamp_min(_BETA_FIT_FLOOR)
    v = var.clamp_min(_BETA_FIT_FLOOR)
    # 2. Beta(alpha, beta) fitted by moments.
    alpha = m * (m * (1.0 - m) / v - 1.0)
    beta = (1.0 / m - 1.0) * alpha
    # 3. Differential entropy of the posterior Beta(alpha + 1, beta); lnB via lgamma.
    a1, ab1 = alpha + 1.0, alpha + beta + 1.0
    h = (
        torch.lgamma(a1) + torch.lgamma(beta) - torch.lgamma(ab1)
        - alpha * torch.digamma(a1)
        - (beta - 1.0) * torch.digamma(beta)
        + (alpha + beta - 1.0) * torch.digamma(ab1)
    )
    weighted = m * h
    weighted = torch.where(weighted > 0, torch.zeros_like(weighted), weighted)  # NaN stays NaN
    # 4. MJEnt; a NaN sum (degenerate Beta fit) ranks last, as in the reference.
    joint = weighted.sum(0)
    joint = torch.where(torch.isnan(joint), torch.full_like(joint, _NAN_MJENT), joint)
    return ent, joint + ent


def _balent_map(mc_probs: Tensor, combine: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Apply ``combine(ent, mjent)`` chunk by chunk over pixels. ``[K,N,C,*S] -> [N,*S]`` (fp64)."""
    _check_mc(mc_probs, min_samples=2)
    k, n, c = mc_probs.shape[:3]
    spatial = tuple(mc_probs.shape[3:])
    flat = mc_probs.reshape(k, n, c, -1)  # [K, N, C, P]
    pixels = flat.shape[-1]
    chunk = max(1, _BALENT_CHUNK_ELEMENTS // (k * c))
    out = torch.empty((n, pixels), dtype=torch.float64, device=mc_probs.device)
    for i in range(n):
        for start in range(0, pixels, chunk):
            ent, mjent = _balent_terms(flat[:, i, :, start:start + chunk])
            out[i, start:start + chunk] = combine(ent, mjent)
    return out.reshape((n,) + spatial)


def _balanced_entropy_ratio(ent: Tensor, mjent: Tensor) -> Tensor:
    return (mjent + _LN2) / (ent + _LN2)


def _balent_acquisition_value(ent: Tensor, mjent: Tensor) -> Tensor:
    # Reference ranking value; the denominator holds Ent twice (once inside MJEnt) on purpose.
    value = (ent + _LN2) / mjent
    return torch.where(value < 0, 1.0 / value, value)


def balanced_entropy(mc_probs: Tensor) -> Tensor:
    """Balanced entropy ``BalEnt = (MJEnt + ln 2) / (Ent + ln 2)`` (Woo, ICLR 2023).

    MJEnt is the marginalised joint entropy of SPEC section 1: each class probability is fitted
    by a Beta distribution (moments over the K samples) and its posterior differential entropy,
    weighted by the mean probability and clipped at 0, is added to the entropy of the mean.
    Computed in float64 chunk by chunk (the Beta terms cancel catastrophically in float32).

    Shape: ``[K, N, C, *S] -> [N, *S]`` float64; needs K >= 2.
    """
    return _balent_map(mc_probs, _balanced_entropy_ratio)


def balent_acquisition(mc_probs: Tensor) -> Tensor:
    """BalEntAcq ranking value, exactly as the reference code computes it.

    ``score = (Ent + ln 2) / MJEnt``; where ``score < 0``, ``score <- 1 / score``; rank largest
    first. A NaN MJEnt was replaced by -1e11, so such pixels rank last.

    Shape: ``[K, N, C, *S] -> [N, *S]`` float64; needs K >= 2.
    """
    return _balent_map(mc_probs, _balent_acquisition_value)


def marginal_confidence(mc_probs: Tensor) -> Tensor:
    """``P_marg``: probability of the most likely class under the mean prediction (a map to
    look at, not an acquisition: high = confident). Shape: ``[K, N, C, *S] -> [N, *S]``."""
    _check_mc(mc_probs)
    return mc_probs.mean(0).amax(1)


ScoreFn = Callable[[Tensor, Optional[torch.Generator]], Tensor]


def _ignores_generator(fn: Callable[[Tensor], Tensor]) -> ScoreFn:
    def score(mc_probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return fn(mc_probs)

    score.__name__ = fn.__name__
    score.__doc__ = fn.__doc__
    return score


# Config name -> score(mc_probs, generator). Deterministic scores ignore the generator.
SCORES: dict[str, ScoreFn] = {
    "balent": _ignores_generator(balent_acquisition),
    "balanced_entropy": _ignores_generator(balanced_entropy),
    "entropy": _ignores_generator(entropy),
    "margin": _ignores_generator(margin),
    "bald": _ignores_generator(bald),
    "mean_std": _ignores_generator(mean_std),
    "power_bald": lambda mc_probs, generator=None: power_bald(mc_probs, generator),
    "random": random_score,
}


def get_score(name: str) -> ScoreFn:
    """Look up a score by config name; an unknown name lists the valid ones."""
    try:
        return SCORES[name]
    except KeyError:
        raise KeyError(f"unknown acquisition score {name!r}; choose one of {sorted(SCORES)}") from None
