import torch
import torch.nn.functional as F

from al.metrics import SegmentationScores, confusion_matrix, iou_per_class
from al.models import build_segmenter
from al.train import (
    DenseTargetDataset,
    TrainConfig,
    evaluate,
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


def test_training_lowers_the_loss_and_evaluate_scores_it(tiny_digits):
    train, _ = tiny_digits
    torch.manual_seed(0)
    model = build_segmenter("unet", "tu-resnet10t", 11, encoder_depth=3, decoder_channels=(16, 8, 8))
    result = train_segmenter(model, DenseTargetDataset(train), TrainConfig(epochs=10, batch_size=2, lr=5e-3), progress=False)
    assert result.losses[-1] < 0.6 * result.losses[0]
    scores = evaluate(model, train)
    assert 0.0 <= scores.miou <= 1.0 and scores.pixel_accuracy > 0.5
