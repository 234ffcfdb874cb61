"""Confusion-matrix based segmentation metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Counts ``[C, C]``: row = true class, column = predicted class; ``ignore_index`` pixels skipped.

    Shape: ``pred, target [*] (same shape) -> [C, C]`` int64.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU of each class; NaN for a class absent from both prediction and truth. ``[C, C] -> [C]``."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


@dataclass
class SegmentationScores:
    miou: float
    pixel_accuracy: float
    iou: list[float]  # per class, NaN where the class never occurs

    @classmethod
    def from_confusion(cls, confusion: Tensor) -> "SegmentationScores":
        iou = iou_per_class(confusion)
        total = confusion.sum().item()
        return cls(
            miou=float(iou.nanmean()),
            pixel_accuracy=confusion.diag().sum().item() / total if total else float("nan"),
            iou=iou.tolist(),
        )
