"""DEAL: difficulty-aware active learning (Xie et al., ACCV 2020; see docs/methods.md#deal).

A difficulty branch reads the segmentation logits S, refines their class probabilities with a
probability attention module (PAM), and predicts a per-pixel difficulty map M trained against
the segmenter's own errors. Images are then ranked by M (DS: its mean; DE: the entropy of its
histogram), or pixels by M directly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProbabilityAttention(nn.Module):
    """``P = softmax_C(S)`` as C x N; ``A = softmax_rows(P^T P)`` (N x N);
    ``Q = gamma * (P A^T) + P`` with a learnable ``gamma`` starting at 0.

    Shape: ``logits [B, C, h, w] -> [B, C, h, w]``.
    """

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, logits: Tensor) -> Tensor:
        batch, classes, height, width = logits.shape
        p = logits.softmax(1).flatten(2)  # [B, C, N]
        attention = torch.bmm(p.transpose(1, 2), p).softmax(-1)  # [B, N, N], rows sum to 1
        q = self.gamma * torch.bmm(p, attention.transpose(1, 2)) + p
        return q.view(batch, classes, height, width)


class DifficultyBranch(nn.Module):
    """Logits -> difficulty map ``M`` in (0, 1) at the input size.

    The logits are resized to ``size`` (CamVid 60x80, Cityscapes 86x86 in the paper) because the
    attention is N x N. Gradients flow into the logits (not detached), as in DEAL.

    Shape: ``logits [B, C, H, W] -> [B, H, W]``.
    """

    def __init__(self, num_classes: int, size: tuple[int, int] = (60, 80)):
        super().__init__()
        self.size = tuple(size)
        self.attention = ProbabilityAttention()
        self.to_difficulty = nn.Conv2d(num_classes, 1, kernel_size=1)

    def forward(self, logits: Tensor) -> Tensor:
        small = F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)
        difficulty = self.to_difficulty(self.attention(small))
        difficulty = F.interpolate(difficulty, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(difficulty)[:, 0]

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: PAM's gamma learns 10x faster, as in the reference."""
        others = [p for name, p in self.named_parameters() if name != "attention.gamma"]
        return [{"params": others, "lr": lr}, {"params": [self.attention.gamma], "lr": 10 * lr}]


def error_mask(logits: Tensor, target: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """``E = [argmax S != GT]`` and where it is defined (not void).

    Shape: ``logits [B, C, H, W], target [B, H, W] -> (E float [B, H, W], valid bool [B, H, W])``.
    """
    valid = target != ignore_index
    wrong = (logits.argmax(1) != target) & valid
    return wrong.float(), valid


def difficulty_loss(difficulty: Tensor, logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Weighted BCE of ``M`` against the error mask: each of the two classes (right, error) is
    weighted by ``1 / sqrt(n + 1)``, normalised to sum to 1; void pixels are ignored.

    Shape: ``difficulty [B, H, W], logits [B, C, H, W], target [B, H, W] -> []``.
    """
    errors, valid = error_mask(logits.detach(), target, ignore_index)
    counts = torch.stack([((errors == 0) & valid).sum(), ((errors == 1) & valid).sum()]).float()
    weights = 1.0 / (counts + 1.0).sqrt()
    weights = weights / weights.sum()
    per_pixel = weights[errors.long()] * F.binary_cross_entropy(difficulty.clamp(1e-6, 1 - 1e-6), errors, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


def difficulty_sum(difficulty: Tensor, pixel_entropy: Optional[Tensor] = None) -> Tensor:
    """DS: mean difficulty per image, optionally weighted by pixel entropy. ``[B, H, W] -> [B]``."""
    if pixel_entropy is not None:
        difficulty = difficulty * pixel_entropy
    return difficulty.flatten(1).mean(1)


def difficulty_entropy(difficulty: Tensor, bins: int = 8) -> Tensor:
    """DE: entropy (nats) of the ``bins``-bin histogram of each image's difficulty map over its
    own min-max range (k = 8 for CamVid, 10 for Cityscapes). ``[B, H, W] -> [B]``."""
    values = []
    for image in difficulty.detach().flatten(1):
        low, high = float(image.min()), float(image.max())
        if high <= low:
            values.append(image.new_zeros(()))
            continue
        counts = torch.histc(image.float(), bins=bins, min=low, max=high)
        p = counts / counts.sum()
        values.append(-(p[p > 0] * p[p > 0].log()).sum())
    return torch.stack(values)


def pixel_difficulty(difficulty: Tensor, other: Optional[Tensor] = None) -> Tensor:
    """Pixel-level DEAL for the sparse-pixel loop: M itself, or M times another per-pixel score.
    ``[B, H, W] -> [B, H, W]``."""
    return difficulty if other is None else difficulty * other


def max_difficulty_entropy(bins: int) -> float:
    """Upper bound of :func:`difficulty_entropy` (a flat histogram)."""
    return math.log(bins)
