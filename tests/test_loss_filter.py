"""FreeMask's pixel filter and hardness-aware re-sampling against independent computations of the
reference's arithmetic."""

import math

import numpy as np
import pytest
import torch

from guidedgen.loss_filter import class_mean_losses, filter_by_loss, hardness_keep_counts, mask_hardness, pixel_losses

IGNORE = 255


def reference_filter(real_losses, real_masks, synthetic_losses, synthetic_masks, num_classes, margin):
    """The reference's loops in plain Python: (pixel count, loss sum) per class over the real
    pixels, mean = sum / (count + 1e-5), then a synthetic pixel of class c is set to ignore where
    its loss > mean[c] * margin."""
    tallies = [(0, 0.0)] * num_classes
    for loss, label in zip(real_losses.ravel().tolist(), real_masks.ravel().tolist()):
        if label != IGNORE:
            count, total = tallies[label]
            tallies[label] = (count + 1, total + loss)
    means = [total / (count + 1e-5) for count, total in tallies]
    out = synthetic_masks.copy()
    for index, (loss, label) in enumerate(zip(synthetic_losses.ravel().tolist(), synthetic_masks.ravel().tolist())):
        if label != IGNORE and loss > means[label] * margin:
            out.flat[index] = IGNORE
    return means, out


@pytest.mark.parametrize("margin", [1.0, 1.25, 2.0])
def test_filter_matches_the_references_loops(margin):
    rng = np.random.default_rng(0)
    num_classes = 4
    real_masks = rng.integers(0, num_classes - 1, size=(3, 8, 8))  # class 3 never appears in the real pixels
    real_masks[0, 0, :4] = IGNORE
    synthetic_masks = rng.integers(0, num_classes, size=(2, 8, 8))
    synthetic_masks[1, 2, :3] = IGNORE
    real_losses, synthetic_losses = rng.exponential(size=real_masks.shape), rng.exponential(size=synthetic_masks.shape)
    means, expected = reference_filter(real_losses, real_masks, synthetic_losses, synthetic_masks, num_classes, margin)

    ours = class_mean_losses(torch.tensor(real_losses, dtype=torch.float32), torch.tensor(real_masks), num_classes, IGNORE)
    # float32 losses summed in float64: each term carries one float32 rounding of the loss
    assert ours.tolist() == pytest.approx(means, rel=4 * torch.finfo(torch.float32).eps, abs=0)
    assert ours[3] == 0  # an absent class: every synthetic pixel of it is dropped
    filtered = filter_by_loss(torch.tensor(synthetic_losses), torch.tensor(synthetic_masks), ours.double(), IGNORE, margin)
    # the same comparison on float64 losses: only a pixel within rounding of its threshold could differ
    near = np.abs(synthetic_losses - np.array(means)[np.where(synthetic_masks == IGNORE, 0, synthetic_masks)] * margin)
    decided = near > 1e-9
    assert np.array_equal(filtered.numpy()[decided], expected[decided])
    assert (filtered.numpy() == IGNORE).sum() > (synthetic_masks == IGNORE).sum()  # the filter removed something
    assert np.all(filtered.numpy()[synthetic_masks == 3] == IGNORE)
    assert np.array_equal(filtered.numpy()[synthetic_masks == IGNORE], synthetic_masks[synthetic_masks == IGNORE])


def test_pixel_losses_are_the_segmenters_cross_entropy(guiding_segmenters, digit_masks_32):
    masks, dataset = digit_masks_32
    images = torch.stack([dataset[i].image for i in range(len(dataset))])
    masks = masks.clone()
    masks[0, :2] = IGNORE
    model = guiding_segmenters[0]
    losses = pixel_losses(model, images, masks, IGNORE, batch_size=3)  # a ragged last batch
    with torch.no_grad():
        logits = model(images).double()
    log_probs = torch.log_softmax(logits, dim=1)
    picked = -log_probs.gather(1, masks.clamp_max(model.num_classes - 1)[:, None])[:, 0]
    expected = torch.where(masks == IGNORE, torch.zeros_like(picked), picked)
    assert losses.shape == masks.shape
    # float32 log-softmax against float64: a few eps of the logits' magnitude
    tolerance = 16 * torch.finfo(torch.float32).eps * max(1.0, float(logits.abs().max()))
    assert torch.allclose(losses.double(), expected, rtol=0, atol=tolerance)
    assert math.isclose(float(losses[0, :2].abs().sum()), 0.0)


def reference_resample(masks, class_means, most):
    """The reference's re-sampling loops: per mask, over its classes (ignored pixels skipped), the
    pixel count times the class's mean loss, divided by (labelled pixels + 1e-5); masks sorted by
    that (stable), the i-th of N (1-based) keeps min(1 + round(i / N * most), most)."""
    losses = []
    for mask in masks:
        total, valid = 0.0, 0
        for label in np.unique(mask):
            if label == IGNORE:
                continue
            pixels = int(np.sum(mask == label))
            valid += pixels
            total += pixels * class_means[label]
        losses.append(total / (valid + 1e-5))
    counts = [0] * len(masks)
    for i, (index, _) in enumerate(sorted(enumerate(losses), key=lambda item: item[1])):
        counts[index] = min(1 + round((i + 1) / len(masks) * most), most)
    return losses, counts


@pytest.mark.parametrize("most", [2, 5, 20])
def test_resampling_matches_the_references_loops(most):
    rng = np.random.default_rng(1)
    num_classes, n = 5, 13
    masks = rng.integers(0, num_classes, size=(n, 6, 6))
    masks[:, 0, :rng.integers(0, 6)] = IGNORE
    masks[4] = IGNORE  # no labelled pixel: hardness 0, the easiest
    class_means = rng.exponential(size=num_classes)
    losses, counts = reference_resample(masks, class_means.tolist(), most)
    ours = mask_hardness(torch.tensor(masks), torch.tensor(class_means), IGNORE)
    # float64 sums in another order: a few ulps
    assert ours.tolist() == pytest.approx(losses, rel=1e-12, abs=0)
    assert ours[4] == 0
    assert hardness_keep_counts(ours, most) == counts
    assert min(counts) >= 1 and max(counts) == most  # the hardest mask keeps every variant


def test_resampling_keeps_more_of_harder_units_and_breaks_ties_in_order():
    counts = hardness_keep_counts(torch.tensor([0.3, 0.1, 0.3, 0.9]), 4)
    # ranks: 0.1 -> 1, the first 0.3 -> 2, the second -> 3, 0.9 -> 4: min(1 + round(i), 4)
    assert counts == [3, 2, 4, 4]
    # round halves to even, as Python's round in the reference: 2/4 * 1 = 0.5 -> 0
    assert hardness_keep_counts(torch.tensor([0.0, 1.0, 2.0, 3.0]), 1) == [1, 1, 1, 1]
    assert hardness_keep_counts(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2) == [1, 2, 2, 2]  # 0.5 -> 0, 1.0, 1.5 -> 2
