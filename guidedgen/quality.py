"""Quality of generated samples: does the image show its mask, and is it degenerate?"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from al.metrics import SegmentationScores, confusion_matrix
from al.models import Segmenter


@dataclass
class SampleQuality:
    mask_miou: float  # agreement of the segmenter's prediction with the conditioning mask
    image_std: float
    degenerate: bool


@torch.no_grad()
def assess(segmenter: Segmenter, images: Tensor, masks: Tensor, ignore_index: int = 255,
           min_image_std: float = 0.02) -> tuple[list[SampleQuality], Tensor]:
    """Per-sample quality and the disagreement map (prediction != mask, not on ignore pixels).

    Shape: ``images [N, 3, H, W] in [0, 1], masks [N, H, W] -> (N qualities, [N, H, W] bool)``.
    A near-constant image (std below ``min_image_std``, e.g. black) is degenerate.
    """
    prediction = segmenter.eval().predict(images)
    disagree = (prediction != masks) & (masks != ignore_index)
    qualities = []
    for i in range(len(images)):
        confusion = confusion_matrix(prediction[i], masks[i], segmenter.num_classes, ignore_index)
        std = float(images[i].std())
        qualities.append(SampleQuality(SegmentationScores.from_confusion(confusion).miou, std, std < min_image_std))
    return qualities, disagree
