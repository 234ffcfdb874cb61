"""guidedgen.resolution: the reduced-resolution view of the x0 estimate that guidance may decode."""

import torch
import torch.nn.functional as F

from guidedgen.resolution import downsample_latents, downsample_masks


def test_latents_are_block_means_and_the_gradient_reaches_every_element():
    latents = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).view(2, 4, 4, 6).requires_grad_(True)
    small = downsample_latents(latents, 2)
    assert small.shape == (2, 4, 2, 3)
    assert small[1, 3, 1, 2] == latents[1, 3, 2:4, 4:6].mean()
    # an integer factor is bilinear downsampling (its sample points fall between the block's pixels)
    assert torch.allclose(small, F.interpolate(latents, scale_factor=0.5, mode="bilinear"))
    (gradient,) = torch.autograd.grad(small.sum(), latents)
    assert torch.equal(gradient, torch.full_like(latents, 1 / 4))
    assert downsample_latents(latents, 1) is latents


def test_masks_keep_whole_class_ids_at_the_block_centres():
    masks = torch.tensor([[[0, 1, 2, 3],
                           [4, 5, 6, 7],
                           [8, 9, 10, 11],
                           [12, 13, 14, 255]]])
    assert torch.equal(downsample_masks(masks, 2), torch.tensor([[[5, 7], [13, 255]]]))
    assert downsample_masks(masks, 1) is masks
