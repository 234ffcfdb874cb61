"""guidedgen: components, palette, objectives, and the sampler's guidance properties."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EPS32, live_controlnets
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from al.config import ConfigError
from al.data import DIGIT_CLASSES
from guidedgen.components import ComponentsConfig, enable_xformers, load_components, tiny_components, weights_dtype
from guidedgen.guidance import OBJECTIVES, LogitsGuide, build_objective, last_layer_gradient_norm
from guidedgen.palette import (
    ADE20K_PALETTE,
    Palette,
    distinct_ade20k_colours,
    prompt_for,
)
from guidedgen.sampler import GRADIENT_PATHS, GuidedControlNetSampler, predicted_x0
from guidedgen.schedule import GuidanceSchedule

PALETTE = Palette(tuple(DIGIT_CLASSES), distinct_ade20k_colours(11))
PROMPTS = ["three, seven", "one", "nine, two", "four"]
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0)


def sample(components, masks, objective=None, strength=0.0, path="through_unet", steps=6, downsample=1, **schedule):
    sampler = GuidedControlNetSampler(components, PALETTE, objective, GuidanceSchedule(strength=strength, **schedule),
                                      gradient_path=path, num_inference_steps=steps, guidance_scale=2.0,
                                      decode_downsample=downsample)
    return sampler(masks, PROMPTS[: len(masks)], SEEDS[: len(masks)])


# -- components ------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_components_load_back_through_the_real_path(tmp_path, components, digit_masks_32):
    masks, _ = digit_masks_32
    folders = components.save_pretrained(tmp_path)
    loaded = load_components(ComponentsConfig(pretrained_model_name_or_path=str(tmp_path),
                                              controlnet_model_name_or_path=[str(f) for f in folders],
                                              local_files_only=True))
    assert torch.equal(sample(loaded, masks[:2]).images, sample(components, masks[:2]).images)


def test_fp16_off_cuda_loads_float32_and_says_so(tmp_path, components):
    with pytest.warns(UserWarning, match="fp16 on cpu: loading the models in float32"):
        assert weights_dtype("fp16", torch.device("cpu")) == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the asked dtype, silently, where it runs
        assert weights_dtype("fp16", torch.device("cuda")) == torch.float16
        assert weights_dtype("bf16", torch.device("cpu")) == torch.bfloat16
        assert weights_dtype("fp16") == torch.float16  # no device: the config's dtype
    components.save_pretrained(tmp_path)
    config = ComponentsConfig(pretrained_model_name_or_path=str(tmp_path), controlnet_model_name_or_path=[str(tmp_path / "controlnet")],
                              local_files_only=True, mixed_precision="fp16")
    with pytest.warns(UserWarning, match="float32"):
        loaded = load_components(config, weights_dtype(config.mixed_precision, torch.device("cpu")))
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}


@pytest.mark.parametrize("xformers_module", [None, "kernels without CUDA"])
def test_xformers_unavailable_keeps_pytorch_attention_and_says_why(monkeypatch, xformers_module):
    import sys
    import types

    from diffusers.models.attention_processor import AttnProcessor2_0

    # None in sys.modules makes the import fail; a bare module stands for an install on a CPU machine
    monkeypatch.setitem(sys.modules, "xformers", None if xformers_module is None else types.ModuleType("xformers"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    components = tiny_components(seed=0)
    reason = "cannot be imported" if xformers_module is None else "need CUDA"
    with pytest.warns(UserWarning, match=f"{reason}.*scaled-dot-product attention"):
        assert enable_xformers(components) is False
    assert {type(p) for p in components.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_missing_checkpoint_is_explained(tmp_path):
    with pytest.raises(OSError, match="cannot load the component set"):
        load_components(ComponentsConfig(pretrained_model_name_or_path=str(tmp_path / "none"),
                                         controlnet_model_name_or_path=[str(tmp_path)], local_files_only=True))


def test_two_controlnets_take_an_extra_control(digit_masks_32):
    masks, _ = digit_masks_32
    two = tiny_components(seed=0, num_controlnets=2)
    sampler = GuidedControlNetSampler(two, PALETTE, controlnet_conditioning_scale=[1.0, 0.5], num_inference_steps=3)
    out = sampler(masks[:1], PROMPTS[:1], SEEDS[:1], extra_controls=[torch.rand(1, 3, 32, 32)])
    assert out.images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="need 1 extra control"):
        sampler(masks[:1], PROMPTS[:1], SEEDS[:1])


# -- palette ---------------------------------------------------------------------------------
def test_palette_colours_masks_and_blackens_ignore():
    palette = Palette.from_ade20k(["wall", "sky", "car"])
    image = palette.colourise(torch.tensor([[[0, 1], [2, 255]]]))
    assert image.shape == (1, 3, 2, 2)
    assert torch.allclose(image[0, :, 0, 0] * 255, torch.tensor(ADE20K_PALETTE[0], dtype=torch.float32))
    assert torch.allclose(image[0, :, 1, 0] * 255, torch.tensor(ADE20K_PALETTE[20], dtype=torch.float32))  # car
    assert image[0, :, 1, 1].sum() == 0
    with pytest.raises(ValueError, match=r"class ids \[3\]"):
        palette.colourise(torch.tensor([[[3]]]))


def test_palette_mapping_and_warnings():
    palette = Palette.from_ade20k(["backdrop", "vehicle"], {"backdrop": "wall", "vehicle": "car"})
    assert palette.colours.tolist() == [ADE20K_PALETTE[0].tolist(), ADE20K_PALETTE[20].tolist()]
    with pytest.raises(KeyError, match="no ADE20K colour"):
        Palette.from_ade20k(["unicorn"])
    with pytest.warns(UserWarning, match="too close"):
        Palette(("a", "b"), np.array([[10, 10, 10], [12, 10, 10]], np.uint8))


def test_prompt_lists_present_classes():
    assert prompt_for(torch.tensor([[0, 3], [8, 8]]), DIGIT_CLASSES, "{classes}; photo") == "two, seven; photo"


# -- objectives ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_is_per_image_and_differentiable(name, guiding_segmenters, digit_masks_32):
    masks, _ = digit_masks_32
    objective = build_objective(name, guiding_segmenters)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    value = objective(images, masks[:2])
    assert value.shape == (2,) and torch.isfinite(value).all()
    value.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_unknown_objective_and_small_committee_are_explained(guiding_segmenters):
    with pytest.raises(KeyError, match="expected_model_change"):
        build_objective("uncertainty", guiding_segmenters)
    with pytest.raises(ValueError, match="at least 2 committee members"):
        build_objective("committee", guiding_segmenters[:1])


def test_any_segmentation_model_guides_through_logits_guide(digit_masks_32):
    """A user's own model (here a bare smp Unet at half resolution, as HF models return) guides
    entropy and committee objectives; last-layer objectives refuse it by name."""
    import segmentation_models_pytorch as smp

    masks, _ = digit_masks_32
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=11)
    half = lambda images: model(F.interpolate(images, scale_factor=0.5))  # noqa: E731 - logits at h/2, w/2
    guide = LogitsGuide(_Lambda(half))
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    value = build_objective("entropy", [guide])(images, masks[:2])
    probs = F.interpolate(half(images), size=(32, 32), mode="bilinear", align_corners=False).softmax(1)
    expected = (-(probs * probs.clamp_min(1e-12).log()).sum(1) * (masks[:2] != 255)).flatten(1).sum(1) / (
        (masks[:2] != 255).flatten(1).sum(1))
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    value.sum().backward()
    assert images.grad.abs().sum() > 0
    assert build_objective("committee", [guide, LogitsGuide(model)])(images, masks[:2]).shape == (2,)
    with pytest.raises(ConfigError, match="ExpectedModelChange needs guides that follow LastLayerGuide"):
        build_objective("expected_model_change", [guide])


class _Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, images):
        return self.fn(images)


def test_closed_form_last_layer_gradient_matches_autograd(guiding_segmenters, digit_masks_32):
    masks, _ = digit_masks_32
    segmenter = guiding_segmenters[0]
    images = torch.rand(2, 3, 32, 32)
    labels = masks[:2].clone()
    labels[0, :4] = 255
    features = segmenter.features(images)
    closed = last_layer_gradient_norm(segmenter.classifier_inputs(features), segmenter.classify(features).softmax(1), labels)
    conv = segmenter.classifier
    for i in range(2):
        weight, bias = conv.weight.detach().clone().requires_grad_(), conv.bias.detach().clone().requires_grad_()
        logits = segmenter.net.segmentation_head[1](torch.nn.functional.conv2d(features[i:i + 1], weight, bias))
        loss = torch.nn.functional.cross_entropy(logits, labels[i:i + 1], ignore_index=255)
        gw, gb = torch.autograd.grad(loss, [weight, bias])
        # two orders of summing <= 1024 pixel terms that barely cancel: <= 1024 eps32 = 1.2e-4 relative, worst case
        assert closed[i].item() == pytest.approx(torch.cat([gw.flatten(), gb]).norm().item(), rel=2e-4)


# -- sampler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_formula_matches_ddim_pred_original_sample(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)  # SD setting
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    sample_, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.step(output, t, sample_).pred_original_sample
    alpha_bar = scheduler.alphas_cumprod[t]
    ours = predicted_x0(output, sample_, alpha_bar, prediction_type)
    # the same formula in two codings (sqrt vs ** 0.5, ...): each of its ~4 float32 ops rounds by
    # <= eps of its terms, which are at most (|x| + |output|) / sqrt(alpha_bar) in size
    scale = (sample_.abs() + output.abs()) / alpha_bar.sqrt()
    assert ((ours - expected).abs() <= 8 * EPS32 * scale).all()


def test_x0_estimate_matches_euler_in_sigma_space(components, digit_masks_32):
    """Euler works in sigma space; the sampler's VP-form estimate must be the same clean latent."""
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[4]
    sampler = GuidedControlNetSampler(components, PALETTE)
    sampler.components = type(components)(**{**components.__dict__, "scheduler": scheduler})
    latents, output = torch.randn(1, 4, 8, 8) * scheduler.init_noise_sigma, torch.randn(1, 4, 8, 8)
    ours = sampler.x0_estimate(latents, output, t)
    expected = scheduler.step(output, t, latents).pred_original_sample
    # x - sigma * eps against (x / sqrt(sigma^2 + 1) - sqrt(1 - a) eps) / sqrt(a): ~10 float32 roundings
    # between them (and sigma from float64, a from float32), each <= eps of the terms |x| + sigma |eps|
    scale = latents.abs() + float(scheduler.sigmas[4]) * output.abs()
    assert ((ours - expected).abs() <= 16 * EPS32 * scale).all()


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.slow
def test_strength_zero_is_bit_identical_to_unguided(downsample, components, guiding_segmenters, digit_masks_32):
    masks, _ = digit_masks_32
    objective = build_objective("entropy", guiding_segmenters)
    plain = sample(components, masks)
    assert torch.equal(sample(components, masks, objective, strength=0.0, downsample=downsample).images, plain.images)
    assert not torch.equal(sample(components, masks, objective, strength=0.3, downsample=downsample).images, plain.images)


