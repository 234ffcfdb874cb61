"""Last-layer MC dropout: run the backbone once, then K dropout samples of the 1x1 head.

The random stream: per image and sample, one keep/drop draw per *input channel* of the 1x1
classifier, shared by all of that image's pixels (:func:`thinned_classifiers`). Dropping input
channel d of a 1x1 conv is dropping column d of its weight, so sample k of image n is one
classifier ``W * m[n, k] / keep``, and the K samples of a whole image are a single matmul: no
mask per pixel and no masked copy of the features, which made MC dropout 2-6x a forward pass.

At any single pixel the K samples have exactly the distribution of element-wise dropout before
the classifier (BalEntAcq's layer, which ``Segmenter`` trains with): each is the classifier on
the pixel's features with independent Bernoulli(keep) masks over the D channels. Every
acquisition score is a function of one pixel's K samples, so each pixel's score has the same
distribution too; only the MC noise of two pixels of one image is now correlated.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

from al.models import Segmenter, dropout_keep_mask
from al.moments import MCMoments, sums_of_logits

# Logits folded at a time by mc_moments / mc_probs: K * C * pixels <= this. Blocks this size
# (1 MB in float32, 2 MB as the float64 sums see them) stay in a core's L2 cache; whole-image
# tensors went through memory once per elementwise op, 4-5x slower on the benchmark Unet.
_BLOCK_ELEMENTS = 2 ** 18


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k (MC samples) must be >= 1, got {k}")


def thinned_classifiers(model: Segmenter, n: int, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """K dropout-thinned copies of the head's 1x1 classifier per image: ``W * m / keep`` with
    ``m`` one keep draw per image, sample and input channel (:func:`al.models.dropout_keep_mask`,
    drawn in that order from ``generator``, which must live on the model's device), ``keep`` the
    rate it was drawn at. Differentiable in ``W``.

    Shape: ``[N, K, C, D]``.
    """
    _check_k(k)
    weight = model.classifier.weight.flatten(1)  # [C, D]
    mask, rate = dropout_keep_mask((n, k, 1, weight.shape[1]), 1.0 - model.config.dropout, generator, weight.device)
    return weight * mask / rate


def sample_head(model: Segmenter, features: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """K dropout samples of the head's softmax on precomputed features; differentiable. The
    plain reading of the head: each sample's classifier on the decoder features, then the head's
    upsampling of the logits, then the softmax.

    Shape: ``features [N, D, h, w] -> [K, N, C, H, W]``.
    """
    n = features.shape[0]
    weights = thinned_classifiers(model, n, k, generator)
    logits = torch.einsum("nkcd,ndhw->knchw", weights, features)
    if model.classifier.bias is not None:
        logits = logits + model.classifier.bias[:, None, None]
    return model.upsample(logits.flatten(0, 1)).unflatten(0, (k, n)).softmax(2)


@contextmanager
def _eval_mode(model: Segmenter) -> Iterator[None]:
    """Eval mode (BatchNorm on running statistics) inside, the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logit_blocks(model: Segmenter, features: Tensor, k: int, generator: Optional[torch.Generator],
                  upsample: bool) -> Iterator[tuple[int, slice, Tensor]]:
    """The K samples' logits on ``features`` by image and block of pixels.

    Full resolution upsamples the decoder features, not the K x C logits: the classifier is 1x1
    and the head's bilinear upsampling linear with weights summing to 1, so both orders give
    the same logits (up to rounding), and D features are fewer maps than K x C logits.

    Yields ``(image index, pixel slice, logits [K, C, pixels])`` over the flattened ``H x W``
    (the decoder's ``h x w`` without ``upsample``).
    """
    weights = thinned_classifiers(model, features.shape[0], k, generator).flatten(1, 2)  # [N, K*C, D]
    classes, bias = model.num_classes, model.classifier.bias
    bias = bias.repeat(k)[:, None] if bias is not None else features.new_zeros(())  # [K*C, 1], added by addmm
    for i in range(features.shape[0]):
        flat = (model.upsample(features[i:i + 1]) if upsample else features[i:i + 1])[0].flatten(1)  # [D, P]
        blocks = -(-flat.shape[1] * k * classes // _BLOCK_ELEMENTS)
        block = -(-flat.shape[1] // blocks)  # even blocks: no small ragged one
        for start in range(0, flat.shape[1], block):
            pixels = slice(start, start + block)
            yield i, pixels, torch.addmm(bias, weights[i], flat[:, pixels]).view(k, classes, -1)


@torch.no_grad()
def mc_probs(
    model: Segmenter,
    images: Tensor,
    k: int,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """K stochastic softmax predictions from last-layer dropout: the samples of
    :func:`sample_head` (same ``generator`` = same masks), computed block by block.

    The model runs in eval mode (BatchNorm uses running statistics); only the head's dropout is
    sampled. ``generator`` (on ``images.device``) makes the K masks reproducible.

    Shape: ``images [N, 3, H, W] -> [K, N, C, H, W]``.
    """
    _check_k(k)
    with _eval_mode(model):
        features = model.features(images)
        out = features.new_empty((k, images.shape[0], model.num_classes, *images.shape[-2:]))
        flat = out.flatten(3)
        for i, pixels, logits in _logit_blocks(model, features, k, generator, upsample=True):
            flat[:, i, :, pixels] = logits.softmax(1)
    return out


@torch.no_grad()
def mc_moments(
    model: Segmenter,
    images: Tensor,
    k: int,
    generator: Optional[torch.Generator] = None,
    at_decoder_resolution: bool = False,
) -> MCMoments:
    """The statistics of the samples of :func:`mc_probs` (same ``generator`` = same masks),
    folded block by block: memory ``O(N C H W)`` instead of ``O(K N C H W)``.

    ``at_decoder_resolution``: where the head upsamples its logits (DeepLabV3+, FPN: 4x), take
    the K softmaxes at the decoder's resolution and upsample the summed statistics once, with
    the head's own bilinear upsampling: K x 16 fewer full-resolution softmaxes. Not the same
    numbers as softmax-after-upsampling (softmax is not linear), but the same smooth maps up to
    interpolation; a no-op for heads without upsampling (Unet).

    Shape: ``images [N, 3, H, W] -> MCMoments of [K, N, C, H, W]``.
    """
    _check_k(k)
    with _eval_mode(model):
        features = model.features(images)
        size = features.shape[-2:] if at_decoder_resolution else images.shape[-2:]
        shape = (images.shape[0], model.num_classes, size.numel())
        sum_p = features.new_empty(shape, dtype=torch.float64)
        sum_p2, sum_entropy = torch.empty_like(sum_p), features.new_empty((shape[0], shape[2]))
        for i, pixels, logits in _logit_blocks(model, features, k, generator, not at_decoder_resolution):
            sum_p[i, :, pixels], sum_p2[i, :, pixels], sum_entropy[i, pixels] = sums_of_logits(logits)
    moments = MCMoments(k, sum_p.unflatten(2, size), sum_p2.unflatten(2, size), sum_entropy.unflatten(1, size))
    return moments.map(model.upsample) if at_decoder_resolution else moments
