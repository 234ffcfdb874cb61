"""DEAL's difficulty branch and scores (docs/methods.md#deal)."""

import math

import numpy as np
import pytest
import torch

from al.deal import (
    DifficultyBranch,
    ProbabilityAttention,
    difficulty_entropy,
    difficulty_loss,
    difficulty_sum,
    error_mask,
    max_difficulty_entropy,
    pixel_difficulty,
)


def test_pam_is_the_identity_on_probabilities_when_gamma_is_zero():
    logits = torch.randn(2, 5, 6, 7)
    assert torch.allclose(ProbabilityAttention()(logits), logits.softmax(1))


def test_pam_matches_the_formula_for_nonzero_gamma():
    pam = ProbabilityAttention()
    with torch.no_grad():
        pam.gamma.fill_(0.7)
    logits = torch.randn(1, 3, 2, 2)
    p = logits.softmax(1).reshape(3, 4).numpy().astype(np.float64)
    a = p.T @ p
    a = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    expected = 0.7 * (p @ a.T) + p
    np.testing.assert_allclose(pam(logits).reshape(3, 4).detach().numpy(), expected, rtol=1e-5)


def test_error_mask_ignores_void():
    logits = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 2.0, 2.0]]]])  # argmax: 0, 1, 1
    target = torch.tensor([[[0, 0, 255]]])
    errors, valid = error_mask(logits, target)
    assert errors.tolist() == [[[0.0, 1.0, 0.0]]] and valid.tolist() == [[[True, True, False]]]


def test_difficulty_entropy_against_a_hand_computed_histogram():
    # values over [0, 1] in 4 bins: counts 2, 1, 0, 1
    m = torch.tensor([[[0.0, 0.1], [0.3, 1.0]]])
    p = np.array([2, 1, 1]) / 4
    assert difficulty_entropy(m, bins=4).item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert difficulty_entropy(torch.full((1, 2, 2), 0.3), bins=4).item() == 0.0
    flat = torch.linspace(0, 1, 800).reshape(1, 20, 40)
    assert difficulty_entropy(flat, bins=8).item() == pytest.approx(max_difficulty_entropy(8), rel=1e-3)


def test_difficulty_sum_and_pixel_variant():
    m = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]])
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert difficulty_sum(m).item() == pytest.approx(0.5)
    assert difficulty_sum(m, h).item() == pytest.approx(0.25)
    assert torch.equal(pixel_difficulty(m, h), m * h) and torch.equal(pixel_difficulty(m), m)


@pytest.mark.slow
def test_the_branch_learns_where_the_segmenter_errs():
    """On a fixed batch, the branch's loss falls and M ends higher on error pixels."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 16, 16) * 3
    predicted = logits.argmax(1)
    target = torch.where(predicted == 2, 0, predicted)  # every "class 2" prediction is an error
    branch = DifficultyBranch(num_classes=3, size=(16, 16))  # full resolution: errors are per pixel here
    optimizer = torch.optim.Adam(branch.parameter_groups(lr=0.05))
    losses = []
    for _ in range(60):
        loss = difficulty_loss(branch(logits), logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    m = branch(logits).detach()
    assert m[predicted == 2].mean() > m[predicted != 2].mean() + 0.3
    assert branch.attention.gamma.item() != 0.0  # gamma is trained


def test_branch_output_is_a_map_at_the_input_size_with_gradients_into_the_logits():
    logits = torch.randn(2, 4, 20, 24, requires_grad=True)
    m = DifficultyBranch(4, size=(10, 12))(logits)
    assert m.shape == (2, 20, 24) and (m > 0).all() and (m < 1).all()
    m.sum().backward()
    assert logits.grad.abs().sum() > 0
    assert math.isclose(DifficultyBranch(4).parameter_groups(1e-3)[1]["lr"], 1e-2)
