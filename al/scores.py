"""Per-pixel acquisition scores as pure tensor functions.

Every score maps K stochastic softmax outputs (MC dropout samples, or ensemble members) of a
model's usual ``[N, C, *S]`` prediction to a ``Tensor[N, *S]`` where higher means more worth
labelling. K = 1 is a deterministic model. The K outputs come either as the simple stack
``mc_probs: Tensor[K, N, C, *S]`` or as streamed :class:`al.moments.MCMoments` (sums accumulated
pass by pass, so the K axis is never built); both give the same scores.

``entropy``, ``margin``, ``bald`` and ``mean_std`` are differentiable on the stack, so
``guidedgen.guidance`` reuses them: a score means the same thing when ranking real pixels and
when guiding generation.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from al.moments import MCMoments
from al.registry import Registry

MCSamples = Union[Tensor, MCMoments]  # [K, N, C, *S] stack, or its streamed sums

# Probabilities are clamped to this before a log, so gradients stay finite at p = 0.
_LOG_EPS = 1e-12
# BalEnt reference constants (jaeohwoo/BalancedEntropy, src/torch_utils.py).
_BETA_FIT_FLOOR = 1e-9
_NAN_MJENT = -99999999999.0
_LN2 = math.log(2.0)
_LN2_REFERENCE = 0.69314718056  # the literal balentacq adds (ln 2 to 11 digits)
# beta_function returns exp(lnB) + 1e-32, so log(B) never drops below ln(1e-32) ~ -73.7 ...
_BETA_FLOOR = 1e-32
_LN_BETA_FLOOR = math.log(_BETA_FLOOR)
# ... and below this lnB, exp(lnB) < 1e-32 * 2**-54 vanishes in the float64 sum: the floor holds
# exactly, so the log/exp pair (slow in float64) only runs where it can change the result.
_LN_BETA_LIVE = math.log(_BETA_FLOOR) - 54 * math.log(2.0)
# float64 elements per BalEnt chunk (C * pixels): keeps the ~15 temporaries in cache-sized pieces.
_BALENT_CHUNK_ELEMENTS = 2**16


def _check_mc(mc: MCSamples, min_samples: int = 1) -> None:
    if len(mc.shape) < 3:
        raise ValueError(
            f"mc_probs must be [K, N, C, *S] (MC samples first, then batch, then classes); "
            f"got shape {tuple(mc.shape)}"
        )
    if mc.shape[0] < min_samples:
        raise ValueError(
            f"this score needs at least {min_samples} MC samples on axis 0, got "
            f"{mc.shape[0]}; raise the number of dropout passes (mc_samples)"
        )


def _entropy_over(probs: Tensor, dim: int) -> Tensor:
    """Shannon entropy (nats) along ``dim``; 0 log 0 = 0 with a finite gradient."""
    return -(probs * probs.clamp_min(_LOG_EPS).log()).sum(dim)


def mean_prediction(mc: MCSamples) -> Tensor:
    """The mean prediction ``mean_k p_k``: ``[N, C, *S]`` (float64 from moments, the stack's dtype otherwise)."""
    return mc.mean() if isinstance(mc, MCMoments) else mc.mean(0)


def entropy(mc_probs: MCSamples) -> Tensor:
    """Entropy of the mean prediction, ``H[mean_k p_k]``.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    return _entropy_over(mean_prediction(mc_probs), dim=1)


def margin(mc_probs: MCSamples) -> Tensor:
    """One minus the gap between the two most likely classes of the mean prediction.

    Shape: ``[K, N, C, *S] -> [N, *S]``; values in [0, 1], 1 = a tie.
    """
    _check_mc(mc_probs)
    top2 = mean_prediction(mc_probs).topk(2, dim=1).values  # [N, 2, *S]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def bald(mc_probs: MCSamples) -> Tensor:
    """BALD mutual information ``H[mean_k p_k] - mean_k H[p_k]`` (0 for K = 1).

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    if isinstance(mc_probs, MCMoments):
        expected_entropy = mc_probs.sum_entropy / mc_probs.count
        return entropy(mc_probs).to(expected_entropy.dtype) - expected_entropy
    expected_entropy = _entropy_over(mc_probs, dim=2).mean(0)  # [N, *S]
    return entropy(mc_probs) - expected_entropy


def mean_std(mc_probs: MCSamples) -> Tensor:
    """Mean over classes of the (population) std over samples of each class probability.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    if isinstance(mc_probs, MCMoments):
        return mc_probs.variance(correction=0).sqrt().mean(1)
    return mc_probs.std(0, correction=0).mean(1)


def power_bald(mc_probs: MCSamples, generator: Optional[torch.Generator] = None, beta: float = 1.0) -> Tensor:
    """PowerBALD: ``log BALD + Gumbel / beta``.

    Taking the top n of this equals drawing n pixels without replacement with probability
    proportional to ``BALD ** beta`` (Kirsch et al., stochastic batch acquisition), so a batch is
    diverse instead of n near-copies. ``generator`` must live on the samples' device.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    log_bald = bald(mc_probs).clamp_min(_BETA_FIT_FLOOR).log()
    uniform = torch.rand(log_bald.shape, generator=generator, device=log_bald.device, dtype=log_bald.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(_LOG_EPS, 1.0 - 1e-7)))
    return log_bald + gumbel / beta


