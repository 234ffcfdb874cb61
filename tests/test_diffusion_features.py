"""Diffusion-feature pixel classifiers: hooks and shared noise, bounded pixel sampling, the
pixel-MLP ensemble as in docs/methods.md#diffusion-feature-pixel-classifiers, and its use as the
K axis of mc_probs."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from al.diffusion_features import (
    DiffusionFeatureExtractor,
    EnsembleConfig,
    FeatureConfig,
    PixelEnsemble,
    majority_vote,
    sample_pixels,
    upsampled_at,
)
from al.scores import SCORES
from guidedgen.components import tiny_components


@pytest.fixture(scope="module")
def pixel_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def test_features_concatenate_blocks_and_timesteps_at_label_size(pixel_unet):
    extractor = DiffusionFeatureExtractor(pixel_unet, DDPMScheduler(), FeatureConfig(timesteps=[50, 150]))
    features = extractor(torch.rand(2, 3, 32, 32), size=(16, 16))
    # up_blocks.0 outputs 16 channels, up_blocks.1 8 channels; two timesteps
    assert features.shape == (2, 2 * (16 + 8), 16, 16)


def test_one_noise_tensor_is_shared_by_all_images(pixel_unet):
    extractor = DiffusionFeatureExtractor(pixel_unet, DDPMScheduler(), FeatureConfig(timesteps=[100]))
    images = torch.rand(3, 3, 32, 32)
    together = extractor(images)
    alone = extractor(images[2:3])
    # batch 3 vs 1 re-blocks the conv sums: <= ~sqrt(288) eps32 = 2e-6 relative per layer over the ~20
    # layers up to the hooked block, ~4e-5 of the features' size (another noise seed moves them by ~1x)
    assert (together[2:3] - alone).abs().max() <= 1e-4 * alone.abs().max()
    other_seed = DiffusionFeatureExtractor(pixel_unet, DDPMScheduler(), FeatureConfig(timesteps=[100], noise_seed=1))
    assert not torch.allclose(other_seed(images[2:3]), alone)


def test_conditional_latent_unet_with_named_blocks():
    components = tiny_components(seed=0)
    vae = components.vae
    empty = components.text_encoder(components.tokenizer([""], padding="max_length", max_length=16,
                                                         return_tensors="pt").input_ids)[0]
    extractor = DiffusionFeatureExtractor(
        components.unet, DDPMScheduler(), FeatureConfig(blocks=["up_blocks.0", "up_blocks.1.resnets.0"], timesteps=[50]),
        encode=lambda x: vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor,
        encoder_hidden_states=empty,
    )
    assert extractor(torch.rand(2, 3, 32, 32)).shape == (2, 32 + 16, 32, 32)
    with pytest.raises(KeyError, match="no submodules"):
        DiffusionFeatureExtractor(components.unet, DDPMScheduler(), FeatureConfig(blocks=["output_blocks.5"]))


def test_pixel_sampling_is_half_precision_and_per_image(pixel_unet):
    extractor = DiffusionFeatureExtractor(pixel_unet, DDPMScheduler(), FeatureConfig(timesteps=[50]))
    targets = torch.full((2, 32, 32), 255)
    targets[0, :4, :4] = 1  # 16 labelled pixels in image 0, none in image 1
    features, labels = sample_pixels(extractor.activations, [(torch.rand(2, 3, 32, 32), targets)], pixels_per_image=10,
                                     budget_bytes=10**6, generator=torch.Generator().manual_seed(0))
    assert features.dtype == torch.float16 and features.shape == (10, 24) and (labels == 1).all()
    with pytest.raises(MemoryError, match="feature budget"):
        sample_pixels(extractor.activations, [(torch.rand(2, 3, 32, 32), targets)], 10, budget_bytes=10)


@pytest.mark.parametrize("low, size", [((4, 4), (16, 16)), ((5, 7), (13, 17)), ((8, 8), (8, 8)), ((3, 3), (97, 61))])
def test_interpolating_at_pixels_equals_upsampling_then_indexing(low, size):
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(6, *low, generator=generator)
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")  # borders included
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dense = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0, :, rows, cols].T
    # both blend the same 4 corners with weights summing to 1, from source coordinates (< h) rounded
    # in different float32 orders: weights differ by a few ulps of h, values by that times 2 max|v|,
    # plus the blend's own few eps (measured: <= 3.7 eps32 max|v|)
    tolerance = (4 * max(low) + 4) * torch.finfo(torch.float32).eps * maps.abs().max()
    assert (upsampled_at(maps, rows, cols, size) - dense).abs().max() <= tolerance


def test_sampled_pixels_are_the_dense_features_at_the_same_pixels(pixel_unet):
    # the previous path upsampled each batch's maps whole, then indexed the sampled pixels; the same
    # seed must pick the same pixels, and their features differ by the float32 interpolations'
    # difference (the bound above, for blocks of <= 16 rows) plus the one fp16 rounding step it can
    # flip (<= 1 fp16 ulp = 2^-10 relative)
    extractor = DiffusionFeatureExtractor(pixel_unet, DDPMScheduler(), FeatureConfig(timesteps=[50, 150]))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 4, (3, 32, 32), generator=torch.Generator().manual_seed(2))
    targets[1, 8:] = 255  # image 1 is partly labelled: 256 labelled pixels, fewer than asked for
    batches = [(images[:2], targets[:2]), (images[2:], targets[2:])]
    features, labels = sample_pixels(extractor.activations, batches, pixels_per_image=300, budget_bytes=10**6,
                                     generator=torch.Generator().manual_seed(0))
    generator, expected, expected_labels = torch.Generator().manual_seed(0), [], []
    dense = extractor(images)
    for b in range(3):
        flat = targets[b].reshape(-1)
        index = (flat != 255).nonzero().squeeze(1)
        if index.numel() > 300:
            index = index[torch.randperm(index.numel(), generator=generator)[:300]]
        expected.append(dense[b].flatten(1)[:, index].T.half())
        expected_labels.append(flat[index])
    assert torch.equal(labels, torch.cat(expected_labels)) and features.shape == (300 + 256 + 300, 48)
    interpolation = (4 * 16 + 4) * torch.finfo(torch.float32).eps * dense.abs().max().item()
    torch.testing.assert_close(features.float(), torch.cat(expected).float(), rtol=2**-10, atol=interpolation)
    again, _ = sample_pixels(extractor.activations, batches, 300, 10**6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, features)


def test_pixel_sampling_keeps_a_uniform_sample_inside_the_budget():
    # identity "extractor": a pixel's feature is its image's id, so the kept pixels show where
    # they came from; 40 images x 50 labelled pixels into room for 200 (a 1-dim fp16 is 2 bytes)
    images = torch.arange(40.0).view(40, 1, 1, 1).expand(40, 1, 10, 5)
    targets = (torch.arange(40) % 3).view(40, 1, 1).expand(40, 10, 5)
    batches = [(images[i:i + 8], targets[i:i + 8]) for i in range(0, 40, 8)]
    features, labels = sample_pixels(lambda x: [x], batches, pixels_per_image=50, budget_bytes=400,
                                     generator=torch.Generator().manual_seed(0))
    assert features.shape == (200, 1) and features.numel() * features.element_size() <= 400
    source = features[:, 0].long()
    assert torch.equal(labels, source % 3)  # features and labels stay paired
    per_half = torch.bincount((source >= 20).long(), minlength=2)
    assert 70 <= per_half[0] <= 130 and 70 <= per_half[1] <= 130  # early and late images alike (uniform)
    assert len(torch.unique(features[:, 0])) > 30


def test_ensemble_architecture_and_init_follow_the_reference():
    small = PixelEnsemble(EnsembleConfig(in_features=20, num_classes=5, num_members=2))
    layers = [type(m).__name__ for m in small.members[0]]
    assert layers == ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert small.members[0][0].out_features == 128 and small.members[0][3].out_features == 32
    assert EnsembleConfig(in_features=20, num_classes=30).widths == (256, 128)
    weight = small.members[0][0].weight
    assert abs(weight.std().item() - 0.02) < 0.003 and small.members[0][0].bias.abs().sum() == 0
    assert not torch.equal(small.members[0][0].weight, small.members[1][0].weight)


def test_ensemble_learns_separable_pixels_and_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.randint(0, 3, (600,), generator=generator)
    features = (centres[labels] + torch.randn(600, 16, generator=generator)).half()
    ensemble = PixelEnsemble(EnsembleConfig(in_features=16, num_classes=3, num_members=3, max_epochs=5, patience=20))
    iterations = ensemble.fit(features, labels)
    assert all(i > 3 * 600 / 64 for i in iterations)  # early stopping only after min_epochs
    probs = ensemble(features)
    assert probs.shape == (3, 600, 3)
    assert (probs.mean(0).argmax(1) == labels).float().mean() > 0.95
    ensemble.save_pretrained(tmp_path)
    assert torch.equal(PixelEnsemble.from_pretrained(tmp_path)(features), probs)


def test_majority_vote_and_bald_over_members():
    one_hot = torch.eye(3)
    members = torch.stack([one_hot[0], one_hot[0], one_hot[2]])[:, None, :, None]  # [K=3, N=1, C=3, P=1]
    assert majority_vote(members).item() == 0
    p = torch.tensor([2 / 3, 0, 1 / 3])
    expected = -(p[p > 0] * p[p > 0].log()).sum()  # members are one-hot: no member entropy
    assert SCORES["bald"](members).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ensemble_members_are_the_k_axis_of_every_score():
    ensemble = PixelEnsemble(EnsembleConfig(in_features=8, num_classes=4, num_members=3))
    mc = ensemble.mc_probs(torch.randn(2, 8, 6, 5))
    assert mc.shape == (3, 2, 4, 6, 5)
    for name, score in SCORES.items():
        assert score(mc, torch.Generator().manual_seed(0)).shape == (2, 6, 5), name
    assert not math.isnan(float(SCORES["balent"](mc).mean()))
