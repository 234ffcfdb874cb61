"""FreeMask's pixel filter and hardness-aware re-sampling for synthetic pairs (Yang et al.,
NeurIPS 2023, `preprocess/filter.py` and `preprocess/resample.py`).

Filter: a segmenter trained on the real data reads every synthetic pixel; where its cross-entropy
against the synthetic mask is more than ``margin`` (1.25) times the mean cross-entropy of that
class on *real* pixels, the pixel is likely mislabelled by the generator (the image does not show
what the mask says) and is ignored in training. The class means follow the reference's
arithmetic, ``sum / (count + 1e-5)``, so a class absent from the real pixels has mean 0 and every
synthetic pixel of it is ignored.

Re-sampling: a mask's hardness is the pixel-weighted mean of its classes' mean losses; ranked from
easiest to hardest, the i-th of N masks (1-based) keeps ``min(1 + round(i / N * K), K)`` of its K
synthetic variants, so harder layouts contribute more synthetic images.
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


def mask_hardness(masks: Tensor, class_means: Tensor, ignore_index: int) -> Tensor:
    """Each mask's pixel-weighted mean of its classes' mean losses, ``sum / (count + 1e-5)`` over
    the labelled pixels as the reference computes it (a mask with none labelled: 0).

    Shape: ``masks [N, H, W], class_means [C] -> [N]`` float64.
    """
    labelled = masks != ignore_index
    per_pixel = class_means.double().to(masks.device)[torch.where(labelled, masks, 0).long()] * labelled
    return per_pixel.sum((1, 2)) / (labelled.sum((1, 2)).double() + CLASS_COUNT_FLOOR)


def hardness_keep_counts(hardness: Tensor, most: int) -> list[int]:
    """How many variants each unit keeps, from its hardness: ranked from easiest to hardest (ties in
    the given order), the i-th of N (1-based) keeps ``min(1 + round(i / N * most), most)``, Python's
    round (halves to even) as in the reference.

    Shape: ``hardness [N] -> N counts``, in the given order.
    """
    order = sorted(range(len(hardness)), key=lambda unit: float(hardness[unit]))
    counts = [0] * len(order)
    for rank, unit in enumerate(order, start=1):
        counts[unit] = min(1 + round(rank / len(order) * most), most)
    return counts
