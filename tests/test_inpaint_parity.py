"""Parity with diffusers: unguided, the sampler's known-region mode is StableDiffusionControlNetInpaintPipeline.

With a 4-channel UNet the pipeline encodes the image with each sample's generator (a posterior
sample, before the noise is drawn), starts from the image noised to the first of the last
``strength`` of the timesteps, and after every scheduler step puts back the image's latents noised
to the next timestep outside the mask (binarised, nearest to the latent grid); not after the last.
The sampler runs the same float ops on the same shapes, so the images must be *bitwise* equal, as
in ``test_diffusers_parity.py`` (whose reasons hold here too). The pipeline decodes the whole
latent and does not composite: pasting back (``guidedgen.instances``) is outside both.
"""

import pytest
import torch
from conftest import live_controlnets
from diffusers import StableDiffusionControlNetInpaintPipeline
from test_diffusers_parity import NEGATIVE, PALETTE, PROMPTS, SEEDS, STEPS, case, to_pil

from guidedgen.components import SCHEDULERS
from guidedgen.sampler import GuidedControlNetSampler, KnownRegion


def known_region(masks: torch.Tensor, strength: float) -> KnownRegion:
    """Real-looking images (multiples of 1/255, so PIL round-trips them) and regions: the digit pixels
    of each mask plus a block, so every sample has both known and regenerated latents."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (len(masks), 3, *masks.shape[1:]), generator=generator).float() / 255
    regenerate = masks > 0
    regenerate[:, 4:12, 4:12] = True
    return KnownRegion(images, regenerate, strength)


def pipeline_images(components, controls, known, guidance_scale, scales) -> torch.Tensor:
    multi = len(components.controlnets) > 1
    pipe = StableDiffusionControlNetInpaintPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, controlnet=components.controlnets if multi else components.controlnets[0],
        scheduler=components.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # one ControlNet: a PIL image per sample, as in test_diffusers_parity; several: a batch tensor per
    # ControlNet (this pipeline refuses a list per sample), the same floats as the PIL round trip
    images = [c.float() for c in controls] if multi else to_pil(controls[0])
    height, width = known.images.shape[2:]
    return pipe(PROMPTS, image=known.images, mask_image=known.regenerate[:, None].float(),
                control_image=images,
                height=height, width=width, strength=known.strength, num_inference_steps=STEPS,
                guidance_scale=guidance_scale, negative_prompt=[NEGATIVE] * len(PROMPTS),
                controlnet_conditioning_scale=scales if multi else scales[0],
                generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS], output_type="pt").images


def sampler_images(components, masks, extra, known, guidance_scale, scales) -> torch.Tensor:
    sampler = GuidedControlNetSampler(components, PALETTE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                                      controlnet_conditioning_scale=scales, negative_prompt=NEGATIVE)
    return sampler(masks, PROMPTS, SEEDS, extra_controls=extra, known=known).images


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("num_controlnets", [1, 2])
@pytest.mark.slow
def test_unguided_known_region_is_the_diffusers_inpaint_pipeline(num_controlnets, guidance_scale, strength,
                                                                 digit_masks_32):
    components, masks, extra, scales = case(digit_masks_32[0], num_controlnets)
    known = known_region(masks, strength)
    ours = sampler_images(components, masks, extra, known, guidance_scale, scales)
    theirs = pipeline_images(components, [PALETTE.colourise(masks), *extra], known, guidance_scale, scales)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_registered_scheduler_inpaints_as_in_the_pipeline(scheduler, digit_masks_32):
    components, masks, extra, scales = case(digit_masks_32[0], 1, scheduler)
    known = known_region(masks, 0.75)
    ours = sampler_images(components, masks, extra, known, 3.0, scales)
    assert torch.equal(ours, pipeline_images(components, [PALETTE.colourise(masks)], known, 3.0, scales))


def test_the_known_part_stays_the_image_and_the_region_changes(digit_masks_32):
    """Guidance moves only the regenerated latents; the known latents end as the image's own."""
    components = live_controlnets(case(digit_masks_32[0], 1)[0])
    masks = digit_masks_32[0][:len(PROMPTS)]
    known = known_region(masks, 0.75)
    sampler = GuidedControlNetSampler(components, PALETTE, num_inference_steps=STEPS, guidance_scale=3.0)
    run = sampler.prepare(masks, PROMPTS, SEEDS, known=known)
    for i in range(len(run.timesteps)):
        sampler.denoise_step(run, i)
    outside = run.region.expand_as(run.latents) == 0
    assert torch.equal(run.latents[outside], run.image_latents[outside])
    assert not torch.equal(run.latents[~outside], run.image_latents[~outside])
