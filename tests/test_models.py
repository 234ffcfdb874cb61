import pytest
import torch
from conftest import softmax_rtol

from al.mc import mc_moments, mc_probs
from al.moments import MCMoments
from al.models import ARCHITECTURES, Segmenter, build_segmenter, dropout_keep_mask

# Small smp configurations per architecture, 64x64 inputs (as smp's own model tests).
TINY = {
    "unet": dict(encoder="tu-resnet10t", encoder_depth=3, decoder_channels=(16, 8, 8)),
    "deeplabv3plus": dict(encoder="tu-resnet10t", encoder_depth=4, decoder_channels=16),
    "fpn": dict(encoder="tu-resnet10t", encoder_depth=5),
}


def tiny(arch, dropout=0.3):
    torch.manual_seed(0)
    return build_segmenter(arch, num_classes=5, dropout=dropout, **TINY[arch])


def test_every_architecture_has_a_tiny_config():
    assert set(TINY) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_backward_and_head(arch):
    model = tiny(arch)
    x = torch.rand(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 5, 64, 64)
    logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.net.segmentation_head[0].kernel_size == (1, 1)
    model.eval()
    assert torch.allclose(model(x), model.classify(model.features(x)))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_save_pretrained_round_trip(arch, tmp_path):
    model = tiny(arch).eval()
    x = torch.rand(1, 3, 64, 64)
    model.save_pretrained(tmp_path)
    loaded = Segmenter.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(x), model(x))


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Segmenter.from_pretrained(tmp_path)


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(KeyError, match="deeplabv3plus"):
        build_segmenter("segformer", "tu-resnet10t", 3)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mc_probs_runs_backbone_once_and_samples_the_head(arch):
    model = tiny(arch)
    calls = []
    model.net.encoder.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 3, 64, 64)
    probs = mc_probs(model, x, k=6, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (6, 2, 5, 64, 64)
    assert len(calls) == 1
    assert torch.allclose(probs.sum(2), torch.ones(6, 2, 64, 64), atol=1e-5)
    assert not torch.allclose(probs[0], probs[1])  # dropout differs between samples
    assert model.training  # mode restored


def test_mc_probs_is_reproducible_and_uses_eval_batchnorm():
    model = tiny("unet")
    x = torch.rand(2, 3, 64, 64)
    a = mc_probs(model, x, 4, torch.Generator().manual_seed(1))
    b = mc_probs(model, x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    no_dropout = tiny("unet", dropout=0.0)
    single = mc_probs(no_dropout, x[:1], 3)
    model_eval = no_dropout.eval()
    # mc_probs' in-place softmax vs Tensor.softmax on the same logits: rounding only
    torch.testing.assert_close(single[0], model_eval(x[:1]).softmax(1), rtol=softmax_rtol(5), atol=0)
    assert torch.allclose(single[0], single[2])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mc_moments_stream_the_same_samples_as_mc_probs(arch):
    """Same generator = same dropout masks: the streamed sums equal the sums of the stack."""
    model = tiny(arch)
    calls = []
    model.net.encoder.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 3, 64, 64)
    stack = mc_probs(model, x, 5, torch.Generator().manual_seed(3))
    streamed = mc_moments(model, x, 5, torch.Generator().manual_seed(3))
    expected = MCMoments.of(stack)
    assert streamed.shape == stack.shape and len(calls) == 2 and model.training
    # the stack's in-place softmax and Tensor.softmax round differently: float32 ulps of p <= 1
    for name in ("sum_p", "sum_p2", "sum_entropy"):
        torch.testing.assert_close(getattr(streamed, name), getattr(expected, name), rtol=1e-5, atol=5 * 2e-7 * 5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mc_moments_at_decoder_resolution_upsample_the_low_resolution_statistics(arch):
    model = tiny(arch)
    x = torch.rand(2, 3, 64, 64)
    low = mc_moments(model, x, 3, torch.Generator().manual_seed(2), at_decoder_resolution=True)
    features = model.eval().features(x)
    generator = torch.Generator().manual_seed(2)
    probs = torch.stack([model.classify(features, generator, True, upsample=False).softmax(1) for _ in range(3)])
    expected = MCMoments.of(probs)
    assert low.shape == (3, 2, 5, 64, 64)
    torch.testing.assert_close(low.sum_p, model.upsample(expected.sum_p), rtol=1e-6, atol=1e-6)
    assert (low.variance() >= 0).all()
    if arch == "unet":  # no upsampling in the head: the exact statistics
        exact = mc_moments(model, x, 3, torch.Generator().manual_seed(2))
        torch.testing.assert_close(low.sum_p2, exact.sum_p2, rtol=0, atol=0)


def test_mc_dropout_mean_matches_deterministic_prediction_in_expectation():
    """Inverted dropout keeps the expected logits: the mean logit over many masks is close to
    the no-dropout logit."""
    model = tiny("unet", dropout=0.5).eval()
    x = torch.rand(1, 3, 64, 64)
    features = model.features(x)
    generator = torch.Generator().manual_seed(0)
    mean = torch.stack([model.classify(features, generator, stochastic=True) for _ in range(400)]).mean(0)
    deterministic = model.classify(features)
    assert (mean - deterministic).abs().mean() < 0.1 * deterministic.abs().mean()


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.95])
def test_dropout_keep_mask_draws_independent_bernoullis_at_the_rounded_rate(keep):
    generator = torch.Generator().manual_seed(0)
    mask, rate = dropout_keep_mask((400, 1001), keep, generator)  # an odd count: the last word half used
    assert mask.shape == (400, 1001) and mask.dtype == torch.bool
    assert rate == round(keep * 65536) / 65536 and abs(rate - keep) <= 0.5 / 65536
    n, sigma = mask.numel(), (rate * (1 - rate) / mask.numel()) ** 0.5
    assert abs(mask.double().mean().item() - rate) < 5 * sigma
    flat = mask.flatten().double()
    for lag in (1, 2, 3, 4, 1001):  # slices of one 64-bit word, neighbouring words, the next row
        both = (flat[:-lag] * flat[lag:]).mean().item()
        assert abs(both - rate ** 2) < 5 * (rate ** 2 * (1 - rate ** 2) / (n - lag)) ** 0.5
    again, _ = dropout_keep_mask((400, 1001), keep, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert dropout_keep_mask((3, 4), 1.0)[0].all()
    with pytest.raises(ValueError, match="keep"):
        dropout_keep_mask((3, 4), 0.0)


def test_the_dropout_head_by_pixel_blocks_is_the_1x1_conv_of_the_masked_features(monkeypatch):
    """Blocks of 3 pixels (the last one ragged): each block's mask comes from the generator in
    turn, and the logits are the classifier's conv of the masked features, differentiably."""
    import torch.nn.functional as F

    from al import models

    model = tiny("unet", dropout=0.3).eval()
    features = model.features(torch.rand(2, 3, 64, 64)).detach()[:, :, :4, :5].requires_grad_()  # 20 pixels
    n, d = features.shape[:2]
    monkeypatch.setattr(models, "_HEAD_BLOCK_ELEMENTS", 3 * n * d)
    logits = model.classify(features, torch.Generator().manual_seed(5), stochastic=True)
    generator, masks = torch.Generator().manual_seed(5), []
    for start in range(0, 20, 3):
        mask, rate = dropout_keep_mask((n, d, min(3, 20 - start)), 0.7, generator)
        masks.append(mask)
    mask = torch.cat(masks, 2).unflatten(2, (4, 5))
    expected = F.conv2d(features * mask / rate, model.classifier.weight, model.classifier.bias)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert 0.5 < mask.float().mean() < 0.9  # a real mask, at about the keep rate
    logits.square().sum().backward()
    assert features.grad is not None and (features.grad[~mask] == 0).all() and features.grad[mask].abs().sum() > 0


def test_a_head_that_does_not_restore_the_input_size_is_refused():
    model = build_segmenter("fpn", "tu-resnet10t", 3, encoder_depth=3)
    with pytest.raises(ValueError, match="encoder_depth=3 predicts"):
        model(torch.rand(1, 3, 64, 64))


def test_mc_probs_equals_the_differentiable_head_sampler():
    from al.mc import sample_head

    model = tiny("unet").eval()
    x = torch.rand(2, 3, 64, 64)
    fast = mc_probs(model, x, 5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = sample_head(model, model.features(x), 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast, reference, rtol=softmax_rtol(5), atol=0)  # same logits, two softmaxes


@pytest.mark.slow
def test_encoder_blocks_after_the_last_returned_stage_are_dropped_and_old_folders_still_load(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_segmenter("unet", "tu-efficientnet_lite0", 5, encoder_depth=3, decoder_channels=(16, 8, 8)).eval()
    x = torch.rand(2, 3, 64, 64)
    model(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing left that feeds nothing
    # the same encoder as timm builds it, all blocks: same features from the kept weights
    full = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(0, 1, 2)).eval()
    missing, unexpected = full.load_state_dict(model.net.encoder.model.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("blocks.3.", "blocks.4.", "blocks.5.", "blocks.6.")) for k in missing)
    for ours, theirs in zip(model.net.encoder.model(x), full(x)):
        assert torch.equal(ours, theirs)
    # a folder saved before the blocks were dropped holds their weights too
    model.save_pretrained(tmp_path)
    state = {**{k: v.contiguous() for k, v in model.state_dict().items()},
             **{f"net.encoder.model.{k}": v.contiguous() for k, v in full.state_dict().items() if k in missing}}
    save_file(state, str(tmp_path / "model.safetensors"))
    assert torch.equal(Segmenter.from_pretrained(tmp_path)(x), model(x))