def random_score(mc_probs: MCSamples, generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform noise in [0, 1): the random-acquisition baseline.

    Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    _check_mc(mc_probs)
    shape = (mc_probs.shape[1],) + tuple(mc_probs.shape[3:])
    device = mc_probs.device
    return torch.rand(shape, generator=generator, device=device)


def _balent_terms(mean: Tensor, var: Tensor, floored_beta: bool) -> tuple[Tensor, Tensor]:
    """Ent and MJEnt (docs/methods.md#balanced-entropy) from float64 moments over the MC axis.

    Shape: ``mean, var [C, P] -> (ent [P], mjent [P])``.
    """
    ent = -torch.xlogy(mean, mean).sum(0)  # [P], 0 log 0 = 0
    m = mean.clamp_min(_BETA_FIT_FLOOR)
    v = var.clamp_min(_BETA_FIT_FLOOR)
    # 2. Beta(alpha, beta) fitted by moments, written as the reference does.
    alpha = m * m * (1.0 - m) / v - m
    beta = (1.0 / m - 1.0) * alpha
    # 3. Differential entropy of the posterior Beta(alpha + 1, beta).
    a1, ab1 = alpha + 1.0, alpha + beta + 1.0
    ln_beta = torch.lgamma(a1) + torch.lgamma(beta) - torch.lgamma(ab1)
    if floored_beta:  # the reference's log(exp(lnB) + 1e-32)
        live = ln_beta > _LN_BETA_LIVE
        ln_beta = torch.full_like(ln_beta, _LN_BETA_FLOOR).masked_scatter_(
            live, torch.log(torch.exp(ln_beta[live]) + _BETA_FLOOR))
    h = (
        ln_beta
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


def _stack_moments(probs: Tensor) -> tuple[Tensor, Tensor]:
    """float64 mean and unbiased variance over K of one chunk, by a two-pass sum into
    contiguous buffers (much faster than ``Tensor.var`` over a strided leading axis).

    Shape: ``probs [K, C, P] -> (mean [C, P], var [C, P])``.
    """
    k = probs.shape[0]
    total = torch.zeros(probs.shape[1:], dtype=torch.float64, device=probs.device)
    for sample in probs:
        total.add_(sample)
    mean = total.div_(k)
    squares = torch.zeros_like(mean)
    for sample in probs:
        deviation = sample - mean
        squares.addcmul_(deviation, deviation)
    return mean, squares.div_(k - 1)


def _balent_map(mc: MCSamples, combine: Callable[[Tensor, Tensor], Tensor], floored_beta: bool) -> Tensor:
    """Apply ``combine(ent, mjent)`` chunk by chunk over pixels. ``[K,N,C,*S] -> [N,*S]`` (fp64)."""
    _check_mc(mc, min_samples=2)
    k, n, c = mc.shape[:3]
    spatial = tuple(mc.shape[3:])
    if isinstance(mc, MCMoments):
        mean_all, var_all = mc.mean().reshape(n, c, -1), mc.variance().reshape(n, c, -1)
    else:
        flat = mc.reshape(k, n, c, -1)  # [K, N, C, P]
    pixels = int(math.prod(spatial))
    chunk = max(1, _BALENT_CHUNK_ELEMENTS // c)
    out = torch.empty((n, pixels), dtype=torch.float64, device=mc.device)
    for i in range(n):
        for start in range(0, pixels, chunk):
            window = slice(start, start + chunk)
            if isinstance(mc, MCMoments):
                mean, var = mean_all[i, :, window], var_all[i, :, window]
            else:
                mean, var = _stack_moments(flat[:, i, :, window])
            out[i, window] = combine(*_balent_terms(mean, var, floored_beta))
    return out.reshape((n,) + spatial)


def _balanced_entropy_ratio(ent: Tensor, mjent: Tensor) -> Tensor:
    return (mjent + _LN2) / (ent + _LN2)


def _balent_acquisition_value(ent: Tensor, mjent: Tensor) -> Tensor:
    # balentacq: (Ent + ln 2) / (S + Ent), and S + Ent is MJEnt.
    value = (ent + _LN2_REFERENCE) / mjent
    return torch.where(value < 0, 1.0 / value, value)


def balanced_entropy(mc_probs: MCSamples) -> Tensor:
    """Balanced entropy ``BalEnt = (MJEnt + ln 2) / (Ent + ln 2)`` (Woo, ICLR 2023).

    MJEnt is the marginalised joint entropy (docs/methods.md#balanced-entropy): each class probability is fitted
    by a Beta distribution (moments over the K samples) and its posterior differential entropy,
    weighted by the mean probability and clipped at 0, is added to the entropy of the mean. lnB
    carries the reference code's floor (``log(B + 1e-32)``), as in :func:`balent_acquisition`.
    Computed in float64 chunk by chunk (the Beta terms cancel catastrophically in float32).

    Shape: ``[K, N, C, *S] -> [N, *S]`` float64; needs K >= 2.
    """
    return _balent_map(mc_probs, _balanced_entropy_ratio, floored_beta=True)


def balent_acquisition(mc_probs: MCSamples) -> Tensor:
    """BalEntAcq ranking value, exactly as the reference code computes it (``balentacq`` in
    jaeohwoo/BalancedEntropy ``src/torch_utils.py``), numerical floors included.

    ``score = (Ent + ln 2) / MJEnt``; where ``score < 0``, ``score <- 1 / score``; rank largest
    first. lnB is ``log(exp(lnB) + 1e-32)``, floored at ~-73.7: with MC-dropout samples that
    floor is active on most pixels and decides the ranking (docs/methods.md#the-lnb-floor). A NaN MJEnt was
    replaced by -1e11, so such pixels rank last.

    Shape: ``[K, N, C, *S] -> [N, *S]`` float64; needs K >= 2.
    """
    return _balent_map(mc_probs, _balent_acquisition_value, floored_beta=True)


def balent_acquisition_exact(mc_probs: MCSamples) -> Tensor:
    """:func:`balent_acquisition` with the exact Beta function (lnB by lgamma, no 1e-32 floor).

    The paper's formula rather than its code: on MC-dropout samples it ranks pixels in nearly
    the opposite order to the reference (docs/methods.md#the-lnb-floor). Shape: ``[K, N, C, *S] -> [N, *S]``.
    """
    return _balent_map(mc_probs, _balent_acquisition_value, floored_beta=False)


def marginal_confidence(mc_probs: MCSamples) -> Tensor:
    """``P_marg``: probability of the most likely class under the mean prediction (a map to
    look at, not an acquisition: high = confident). Shape: ``[K, N, C, *S] -> [N, *S]``."""
    _check_mc(mc_probs)
    return mean_prediction(mc_probs).amax(1)


ScoreFn = Callable[[MCSamples, Optional[torch.Generator]], Tensor]


def _ignores_generator(fn: Callable[[MCSamples], Tensor]) -> ScoreFn:
    def score(mc_probs: MCSamples, generator: Optional[torch.Generator] = None) -> Tensor:
        return fn(mc_probs)

    score.__name__ = fn.__name__
    score.__doc__ = fn.__doc__
    return score


# Config name -> score(mc_probs, generator). Deterministic scores ignore the generator. Open:
# register_score("name", fn) makes fn an acquisition of the loop and of config validation.
SCORES: Registry[ScoreFn] = Registry("acquisition score", {
    "balent": _ignores_generator(balent_acquisition),
    "balent_exact": _ignores_generator(balent_acquisition_exact),
    "balanced_entropy": _ignores_generator(balanced_entropy),
    "entropy": _ignores_generator(entropy),
    "margin": _ignores_generator(margin),
    "bald": _ignores_generator(bald),
    "mean_std": _ignores_generator(mean_std),
    "power_bald": lambda mc_probs, generator=None: power_bald(mc_probs, generator),
    "random": random_score,
})
register_score = SCORES.register
