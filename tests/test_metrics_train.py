import math

import pytest
import torch
import torch.nn.functional as F

from al.config import ConfigError
from al.metrics import SegmentationScores, confusion_matrix, iou_per_class
from al.models import build_segmenter
from al.train import (
    DenseTargetDataset,
    TrainConfig,
    TrainingSource,
    _mixed_loader,
    evaluate,
    mixed_cross_entropy,
    sparse_cross_entropy,
    train_segmenter,
)


def test_miou_on_a_hand_computed_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    confusion = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 2/4;
    # class 2: TP 1, FP 1, FN 1 -> 1/3; class 3 absent everywhere -> NaN (not averaged)
    iou = iou_per_class(confusion)
    assert torch.allclose(iou[:3], torch.tensor([1 / 3, 1 / 2, 1 / 3], dtype=torch.float64))
    assert torch.isnan(iou[3])
    scores = SegmentationScores.from_confusion(confusion)
    assert abs(scores.miou - (1 / 3 + 1 / 2 + 1 / 3) / 3) < 1e-12
    assert abs(scores.pixel_accuracy - 4 / 7) < 1e-12


def test_sparse_cross_entropy_only_counts_labelled_pixels():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    target[0, 1, 2], target[1, 3, 3] = 2, 0
    loss = sparse_cross_entropy(logits, target)
    manual = (F.cross_entropy(logits[0, :, 1, 2][None], torch.tensor([2]))
              + F.cross_entropy(logits[1, :, 3, 3][None], torch.tensor([0]))) / 2
    assert torch.allclose(loss, manual)
    loss.backward()
    assert logits.grad[0, :, 0, 0].abs().sum() == 0
    empty = sparse_cross_entropy(logits, torch.full((2, 4, 4), 255))
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.slow
def test_training_lowers_the_loss_and_evaluate_scores_it(tiny_digits):
    train, _ = tiny_digits
    torch.manual_seed(0)
    model = build_segmenter("unet", "tu-resnet10t", 11, encoder_depth=3, decoder_channels=(16, 8, 8))
    result = train_segmenter(model, DenseTargetDataset(train), TrainConfig(epochs=10, batch_size=2, lr=5e-3), progress=False)
    assert result.losses[-1] < 0.6 * result.losses[0]
    scores = evaluate(model, train)
    assert 0.0 <= scores.miou <= 1.0 and scores.pixel_accuracy > 0.5


def test_mixed_cross_entropy_weights_each_sources_mean():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, 5)
    target = torch.randint(0, 3, (4, 5, 5))
    target[0, :3] = 255  # some ignored pixels in the real source
    source = torch.tensor([0, 1, 0, 1])
    got = mixed_cross_entropy(logits, target, source, [1.0, 0.25])
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    valid = target != 255
    real = per_pixel[[0, 2]][valid[[0, 2]]].mean()
    synthetic = per_pixel[[1, 3]][valid[[1, 3]]].mean()
    assert torch.allclose(got, real + 0.25 * synthetic)
    # a source absent from the batch adds nothing; an all-ignored batch gives 0 with a graph
    assert torch.allclose(mixed_cross_entropy(logits[[0, 2]], target[[0, 2]], source[[0, 2]], [1.0, 0.25]), real)
    empty = mixed_cross_entropy(logits.requires_grad_(), torch.full_like(target, 255), source, [1.0, 1.0])
    assert empty.item() == 0.0 and empty.requires_grad


class _Constant(torch.utils.data.Dataset):
    def __init__(self, n, value):
        self.n, self.value = n, value

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"image": torch.full((3, 4, 4), float(self.value)), "target": torch.zeros(4, 4, dtype=torch.long)}


def test_mixed_sources_fill_batches_by_share():
    sources = [TrainingSource(_Constant(30, 0), share=0.75), TrainingSource(_Constant(500, 1), share=0.25, name="syn")]
    loader = _mixed_loader(sources, batch_size=16, generator=torch.Generator().manual_seed(0))
    drawn = torch.cat([batch["source"] for _ in range(50) for batch in loader])
    assert len(drawn) == 50 * 40  # one epoch shows 30 / 0.75 = 40 items
    assert abs(drawn.float().mean().item() - 0.25) < 0.03
    batch = next(iter(loader))
    assert torch.equal(batch["image"][:, 0, 0, 0], batch["source"].float())  # items carry their own source


@pytest.mark.slow
def test_synthetic_pairs_change_what_is_learnt(tiny_digits):
    """Same seed and real labels: adding a weighted second source changes the trained weights."""
    train, _ = tiny_digits
    real = DenseTargetDataset(train)
    config = TrainConfig(epochs=1, batch_size=4, seed=0)

    def trained(sources):
        torch.manual_seed(0)
        model = build_segmenter("unet", "tu-resnet10t", 11, encoder_depth=3, decoder_channels=(16, 8, 8))
        train_segmenter(model, sources, config, progress=False)
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(trained(real), trained([TrainingSource(real)]))  # one source = the plain path
    mixed = trained([TrainingSource(real, 0.5), TrainingSource(real, 0.5, loss_weight=2.0, name="syn")])
    assert not torch.allclose(trained(real), mixed)


@pytest.mark.slow
def test_cosine_lr_schedule_decays_every_group_to_zero_over_all_steps(tiny_digits, monkeypatch):
    """The factor applied at optimizer step k of N is 0.5 (1 + cos(pi k / N)) for every parameter
    group; "constant" keeps it at 1; an unknown schedule is a config error naming the key."""
    train, _ = tiny_digits
    dataset = DenseTargetDataset(train)
    factors, original_step = [], torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        factors.append([group["lr"] / group["initial_lr"] for group in self.param_groups])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    model = build_segmenter("unet", "tu-resnet10t", 11, encoder_depth=3, decoder_channels=(16, 8, 8))
    config = TrainConfig(epochs=2, batch_size=4, seed=0, lr_schedule="cosine")
    train_segmenter(model, dataset, config, progress=False)
    steps = 2 * math.ceil(len(dataset) / 4)
    assert len(factors) == steps
    for k, row in enumerate(factors):
        assert row == pytest.approx([0.5 * (1 + math.cos(math.pi * k / steps))] * len(row))
    factors.clear()
    train_segmenter(model, dataset, TrainConfig(epochs=1, batch_size=4), progress=False)
    assert factors and all(f == 1.0 for row in factors for f in row)
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        train_segmenter(model, dataset, TrainConfig(lr_schedule="poly"), progress=False)