@pytest.mark.slow
def test_samples_do_not_depend_on_their_batch(components, digit_masks_32):
    masks, _ = digit_masks_32
    together = sample(components, masks).images
    alone = GuidedControlNetSampler(components, PALETTE, num_inference_steps=6, guidance_scale=2.0)(
        masks[2:3], PROMPTS[2:3], SEEDS[2:3]).images
    # batch 4 vs 1 re-blocks every GEMM and convolution sum: <= ~sqrt(288) eps32 = 2e-6 relative per
    # layer, over ~40 layers x 6 steps and the decode, ~5e-4 on [0, 1] images (another seed moves them ~1)
    assert (together[2:3] - alone).abs().max() <= 1e-3


@pytest.mark.slow
def test_a_negative_mask_changes_only_what_cfg_compares_against(digit_masks_32):
    masks, _ = digit_masks_32
    live = live_controlnets(tiny_components(seed=0))
    against_background = GuidedControlNetSampler(live, PALETTE, num_inference_steps=6, guidance_scale=2.0,
                                                 negative_mask_fill=0)
    assert not torch.equal(against_background(masks, PROMPTS, SEEDS).images, sample(live, masks).images)
    # a mask of only the fill value: both branches see the same control again
    empty = torch.zeros_like(masks)
    assert torch.equal(against_background(empty, PROMPTS, SEEDS).images, sample(live, empty).images)
    with pytest.raises(ValueError, match="negative_mask_fill=42"):
        GuidedControlNetSampler(live, PALETTE, negative_mask_fill=42)


