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


def channel_masked_logits(model, features, k, generator, upsample=True):
    """The head by its definition, independently of al.mc: per image n and sample j, input
    channels dropped with the j-th mask of n drawn in (n, k, d) order, then the 1x1 conv, then
    the head's upsampling of the logits. ``[N, D, h, w] -> [K, N, C, H, W]``."""
    import torch.nn.functional as F

    n, d = features.shape[:2]
    mask, rate = dropout_keep_mask((n, k, d), 1 - model.config.dropout, generator)
    logits = torch.stack([F.conv2d(features * mask[:, j, :, None, None] / rate, model.classifier.weight,
                                   model.classifier.bias) for j in range(k)])
    return model.upsample(logits.flatten(0, 1)).unflatten(0, (k, n)) if upsample else logits


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mc_moments_at_decoder_resolution_upsample_the_low_resolution_statistics(arch):
    model = tiny(arch)
    x = torch.rand(2, 3, 64, 64)
    low = mc_moments(model, x, 3, torch.Generator().manual_seed(2), at_decoder_resolution=True)
    with torch.no_grad():
        features = model.eval().features(x)
        expected = MCMoments.of(channel_masked_logits(model, features, 3, torch.Generator().manual_seed(2),
                                                      upsample=False).softmax(2))
    assert low.shape == (3, 2, 5, 64, 64)
    torch.testing.assert_close(low.sum_p, model.upsample(expected.sum_p), rtol=1e-5, atol=1e-5)
    assert (low.variance() >= 0).all()
    if arch == "unet":  # no upsampling in the head: the exact statistics
        exact = mc_moments(model, x, 3, torch.Generator().manual_seed(2))
        torch.testing.assert_close(low.sum_p2, exact.sum_p2, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mc_moments_equal_the_stack_of_the_head_by_definition_to_float64_rounding(arch, monkeypatch):
    """In float64 (so that only the order of operations differs): the fused blocks (features
    upsampled before the K classifiers, ragged pixel blocks, logits folded straight into the
    sums) give the moments, and BalEnt, of the channel-masked head as defined, far inside the
    1e-8 bar of the streamed-BalEnt test."""
    from al import mc, scores

    monkeypatch.setattr(mc, "_BLOCK_ELEMENTS", 3 * 5 * 1000)  # 4096 pixels in blocks of 820, the last 816
    model = tiny(arch).double()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    fused = mc_moments(model, x, 3, torch.Generator().manual_seed(7))
    with torch.no_grad():
        stack = channel_masked_logits(model, model.eval().features(x), 3, torch.Generator().manual_seed(7)).softmax(2)
    expected = MCMoments.of(stack)
    assert fused.shape == stack.shape
    for name in ("sum_p", "sum_p2", "sum_entropy"):
        torch.testing.assert_close(getattr(fused, name), getattr(expected, name), rtol=1e-12, atol=1e-12)
    for name in ("balent", "bald", "entropy"):
        torch.testing.assert_close(scores.SCORES[name](fused), scores.SCORES[name](expected), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(mc_probs(model, x, 3, torch.Generator().manual_seed(7)), stack, rtol=1e-12, atol=1e-12)


def test_thinned_classifiers_keep_the_weights_in_expectation_and_each_pixel_sees_element_wise_dropout():
    """Sample j of image n is W with input channels dropped (one draw per image, sample and
    channel, scaled by the keep rate): its mean over samples is W, and a single pixel's logit has
    the variance of element-wise dropout before the classifier, sum_d (W f)_d^2 (1 - q) / q."""
    from al.mc import thinned_classifiers

    model = tiny("unet", dropout=0.3)
    generator = torch.Generator().manual_seed(0)
    weights = thinned_classifiers(model, 2, 4000, generator).detach()  # [N, K, C, D]
    w = model.classifier.weight.detach().flatten(1)
    dropped = weights == 0
    assert torch.equal(dropped, dropped[:, :, :1].expand_as(dropped))  # a dropped channel: every class's weight
    assert not torch.equal(dropped[0], dropped[1])  # images draw their own masks
    q = 1 - dropped[..., 0, :].double().mean().item()
    assert abs(q - 0.7) < 5 * (0.21 / dropped[..., 0, :].numel()) ** 0.5
    features = torch.randn(w.shape[1])
    logits = weights[0].double() @ features.double()  # [K, C]: one pixel, 4000 samples
    expected_var = ((w.double() * features.double()) ** 2).sum(1) * 0.3 / 0.7
    torch.testing.assert_close(logits.mean(0), (w @ features).double(), atol=5 * (expected_var.max() / 4000) ** 0.5, rtol=0)
    torch.testing.assert_close(logits.var(0), expected_var, rtol=0.15, atol=0)


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


def test_sample_head_is_the_channel_masked_head_and_differentiable():
    """One sample: the gradient reaches exactly the channels its image kept."""
    from al.mc import sample_head

    model = tiny("deeplabv3plus", dropout=0.5).eval()
    features = model.features(torch.rand(2, 3, 64, 64)).detach().requires_grad_()
    probs = sample_head(model, features, 1, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = channel_masked_logits(model, features, 1, torch.Generator().manual_seed(5)).softmax(2)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    probs[:, :, 0].square().sum().backward()
    mask, _ = dropout_keep_mask((2, 1, features.shape[1]), 0.5, torch.Generator().manual_seed(5))
    reached = features.grad.abs().flatten(2).sum(2) > 0  # [N, D]
    assert torch.equal(reached, mask[:, 0]) and 0 < mask.sum() < mask.numel()


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
