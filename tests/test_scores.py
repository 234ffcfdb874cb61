"""Scores: BalEnt against an independent float64 SciPy computation, baselines against numpy,
and properties every registered score must have."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import betaln, digamma, logsumexp

from al import scores
from al.select import top_n


def reference_balent(p: np.ndarray, ddof: int = 1, clip: bool = True, floored: bool = True):
    """docs/methods.md#balanced-entropy in float64 numpy/scipy.
    p: [K, C, P] -> (balent, acquisition) each [P].
    ``floored`` is the reference code's lnB = log(B + 1e-32) (``floored=False``: exact lnB).
    ``ddof=0`` and ``clip=False`` reproduce known wrong ports (docs/methods.md#balanced-entropy)."""
    k = p.shape[0]
    with np.errstate(all="ignore"):
        mean_exact = np.exp(logsumexp(np.log(p), axis=0) - math.log(k))  # [C, P]
        var = np.var(p, axis=0, ddof=ddof)
        m = np.maximum(mean_exact, 1e-9)
        v = np.maximum(var, 1e-9)
        alpha = m * (m * (1 - m) / v - 1)
        beta = (1 / m - 1) * alpha
        ln_beta = betaln(alpha + 1, beta)
        if floored:
            ln_beta = np.logaddexp(ln_beta, np.log(1e-32))
        h = (ln_beta - alpha * digamma(alpha + 1) - (beta - 1) * digamma(beta)
             + (alpha + beta - 1) * digamma(alpha + beta + 1))
        term = m * h
        if clip:
            term[term > 0] = 0
        ent = -np.sum(np.where(mean_exact > 0, mean_exact * np.log(mean_exact), 0.0), axis=0)
        joint = term.sum(0)
        joint[np.isnan(joint)] = -99999999999
        mjent = joint + ent
        balent = (mjent + np.log(2)) / (ent + np.log(2))
        acq = (ent + 0.69314718056) / mjent
        acq[acq < 0] = 1 / acq[acq < 0]
    return balent, acq


def as_mc(p: np.ndarray) -> torch.Tensor:
    """[K, C, P] -> [K, 1, C, P] (one image, P pixels along a 1-D spatial axis)."""
    return torch.from_numpy(p).float().unsqueeze(1)


def dirichlet_samples(rng, k, c, pixels, concentration):
    """Per-pixel MC samples around a random mean; low concentration = high disagreement."""
    base = rng.dirichlet(np.ones(c), size=pixels)  # [P, C]
    samples = np.stack([np.stack([rng.dirichlet(concentration * b + 1e-3) for b in base]) for _ in range(k)])
    return samples.transpose(0, 2, 1)  # [K, C, P]


def mc_like_samples(rng, k=20, c=11, pixels=400, noise=0.1):
    """Last-layer MC dropout in miniature: ``softmax(logits + noise * N(0, 1))``, K draws around
    one logit vector per pixel, so the per-class variance is small. [K, C, P]"""
    logits = rng.normal(size=(1, c, pixels)) * rng.uniform(0.5, 4.0, size=(1, 1, pixels))
    noisy = logits + noise * rng.normal(size=(k, c, pixels))
    return np.exp(noisy - logsumexp(noisy, axis=1, keepdims=True))


def edge_cases(k=4, c=5):
    """[K, C, 5]: one-hot, uniform, tiny variance, a class with zero mean, contradictory one-hots."""
    one_hot = np.zeros((k, c, 1)); one_hot[:, 2] = 1
    uniform = np.full((k, c, 1), 1.0 / c)
    base = np.zeros(c); base[:5] = [0.6, 0.2, 0.1, 0.05, 0.05]
    tiny_var = np.tile(base[None, :, None], (k, 1, 1))
    tiny_var[0, 0, 0] += 1e-7; tiny_var[0, 1, 0] -= 1e-7
    base = np.zeros(c); base[:3] = [0.5, 0.3, 0.2]
    zero_class = np.tile(base[None, :, None], (k, 1, 1))
    zero_class[:, 0, 0] += np.linspace(-0.1, 0.1, k); zero_class[:, 1, 0] -= np.linspace(-0.1, 0.1, k)
    flip = np.zeros((k, c, 1)); flip[: k // 2, 0] = 1; flip[k // 2:, 1] = 1
    return np.concatenate([one_hot, uniform, tiny_var, zero_class, flip], axis=2).astype(np.float32)


@pytest.mark.parametrize("k,c,concentration", [(20, 19, 3.0), (2, 5, 1.0), (10, 11, 50.0), (5, 3, 0.3)])
def test_balent_matches_independent_float64_scipy(k, c, concentration):
    rng = np.random.default_rng(k * 100 + c)
    p = dirichlet_samples(rng, k, c, 200, concentration).astype(np.float32)
    expected_balent, expected_acq = reference_balent(p.astype(np.float64))
    np.testing.assert_allclose(scores.balanced_entropy(as_mc(p))[0].numpy(), expected_balent, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(scores.balent_acquisition(as_mc(p))[0].numpy(), expected_acq, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("noise", [0.1, 0.5])
@pytest.mark.parametrize("floored", [True, False])
def test_balent_on_mc_like_inputs_matches_independent_float64_scipy(floored, noise):
    """Small-variance inputs, where the 1e-32 floor is active on most classes and decides the
    ranking: values and the top pixels must match, for the reference and the exact form."""
    p = mc_like_samples(np.random.default_rng(11), noise=noise).astype(np.float32)
    _, expected = reference_balent(p.astype(np.float64), floored=floored)
    ours = (scores.balent_acquisition if floored else scores.balent_acquisition_exact)(as_mc(p))[0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    top = 20
    assert set(np.argsort(-ours, kind="stable")[:top]) == set(np.argsort(-expected, kind="stable")[:top])


def test_floor_reverses_the_ranking_on_mc_like_inputs():
    """docs/methods.md#the-lnb-floor: with MC-dropout-like samples the floored (reference) and
    exact lnB rank pixels in nearly opposite orders, so the two must stay distinct scores."""
    from scipy.stats import spearmanr

    mc = as_mc(mc_like_samples(np.random.default_rng(5)).astype(np.float32))
    floored, exact = scores.balent_acquisition(mc)[0].numpy(), scores.balent_acquisition_exact(mc)[0].numpy()
    assert spearmanr(floored, exact)[0] < -0.8
    # generic high-disagreement samples: the floor never binds and the two coincide
    generic = as_mc(dirichlet_samples(np.random.default_rng(5), 20, 11, 200, 1.0).astype(np.float32))
    np.testing.assert_allclose(scores.balent_acquisition(generic), scores.balent_acquisition_exact(generic), rtol=1e-9)


def test_balent_edge_cases_match_reference():
    p = edge_cases()
    expected_balent, expected_acq = reference_balent(p.astype(np.float64))
    np.testing.assert_allclose(scores.balanced_entropy(as_mc(p))[0].numpy(), expected_balent, rtol=1e-6)
    np.testing.assert_allclose(scores.balent_acquisition(as_mc(p))[0].numpy(), expected_acq, rtol=1e-6)


def test_balent_top_n_picks_the_same_pixels_as_the_reference():
    rng = np.random.default_rng(7)
    p = np.concatenate([dirichlet_samples(rng, 20, 11, 16 * 16 - 5, 2.0), edge_cases(k=20, c=11)], axis=2)
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    _, expected = reference_balent(p.astype(np.float64))
    ours = scores.balent_acquisition(as_mc(p).reshape(20, 1, 11, 16, 16))[0]
    picked = top_n(ours, torch.ones(16, 16, dtype=torch.bool), 7)
    expected_flat = set(np.argsort(-expected, kind="stable")[:7].tolist())
    assert {int(r) * 16 + int(c) for r, c in picked} == expected_flat


def test_balent_known_wrong_ports_are_caught():
    """The comparison above would fail for each known wrong port (docs/methods.md#balanced-entropy)."""
    rng = np.random.default_rng(3)
    p = dirichlet_samples(rng, 8, 4, 100, 2.0)
    ours = scores.balent_acquisition(as_mc(p.astype(np.float32)))[0].numpy()
    for wrong in (reference_balent(p, ddof=0)[1], reference_balent(p, clip=False)[1]):
        assert not np.allclose(ours, wrong, rtol=1e-3)
    mc_like = mc_like_samples(np.random.default_rng(3)).astype(np.float32)  # where the 1e-32 floor binds
    floored = scores.balent_acquisition(as_mc(mc_like))[0].numpy()
    assert not np.allclose(floored, reference_balent(mc_like.astype(np.float64), floored=False)[1], rtol=1e-3)
    log_probs = np.log(np.clip(p, 1e-30, None)).astype(np.float32)
    assert not np.allclose(ours, scores.balent_acquisition(as_mc(log_probs))[0].numpy(), rtol=1e-3, equal_nan=True)


@pytest.mark.parametrize("name", sorted(scores.SCORES))
def test_streamed_moments_give_the_same_scores_as_the_stack(name):
    """Scores on MCMoments (K never materialised) equal the scores on the [K, N, C, *S] stack."""
    from al.moments import MCMoments

    mc = torch.from_numpy(np.stack([mc_like_samples(np.random.default_rng(i), k=6, c=5, pixels=30, noise=0.5)
                                    for i in range(2)], axis=1).astype(np.float32)).reshape(6, 2, 5, 5, 6)
    stacked = scores.SCORES[name](mc, torch.Generator().manual_seed(4))
    streamed = scores.SCORES[name](MCMoments.of(mc), torch.Generator().manual_seed(4))
    assert streamed.shape == stacked.shape
    # float32 stack vs float64 sums: agreement to float32 rounding of the inputs; PowerBALD's
    # log BALD divides BALD's absolute rounding (~1e-7, a difference of entropies) by BALD itself
    atol = 1e-3 if name == "power_bald" else 1e-6
    np.testing.assert_allclose(streamed.double().numpy(), stacked.double().numpy(), rtol=1e-5, atol=atol)


def test_balent_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 MC samples"):
        scores.balanced_entropy(torch.rand(1, 2, 3, 4, 4))


def test_balent_chunking_matches_single_chunk(monkeypatch):
    rng = np.random.default_rng(0)
    p = torch.from_numpy(dirichlet_samples(rng, 6, 4, 64, 2.0).astype(np.float32)).reshape(6, 4, 8, 8)
    mc = torch.stack([p, p.flip(-1)], dim=1)  # [K, 2, C, 8, 8]
    whole = scores.balent_acquisition(mc)
    monkeypatch.setattr(scores, "_BALENT_CHUNK_ELEMENTS", 6 * 4 * 5)  # 5 pixels per chunk
    np.testing.assert_allclose(scores.balent_acquisition(mc).numpy(), whole.numpy(), rtol=1e-13)


def numpy_baselines(p):
    """p: [K, N, C, P] float64 -> dict of [N, P]"""
    mean = p.mean(0)
    ent = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(1)
    member = -(p * np.log(np.clip(p, 1e-12, None))).sum(2).mean(0)
    srt = np.sort(mean, axis=1)
    return {"entropy": ent, "bald": ent - member, "margin": 1 - (srt[:, -1] - srt[:, -2]),
            "mean_std": p.std(0).mean(1)}


def test_baselines_match_numpy():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6), size=(7, 3, 10)).transpose(0, 1, 3, 2)  # [K=7, N=3, C=6, P=10]
    expected = numpy_baselines(p)
    mc = torch.from_numpy(p)
    for name, fn in [("entropy", scores.entropy), ("bald", scores.bald), ("margin", scores.margin), ("mean_std", scores.mean_std)]:
        np.testing.assert_allclose(fn(mc).numpy(), expected[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_known_rankings():
    c = 4
    confident = torch.tensor([0.97, 0.01, 0.01, 0.01])
    uniform = torch.full((c,), 0.25)
    mc = torch.stack([confident, uniform]).T.reshape(1, 1, c, 2).expand(3, 1, c, 2)  # same for all K
    assert scores.entropy(mc)[0, 1] == pytest.approx(math.log(c))
    assert scores.entropy(mc)[0, 0] < 0.25
    assert scores.margin(mc)[0, 1] == pytest.approx(1.0) and scores.margin(mc)[0, 0] < 0.1
    assert torch.allclose(scores.bald(mc), torch.zeros(1, 2), atol=1e-6)  # samples agree: no epistemic part
    disagree = torch.eye(c)[:, :, None, None].permute(0, 2, 1, 3)  # K=4 one-hot samples on different classes
    assert scores.bald(disagree)[0, 0] == pytest.approx(math.log(c), rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 6), st.integers(0, 10_000), st.floats(0.1, 20.0))
def test_bald_is_non_negative_and_at_most_entropy(k, c, seed, temperature):
    logits = torch.randn(k, 2, c, 3, generator=torch.Generator().manual_seed(seed)) * temperature
    mc = logits.softmax(2)
    b, h = scores.bald(mc), scores.entropy(mc)
    assert (b >= -1e-5).all() and (b <= h + 1e-5).all()


def mc_input(seed=0, k=5, n=2, c=4, h=6, w=5):
    return torch.randn(k, n, c, h, w, generator=torch.Generator().manual_seed(seed)).softmax(2)


@pytest.mark.parametrize("name", sorted(scores.SCORES))
def test_every_registered_score_maps_mc_probs_to_pixels(name):
    mc = mc_input()
    out = scores.SCORES[name](mc, torch.Generator().manual_seed(0))
    assert out.shape == (2, 6, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["power_bald", "random"])
def test_stochastic_scores_follow_the_generator(name):
    mc = mc_input()
    a = scores.SCORES[name](mc, torch.Generator().manual_seed(1))
    b = scores.SCORES[name](mc, torch.Generator().manual_seed(1))
    c = scores.SCORES[name](mc, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.slow
def test_power_bald_top1_frequency_follows_bald():
    """Top-1 of log BALD + Gumbel is a draw proportional to BALD."""
    mc = mc_input(seed=3, n=1, h=1, w=4)
    b = scores.bald(mc)[0, 0]
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[scores.power_bald(mc, generator)[0, 0].argmax()] += 1
    np.testing.assert_allclose((counts / counts.sum()).numpy(), (b / b.sum()).numpy(), atol=0.03)


@pytest.mark.parametrize("fn", [scores.entropy, scores.margin, scores.bald, scores.mean_std])
def test_differentiable_scores_have_finite_gradients(fn):
    logits = torch.randn(3, 2, 4, 5, 5, requires_grad=True)
    probs = torch.cat([logits[:, :, :1] * 0 - 50, logits[:, :, 1:]], dim=2).softmax(2)  # one class ~ 0
    fn(probs).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_unknown_score_lists_valid_names():
    with pytest.raises(KeyError, match="balent"):
        scores.SCORES.lookup("balnet")


def test_bad_shape_is_explained():
    with pytest.raises(ValueError, match=r"\[K, N, C, \*S\]"):
        scores.entropy(torch.rand(4, 4))


def test_streamed_balent_matches_the_stack_to_float64_rounding():
    """BalEnt from the streamed float64 sums equals BalEnt from the stack far inside the 1e-6 bar,
    on BalEntAcq-sized MC-like samples (K=20, C=19) where the Beta fit is ill-conditioned.
    Float32 sums (even shifted by the first sample) were 2.6e-4 off here."""
    from al.moments import MCMoments

    mc = torch.from_numpy(np.stack([mc_like_samples(np.random.default_rng(i), k=20, c=19, pixels=2000, noise=0.5)
                                    for i in range(2)], axis=1).astype(np.float32))
    streamed = MCMoments.of(mc)
    for name in ("balent", "balent_exact", "balanced_entropy"):
        np.testing.assert_allclose(scores.SCORES[name](streamed).numpy(), scores.SCORES[name](mc).numpy(), rtol=1e-8)


@pytest.mark.parametrize("scale", [1.0, 40.0, 1000.0])
def test_sums_of_logits_match_float64_softmax_sums(scale):
    """al.moments.sums_of_logits (spelt-out softmax, entropy as log s - sum p y) against scipy's
    softmax and p log p in float64, on float32 logits up to 1000 (exp overflows without the shift;
    at 40 some p are far below the 1e-12 floor of p log p)."""
    from scipy.special import softmax, xlogy

    from al.moments import sums_of_logits

    logits = torch.randn(20, 5, 300, generator=torch.Generator().manual_seed(0)) * scale
    sum_p, sum_p2, sum_entropy = sums_of_logits(logits)
    p = softmax(logits.double().numpy(), axis=1)
    np.testing.assert_allclose(sum_p.numpy(), p.sum(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sum_p2.numpy(), (p * p).sum(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sum_entropy.numpy(), -xlogy(p, p).sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert sum_p.dtype == sum_p2.dtype == torch.float64 and sum_entropy.dtype == torch.float32