@pytest.mark.parametrize("name", ["entropy", "committee", "expected_model_change"])
@pytest.mark.parametrize("path", GRADIENT_PATHS)
@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.slow
def test_guidance_raises_the_objective_it_follows(name, path, downsample, components, guiding_segmenters, digit_masks_32):
    masks, _ = digit_masks_32
    objective = build_objective(name, guiding_segmenters)
    plain = sample(components, masks)
    guided = sample(components, masks, objective, strength=0.3, path=path, downsample=downsample)
    # judged through the view that guidance follows (at downsample 1: the final images): the tiny set's
    # random VAE does not decode a block-averaged latent to a smaller copy of the full image, so whether
    # the gain carries over to full resolution is measured on the trained model (benchmarks/guidance_overhead.py)
    view = GuidedControlNetSampler(components, PALETTE, objective, decode_downsample=downsample)
    with torch.no_grad():
        before, after = view.guided_objective(plain.latents, masks), view.guided_objective(guided.latents, masks)
    assert after.mean() > before.mean()
    assert all(len(t.objective) == 5 for t in guided.traces)  # steps 0..4 of 6 (window [0, 0.8))


@pytest.mark.parametrize("name,strengths", [
    ("committee", (0.0, 0.05, 0.2)),
    ("expected_model_change", (0.0, 0.05, 0.2)),
    ("entropy", (0.0, 0.02, 0.05)),  # near ln(C) on the tiny set's noise-like images: low range only
])
@pytest.mark.slow
def test_final_objective_rises_with_strength(name, strengths, components, guiding_segmenters, digit_masks_32):
    """The paper's Figure 4 property, in the range where the tiny set has not yet overshot."""
    masks, _ = digit_masks_32
    objective = build_objective(name, guiding_segmenters)
    values = []
    for strength in strengths:
        with torch.no_grad():
            values.append(objective(sample(components, masks, objective, strength=strength).images, masks).mean().item())
    assert values[0] < values[1] < values[2], values


