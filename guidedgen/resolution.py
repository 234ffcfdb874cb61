"""Reduced-resolution guidance: the objective sees the x0 estimate decoded at 1/n resolution.

The VAE decoder's forward and backward dominate a guided step's cost at full resolution, and
both scale with the number of output pixels. Averaging the x0 latent over n x n blocks before
decoding (and reading the mask at the same reduced grid) cuts decoder and segmenter work n^2-fold;
the average pool is linear, so the gradient still reaches every full-resolution latent element
(spread evenly over its block).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def downsample_latents(latents: Tensor, factor: int) -> Tensor:
    """Mean over ``factor x factor`` blocks (= bilinear downsampling by an integer factor).

    Shape: ``[N, C, h, w] -> [N, C, h / factor, w / factor]``; ``factor=1`` returns the input.
    """
    return latents if factor == 1 else F.avg_pool2d(latents, factor)


def downsample_masks(masks: Tensor, factor: int) -> Tensor:
    """Class ids at the centre pixel of each ``factor x factor`` block (nearest: no blended ids).

    Shape: ``[N, H, W] -> [N, H / factor, W / factor]``; ``factor=1`` returns the input.
    """
    return masks if factor == 1 else masks[:, factor // 2::factor, factor // 2::factor]
