"""Parity with diffusers: unguided, GuidedControlNetSampler is StableDiffusionControlNetPipeline.

Same components, scheduler, per-sample generators, prompts, negative prompts, CFG and
conditioning scales, one and two ControlNets. The images must be *bitwise* equal: the sampler runs
the pipeline's float ops on the same shapes in the same order (latents drawn per generator, the
negatives and prompts encoded as two batches, [negative; positive] CFG batches, contiguous NCHW
control images, the same decode and [0, 1] mapping), and a CPU kernel gives the same bits for the
same inputs, shapes and memory layout on any machine. So any difference is a real divergence, not
rounding noise; the two it found (a channels-last control image, one text batch of 2N) are fixed.

Deliberate differences, not exercised by the pipeline call here: ``negative_mask_fill`` (the CFG
negative branch sees another mask; the pipeline gives both branches the same control image) and
the default negative prompt (``DEFAULT_NEGATIVE_PROMPT``; the pipeline's default is "").
"""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import live_controlnets
from diffusers import StableDiffusionControlNetPipeline

from al.data import DIGIT_CLASSES
from guidedgen.components import SCHEDULERS, tiny_components
from guidedgen.palette import Palette, distinct_ade20k_colours
from guidedgen.sampler import GuidedControlNetSampler

PALETTE = Palette(tuple(DIGIT_CLASSES), distinct_ade20k_colours(11))
PROMPTS = ["three, seven", "one", "nine, two"]
SEEDS = [11, 12, 13]
NEGATIVE = "low quality"
STEPS = 4


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """``[N, 3, H, W]`` in [0, 1] holding multiples of 1/255 -> N RGB images (exact round trip)."""
    return [PIL.Image.fromarray(a) for a in (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()]


def pipeline_images(components, controls, guidance_scale, scales) -> torch.Tensor:
    """diffusers' own pipeline on PIL control images (one list per ControlNet), output ``[N, 3, H, W]``."""
    multi = len(components.controlnets) > 1
    pipe = StableDiffusionControlNetPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, controlnet=components.controlnets if multi else components.controlnets[0],
        scheduler=components.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = [to_pil(c) for c in controls]
    return pipe(PROMPTS, image=[list(per_sample) for per_sample in zip(*images)] if multi else images[0],
                num_inference_steps=STEPS, guidance_scale=guidance_scale, negative_prompt=[NEGATIVE] * len(PROMPTS),
                controlnet_conditioning_scale=scales if multi else scales[0],
                generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS], output_type="pt").images


def sampler_images(components, masks, extra, guidance_scale, scales, **options) -> torch.Tensor:
    sampler = GuidedControlNetSampler(components, PALETTE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                                      controlnet_conditioning_scale=scales, negative_prompt=NEGATIVE, **options)
    return sampler(masks, PROMPTS, SEEDS, extra_controls=extra).images


def case(masks, num_controlnets, scheduler="ddim"):
    """Components with live ControlNets, the mask batch, the extra (uint8-valued) controls, the scales."""
    components = live_controlnets(tiny_components(seed=0, num_controlnets=num_controlnets, scheduler=scheduler))
    rng = np.random.default_rng(0)
    extra = [torch.from_numpy(rng.integers(0, 256, (len(PROMPTS), 3, *masks.shape[1:]), dtype=np.uint8)).float() / 255
             for _ in range(num_controlnets - 1)]
    return components, masks[:len(PROMPTS)], extra, [1.5, 0.5][:num_controlnets]


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("num_controlnets", [1, 2])
@pytest.mark.slow
def test_unguided_sampler_is_the_diffusers_pipeline(num_controlnets, guidance_scale, digit_masks_32):
    components, masks, extra, scales = case(digit_masks_32[0], num_controlnets)
    ours = sampler_images(components, masks, extra, guidance_scale, scales)
    theirs = pipeline_images(components, [PALETTE.colourise(masks), *extra], guidance_scale, scales)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    if guidance_scale > 1:  # the deliberate difference: a negative mask changes what CFG compares against
        assert not torch.equal(sampler_images(components, masks, extra, guidance_scale, scales, negative_mask_fill=0),
                               theirs)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_registered_scheduler_steps_as_in_the_pipeline(scheduler, digit_masks_32):
    components, masks, extra, scales = case(digit_masks_32[0], 1, scheduler)
    ours = sampler_images(components, masks, extra, 3.0, scales)
    assert torch.equal(ours, pipeline_images(components, [PALETTE.colourise(masks)], 3.0, scales))
