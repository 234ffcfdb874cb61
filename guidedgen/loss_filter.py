"""FreeMask's pixel filter for synthetic pairs (Yang et al., NeurIPS 2023, `preprocess/filter.py`).

A segmenter trained on the real data reads every synthetic pixel; where its cross-entropy against
the synthetic mask is more than ``margin`` (1.25) times the mean cross-entropy of that class on
*real* pixels, the pixel is likely mislabelled by the generator (the image does not show what the
mask says) and is ignored in training. The class means follow the reference's arithmetic,
``sum / (count + 1e-5)``, so a class absent from the real pixels has mean 0 and every synthetic
pixel of it is ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from al.models import Segmenter

CLASS_COUNT_FLOOR = 1e-5  # the reference's pixel-count floor in its class-wise mean
DEFAULT_MARGIN = 1.25  # the reference's tolerance margin


@torch.no_grad()
def pixel_losses(model: Segmenter, images: Tensor, masks: Tensor, ignore_index: int, batch_size: int = 32) -> Tensor:
    """Per-pixel cross-entropy of ``model`` against the masks (0 on ignored pixels).

    Shape: ``images [N, 3, H, W], masks [N, H, W] -> [N, H, W]`` float32.
    """
    model.eval()
    return torch.cat([F.cross_entropy(model(images[i:i + batch_size]).float(), masks[i:i + batch_size],
                                      ignore_index=ignore_index, reduction="none")
                      for i in range(0, len(images), batch_size)])


def class_mean_losses(losses: Tensor, masks: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Mean loss of each class's pixels, ``sum / (count + 1e-5)`` as the reference computes it.

    Shape: ``losses [N, H, W], masks [N, H, W] -> [num_classes]`` float64.
    """
    labelled = masks != ignore_index
    classes = masks[labelled].long()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, classes, losses[labelled].double())
    counts = torch.bincount(classes, minlength=num_classes).double()
    return sums / (counts + CLASS_COUNT_FLOOR)


def filter_by_loss(losses: Tensor, masks: Tensor, class_means: Tensor, ignore_index: int,
                   margin: float = DEFAULT_MARGIN) -> Tensor:
    """The masks with every pixel whose loss exceeds ``margin`` x its class's mean set to ``ignore_index``.

    Shape: ``losses [N, H, W], masks [N, H, W], class_means [C] -> [N, H, W]`` (masks' dtype).
    """
    labelled = masks != ignore_index
    threshold = class_means.to(losses.device)[torch.where(labelled, masks, 0).long()] * margin
    noisy = labelled & (losses.double() > threshold)
    return torch.where(noisy, torch.full_like(masks, ignore_index), masks)
