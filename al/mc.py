"""Last-layer MC dropout: run the backbone once, the dropout + classifier head K times."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from al.models import Segmenter


def sample_head(model: Segmenter, features: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """K dropout samples of the head's softmax on precomputed features; differentiable.

    Shape: ``features [N, D, h, w] -> [K, N, C, H, W]``.
    """
    if k < 1:
        raise ValueError(f"k (MC samples) must be >= 1, got {k}")
    return torch.stack([model.classify(features, generator=generator, stochastic=True).softmax(1) for _ in range(k)])


@torch.no_grad()
def mc_probs(
    model: Segmenter,
    images: Tensor,
    k: int,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """K stochastic softmax predictions from last-layer dropout.

    The model runs in eval mode (BatchNorm uses running statistics); only the head's dropout is
    sampled. ``generator`` (on ``images.device``) makes the K masks reproducible.

    Shape: ``images [N, 3, H, W] -> [K, N, C, H, W]``.
    """
    was_training = model.training
    model.eval()
    try:
        return sample_head(model, model.features(images), k, generator)
    finally:
        model.train(was_training)
