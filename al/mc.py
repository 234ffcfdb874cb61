"""Last-layer MC dropout: run the backbone once, the dropout + classifier head K times."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from al.models import Segmenter
from al.moments import MCMoments


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k (MC samples) must be >= 1, got {k}")


def sample_head(model: Segmenter, features: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """K dropout samples of the head's softmax on precomputed features; differentiable.

    Shape: ``features [N, D, h, w] -> [K, N, C, H, W]``.
    """
    _check_k(k)
    return torch.stack([model.classify(features, generator=generator, stochastic=True).softmax(1) for _ in range(k)])


def _head_passes(model: Segmenter, images: Tensor, k: int, generator: Optional[torch.Generator],
                 upsample: bool = True) -> Iterator[Tensor]:
    """The backbone once in eval mode (BatchNorm on running statistics), then K dropout-sampled
    logits of the head; the model's mode is restored when the passes end.

    Shape: ``images [N, 3, H, W] -> K x [N, C, H, W]`` (decoder resolution without ``upsample``).
    """
    _check_k(k)
    was_training = model.training
    model.eval()
    try:
        features = model.features(images)
        for _ in range(k):
            yield model.classify(features, generator=generator, stochastic=True, upsample=upsample)
    finally:
        model.train(was_training)


@torch.no_grad()
def mc_probs(
    model: Segmenter,
    images: Tensor,
    k: int,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """K stochastic softmax predictions from last-layer dropout.

    The model runs in eval mode (BatchNorm uses running statistics); only the head's dropout is
    sampled. ``generator`` (on ``images.device``) makes the K masks reproducible. Same values as
    :func:`sample_head`, but each softmax is written straight into its slot of the output: the
    K-stack is the largest tensor here and stacking it would copy it once more.

    Shape: ``images [N, 3, H, W] -> [K, N, C, H, W]``.
    """
    out = None
    for i, logits in enumerate(_head_passes(model, images, k, generator)):
        if out is None:
            out = torch.empty((k, *logits.shape), dtype=logits.dtype, device=logits.device)
        slot = out[i]
        torch.sub(logits, logits.amax(1, keepdim=True), out=slot)
        slot.exp_()
        slot.div_(slot.sum(1, keepdim=True))
    return out


@torch.no_grad()
def mc_moments(
    model: Segmenter,
    images: Tensor,
    k: int,
    generator: Optional[torch.Generator] = None,
    at_decoder_resolution: bool = False,
) -> MCMoments:
    """The same K samples as :func:`mc_probs` (same ``generator`` = same dropout masks), folded
    pass by pass into :class:`MCMoments`: memory ``O(N C H W)`` instead of ``O(K N C H W)``.

    ``at_decoder_resolution``: where the head upsamples its logits (DeepLabV3+, FPN: 4x), take
    the K softmaxes at the decoder's resolution and upsample the summed statistics once, with
    the head's own bilinear upsampling: K x 16 fewer full-resolution softmaxes. Not the same
    numbers as softmax-after-upsampling (softmax is not linear), but the same smooth maps up to
    interpolation; a no-op for heads without upsampling (Unet).

    Shape: ``images [N, 3, H, W] -> MCMoments of [K, N, C, H, W]``.
    """
    moments = None
    for logits in _head_passes(model, images, k, generator, upsample=not at_decoder_resolution):
        probs = logits.softmax(1)
        if moments is None:
            moments = MCMoments.empty_like(probs)
        moments.add(probs)
    return moments.map(model.upsample) if at_decoder_resolution else moments