@pytest.mark.slow
def test_non_finite_gradient_skips_the_update_with_a_warning(components, digit_masks_32):
    masks, _ = digit_masks_32

    def broken(images, masks_):
        return (images * float("nan")).flatten(1).sum(1)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = sample(components, masks[:2], broken, strength=0.5)
    assert torch.isfinite(out.images).all()
    assert "non-finite gradient" in out.traces[0].warnings[0]
    assert torch.equal(out.images, sample(components, masks[:2]).images)


def test_bad_masks_are_explained(components):
    sampler = GuidedControlNetSampler(components, PALETTE, num_inference_steps=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        sampler(torch.zeros(1, 30, 30, dtype=torch.long), ["x"], [0])
    with pytest.raises(ValueError, match="integer class ids"):
        sampler(torch.zeros(1, 32, 32), ["x"], [0])
    with pytest.raises(ValueError, match="counts must match"):
        sampler(torch.zeros(2, 32, 32, dtype=torch.long), ["x"], [0, 1])
    with pytest.raises(ValueError, match=r"class ids \[42\]"):
        sampler(torch.full((1, 32, 32), 42), ["x"], [0])
    with pytest.raises(ValueError, match="divisible by decode_downsample=16"):  # 32 px = 8x8 latents
        GuidedControlNetSampler(components, PALETTE, decode_downsample=16)(torch.zeros(1, 32, 32, dtype=torch.long), ["x"], [0])
    with pytest.raises(ValueError, match="decode_downsample=0"):
        GuidedControlNetSampler(components, PALETTE, decode_downsample=0)


# Two float paths of one guided step are compared in float64. The gradient of a segmenter's objective
# is not a smooth function of rounding: a ReLU or max whose input sits within rounding of its kink
# switches its derivative, so float32 paths that differ by 1e-7 in every value can differ by 3e-3 in
# the gradient (seen on an AMD EPYC, batch 4 vs 1). In float64 each value carries ~1e-16 and such flips
# need an input within 1e-16 of a kink; the float32 run's observed amplification (3e-3 / 1.2e-7,
# ~3e4) puts two float64 paths within ~1e-11 of the gradient's size, and 1e-9 leaves a 100x margin.
# What the compared paths could break (a batch-wide normalisation, a shared generator, a wrong slice)
# moves the update by O(1).
FLOAT64_RTOL = 1e-9


def float64_sampler(segmenters, components=None, objective="entropy", options=None, **kwargs) -> GuidedControlNetSampler:
    import copy

    components = (components or tiny_components(seed=0)).to("cpu", torch.float64)
    objective = build_objective(objective, [copy.deepcopy(s).double() for s in segmenters], **(options or {}))
    return GuidedControlNetSampler(components, PALETTE, objective, num_inference_steps=kwargs.pop("steps", 4),
                                   guidance_scale=2.0, **kwargs)


def assert_close_at_float64(ours: torch.Tensor, reference: torch.Tensor):
    assert ours.dtype == torch.float64
    assert (ours - reference).abs().max() <= FLOAT64_RTOL * reference.abs().max()


@pytest.mark.slow
def test_vae_gradient_checkpointing_and_slicing_change_nothing(guiding_segmenters, digit_masks_32):
    """Compared at one guided step (the gradient and the update the savers could break), not after a
    guided loop, whose normalised updates amplify rounding step after step."""
    masks, _ = digit_masks_32
    steps, runs = [], []
    for savers in ({}, dict(vae_gradient_checkpointing=True, vae_slicing=True)):
        sampler = float64_sampler(guiding_segmenters, tiny_components(seed=3), schedule=GuidanceSchedule(strength=0.1),
                                  **savers)
        runs.append(sampler.prepare(masks[:2], PROMPTS[:2], SEEDS[:2]))
        steps.append(sampler.guidance_step(runs[-1], 0))
    plain, saving = steps
    assert plain.gradient.abs().max() > 0
    assert_close_at_float64(saving.gradient, plain.gradient)
    assert_close_at_float64(saving.update, plain.update)
    assert torch.equal(plain.output, saving.output)  # the UNet pass does not touch the VAE
    # guidance is applied: the update's RMS is the strength times the noise level
    noise_level = float((1 - sampler.components.scheduler.alphas_cumprod[int(runs[0].timesteps[0])]).sqrt())
    rms = plain.update.flatten(1).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.1 * noise_level), rtol=1e-9)


@pytest.mark.parametrize("objective,options", [("entropy", {}), ("mc_dropout_std", {}),
                                               ("expected_model_change", {"labels": "sampled"})])
def test_a_sample_guided_alone_gets_the_gradient_it_gets_in_a_batch(guiding_segmenters, digit_masks_32, objective,
                                                                   options):
    """Per-sample generators (also for the objectives' own random draws: dropout masks, sampled
    labels) and per-sample normalisation: one guided step of sample 2 does not depend on the batch
    around it, and a step taken again (a resumed run) draws the same (compared at one step; after a
    guided loop rounding is amplified)."""
    masks, _ = digit_masks_32
    sampler = float64_sampler(guiding_segmenters, objective=objective, options=options,
                              schedule=GuidanceSchedule(strength=0.3), steps=6)
    together = sampler.guidance_step(sampler.prepare(masks, PROMPTS, SEEDS), 1)
    alone = sampler.guidance_step(sampler.prepare(masks[2:3], PROMPTS[2:3], SEEDS[2:3]), 1)
    again = sampler.guidance_step(sampler.prepare(masks[2:3], PROMPTS[2:3], SEEDS[2:3]), 1)
    for name in ("output", "gradient", "value", "update"):
        assert_close_at_float64(getattr(together, name)[2:3], getattr(alone, name))
        assert torch.equal(getattr(again, name), getattr(alone, name))
    assert not torch.allclose(together.update[1:2], alone.update)  # the samples do differ


def test_quality_flags_degenerate_images_and_disagreement(guiding_segmenters, digit_masks_32):
    from guidedgen.quality import assess

    masks, dataset = digit_masks_32
    images = torch.stack([dataset[0].image, torch.zeros(3, 32, 32)])
    qualities, disagree = assess(guiding_segmenters[0], images, masks[:2])
    assert not qualities[0].degenerate and qualities[1].degenerate
    assert 0.0 <= qualities[0].mask_miou <= 1.0
    prediction = guiding_segmenters[0](images).argmax(1)
    assert torch.equal(disagree, prediction != masks[:2])


def test_dropped_samples_count_as_done_but_are_not_read(tmp_path):
    from al.data import load_folder
    from guidedgen.writer import GenerationWriter

    writer = GenerationWriter(tmp_path, ["bg", "a"], [[0, 0, 0], [255, 0, 0]], {"k": 1})
    writer.write(0, np.zeros((8, 8, 3), np.uint8) + 100, np.zeros((8, 8), np.uint8), None, {})
    writer.drop(1, "degenerate", {"seed": 5})
    again = GenerationWriter(tmp_path, ["bg", "a"], [[0, 0, 0], [255, 0, 0]], {"k": 1})
    assert again.pending(range(3)) == [2]
    assert load_folder(tmp_path).ids == ["000000"]


@pytest.mark.parametrize("scheduler", ["ddim", "unipc", "dpm_solver", "euler"])
@pytest.mark.slow
def test_every_registered_scheduler_samples_with_guidance(scheduler, guiding_segmenters, digit_masks_32):
    masks, _ = digit_masks_32
    objective = build_objective("entropy", guiding_segmenters)
    components = tiny_components(seed=0, scheduler=scheduler)
    out = GuidedControlNetSampler(components, PALETTE, objective, GuidanceSchedule(strength=0.1),
                                  num_inference_steps=4, guidance_scale=2.0)(masks[:2], PROMPTS[:2], SEEDS[:2])
    assert torch.isfinite(out.images).all() and len(out.traces[0].objective) == 3
