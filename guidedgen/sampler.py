"""GuidedControlNetSampler: ControlNet denoising with x0-estimate guidance by a segmenter.

At each guided step t (docs/methods.md#guided-sampling):
1. predict the noise with UNet + ControlNet(s) (with classifier-free guidance);
2. form the one-step estimate ``z0_hat`` from the model output and ``alphas_cumprod``;
3. decode it with the VAE (or a tiny distilled decoder, ``guidedgen.guidance_decoder``) and evaluate
   the informativeness objective against the mask (optionally at 1/n resolution, ``guidedgen.resolution``);
4. move ``z_t`` along the normalised gradient of the objective (ascent); then the ordinary
   scheduler step, reusing the noise prediction of step 1 (one UNet forward per step).

With a ``KnownRegion`` (instance-level augmentation, ``guidedgen.instances``) only part of a real
image is regenerated: as diffusers' ``StableDiffusionControlNetInpaintPipeline`` does for a
4-channel UNet, the image's noised latents replace the known part after every scheduler step; the
objective reads the x0 estimate with the known latents filled in, against the mask of the
regenerated part only, and the update moves only that part.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from torch import Tensor
from tqdm.auto import tqdm

from guidedgen.components import Components
from guidedgen.guidance_decoder import check_guidance_decoder, decode_latents, to_unit_range, upsampling_factor
from guidedgen.palette import DEFAULT_NEGATIVE_PROMPT, Palette
from guidedgen.resolution import downsample_latents, downsample_masks
from guidedgen.schedule import GuidanceSchedule

GRADIENT_PATHS = ("through_unet", "x0_shortcut")
DECODER_IMAGES = ("tiny", "vae")  # with a guidance decoder: whose image the objective reads
Objective = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleTrace:
    """What guidance did to one sample."""

    steps: list[int] = field(default_factory=list)  # guided step indices
    objective: list[float] = field(default_factory=list)  # objective value at each guided step
    gradient_norm: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "guided_steps": len(self.steps),
            "objective_first": self.objective[0] if self.objective else None,
            "objective_last": self.objective[-1] if self.objective else None,
            "gradient_norm_mean": sum(self.gradient_norm) / len(self.gradient_norm) if self.gradient_norm else None,
            "warnings": self.warnings,
        }


@dataclass
class SamplerOutput:
    images: Tensor  # [N, 3, H, W] in [0, 1]
    latents: Tensor  # [N, 4, h, w] final latents
    traces: list[SampleTrace]


@dataclass
class KnownRegion:
    """Inpainting: keep ``images`` outside ``regenerate`` (diffusers' ControlNet-inpaint pipeline with a
    4-channel UNet). ``strength`` < 1 runs only the last share of the schedule, from the noised image.

    Shape: ``images [N, 3, H, W]`` in [0, 1], ``regenerate [N, H, W]`` bool.
    """

    images: Tensor
    regenerate: Tensor
    strength: float = 1.0

    def check(self, mask_shape: torch.Size) -> None:
        n, height, width = mask_shape
        if tuple(self.images.shape) != (n, 3, height, width) or tuple(self.regenerate.shape) != (n, height, width):
            raise ValueError(f"known region: images {tuple(self.images.shape)} and regenerate {tuple(self.regenerate.shape)} "
                             f"must be [{n}, 3, {height}, {width}] and [{n}, {height}, {width}] for masks {tuple(mask_shape)}")
        if self.regenerate.dtype != torch.bool:
            raise ValueError(f"known region: regenerate must be a bool mask, got {self.regenerate.dtype}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"known region: strength={self.strength}; must be in (0, 1] (1 = from pure noise)")


@dataclass
class Denoising:
    """The state of one batch's denoising loop (``GuidedControlNetSampler.prepare``)."""

    embeddings: Tensor  # [2N or N, L, D] prompt embeddings (negatives first with CFG)
    controls: list[Tensor]  # per ControlNet: [2N or N, 3, H, W]
    timesteps: Tensor
    latents: Tensor  # [N, 4, h, w], updated by each step
    objective_masks: Tensor  # [N, H, W]: the masks, ignore outside a known region's regenerated part
    noise: Tensor  # [N, 4, h, w] initial noise
    image_latents: Optional[Tensor] = None  # [N, 4, h, w] of a known region's images
    region: Optional[Tensor] = None  # [N, 1, h, w] 1 where generated, 0 where known
    traces: list[SampleTrace] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # one per sample

    def step_generators(self, step: int, device: torch.device) -> list[torch.Generator]:
        """One generator per sample for an objective's random draws at ``step``, seeded from (the
        sample's seed, the step): the draws depend on neither the batch nor an earlier step, so a
        sample is the same in any batch, process count or resumed run."""
        return [torch.Generator(device).manual_seed(
            int.from_bytes(hashlib.sha256(f"{seed}/guidance/{step}".encode()).digest()[:8], "little") >> 1)
            for seed in self.seeds]

    def fill_known(self, x0: Tensor) -> Tensor:
        """The x0 estimate with the known latents outside the regenerated part (what the loop will keep)."""
        return x0 if self.region is None else (1 - self.region) * self.image_latents + self.region * x0


@dataclass
class GuidanceStep:
    output: Tensor  # [N, 4, h, w] model output (CFG applied)
    gradient: Tensor  # [N, 4, h, w] of the objective w.r.t. the latents (zeroed where not finite or known)
    value: Tensor  # [N] objective
    update: Tensor  # [N, 4, h, w] added to the latents
    finite: Tensor  # [N] bool


def predicted_x0(model_output: Tensor, model_input: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """One-step clean-latent estimate from the (VP-scaled) model input.

    See formula (12) of the DDIM paper: ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``; for
    v-prediction ``x0 = sqrt(a) x_t - sqrt(1 - a) v``; for sample prediction the output itself.
    """
    if prediction_type == "epsilon":
        return (model_input - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * model_input - (1 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


class GuidedControlNetSampler:
    """Call with ``(masks, prompts, seeds)``; returns images and a per-sample trace.

    Strength 0 or no objective gives exactly the unguided ControlNet sampling for the same seeds:
    bit for bit diffusers' ``StableDiffusionControlNetPipeline`` with ``output_type="pt"``, one
    ``torch.Generator("cpu").manual_seed(seed)`` per sample, the palette images as control images
    and the same scheduler, CFG and conditioning scales (``tests/test_diffusers_parity.py``).
    Two differences are deliberate: ``negative_mask_fill`` below, and the default
    ``negative_prompt`` (``DEFAULT_NEGATIVE_PROMPT``; the pipeline's is "").

    ``negative_mask_fill``: with classifier-free guidance, the negative branch's seg control is the
    palette image of a mask filled with this value (a class id, or the ignore index = no label),
    so CFG amplifies the mask as well as the prompt. None: both branches see the mask, as in
    diffusers' ControlNet pipeline. Extra controls are the same in both branches.

    ``decode_downsample``: the objective sees the x0 estimate decoded from its latent averaged over
    n x n blocks, against the mask read at the same grid (n = 1: full resolution, the exact path).
    The final images are always decoded at full resolution.

    ``guidance_decoder``: an ``AutoencoderTiny`` the objective's view of the x0 estimate is decoded
    with instead of the VAE (``guidedgen.guidance_decoder``); the guidance gradient then flows through
    it only (and through the UNet with ``through_unet``). The final images are always decoded by the VAE.

    ``decoder_image`` (with a ``guidance_decoder``): which decoder's image the objective reads.
    ``"tiny"``: the tiny decoder's. ``"vae"``: the full VAE's, decoded without a graph, while the
    gradient still flows through the tiny decoder (straight through: ``vae(z) + tiny(z) -
    stop_gradient(tiny(z))``). The objective's image gradient is then the exact path's, and only the
    Jacobian it is carried back through is the tiny decoder's; costs one full decoder forward.
    """

    def __init__(
        self,
        components: Components,
        palette: Palette,
        objective: Optional[Objective] = None,
        schedule: Optional[GuidanceSchedule] = None,
        gradient_path: str = "through_unet",
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        controlnet_conditioning_scale: Sequence[float] = (1.0,),
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        negative_mask_fill: Optional[int] = None,
        decode_downsample: int = 1,
        vae_gradient_checkpointing: bool = False,
        vae_slicing: bool = False,
        guidance_decoder: Optional[AutoencoderTiny] = None,
        decoder_image: str = "tiny",
        progress: bool = False,
    ):
        if gradient_path not in GRADIENT_PATHS:
            raise ValueError(f"gradient_path={gradient_path!r}; choose one of {GRADIENT_PATHS}")
        if len(controlnet_conditioning_scale) != len(components.controlnets):
            raise ValueError(f"{len(controlnet_conditioning_scale)} conditioning scales for "
                             f"{len(components.controlnets)} ControlNets")
        self.components, self.palette, self.objective = components, palette, objective
        self.schedule = schedule if schedule is not None else GuidanceSchedule()
        self.gradient_path, self.num_inference_steps = gradient_path, num_inference_steps
        self.guidance_scale, self.conditioning_scales = guidance_scale, list(controlnet_conditioning_scale)
        self.negative_prompt, self.progress = negative_prompt, progress
        if negative_mask_fill is not None and negative_mask_fill not in (*range(len(palette.classes)), palette.ignore_index):
            raise ValueError(f"negative_mask_fill={negative_mask_fill} is neither a class id 0..{len(palette.classes) - 1} "
                             f"nor the ignore index {palette.ignore_index}")
        self.negative_mask_fill = negative_mask_fill
        if not isinstance(decode_downsample, int) or decode_downsample < 1:
            raise ValueError(f"decode_downsample={decode_downsample!r}; must be an integer >= 1 (1 = full resolution)")
        self.decode_downsample = decode_downsample
        vae = components.vae
        if vae_gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        if vae_slicing:
            vae.enable_slicing()
        self.vae_factor = upsampling_factor(vae)
        if guidance_decoder is not None:
            check_guidance_decoder(guidance_decoder, vae)
            if (guidance_decoder.device, guidance_decoder.dtype) != (vae.device, vae.dtype):  # fp16 on CUDA when the VAE is
                guidance_decoder.to(device=vae.device, dtype=vae.dtype)
        self.guidance_decoder = guidance_decoder
        if decoder_image not in DECODER_IMAGES:
            raise ValueError(f"decoder_image={decoder_image!r}; choose one of {DECODER_IMAGES}")
        self.decoder_image = decoder_image

    @property
    def size_multiple(self) -> int:
        """Mask sides must be multiples of this: the VAE's factor x the UNet's down-sampling (64 for SD-1.5)."""
        return self.vae_factor * 2 ** (len(self.components.unet.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.components.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.unet.dtype

    # -- pieces --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """``[2N, L, D]`` (negative first) with CFG, else ``[N, L, D]``.

        The negatives and the prompts are two batches of N, as in diffusers' ``encode_prompt``, so
        the text encoder runs the pipeline's float ops (one batch of 2N may round differently)."""
        batches = ([[self.negative_prompt] * len(prompts)] if self.do_cfg else []) + [list(prompts)]
        return torch.cat([self._encode_texts(texts) for texts in batches])

    def _encode_texts(self, texts: list[str]) -> Tensor:
        """``[len(texts), L, D]`` text-encoder hidden states."""
        tokenizer = self.components.tokenizer
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        return self.components.text_encoder(ids)[0].to(self.dtype)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def predict_noise(self, latents: Tensor, t: Tensor, embeddings: Tensor, controls: list[Tensor]) -> Tensor:
        """UNet + ControlNet(s) with classifier-free guidance; model output for ``latents``."""
        scheduler = self.components.scheduler
        model_input = torch.cat([latents] * 2) if self.do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        down, mid = None, None
        for controlnet, control, scale in zip(self.components.controlnets, controls, self.conditioning_scales):
            d, m = controlnet(model_input, t, encoder_hidden_states=embeddings, controlnet_cond=control,
                              conditioning_scale=scale, return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        output = self.components.unet(model_input, t, encoder_hidden_states=embeddings,
                                      down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                      return_dict=False)[0]
        if self.do_cfg:
            uncond, cond = output.chunk(2)
            output = uncond + self.guidance_scale * (cond - uncond)
        return output

    def x0_estimate(self, latents: Tensor, model_output: Tensor, t: Tensor) -> Tensor:
        scheduler = self.components.scheduler
        alpha_bar = scheduler.alphas_cumprod.to(latents.device)[int(t)].to(latents.dtype)
        model_input = scheduler.scale_model_input(latents, t)  # VP form, also for sigma-space schedulers
        return predicted_x0(model_output, model_input, alpha_bar, scheduler.config.prediction_type)

    def decode(self, latents: Tensor, decoder: Optional[AutoencoderTiny] = None) -> Tensor:
        """Latents -> images in [0, 1], by the VAE or ``decoder`` (an ``AutoencoderTiny``; both take
        the latents divided by their own ``scaling_factor``, as diffusers' pipelines do)."""
        return to_unit_range(decode_latents(decoder if decoder is not None else self.components.vae, latents))

    def _check(self, masks: Tensor, prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if masks.ndim != 3:
            raise ValueError(f"masks must be [N, H, W] class ids, got shape {tuple(masks.shape)}")
        if masks.dtype.is_floating_point:
            raise ValueError(f"masks must hold integer class ids, got dtype {masks.dtype}")
        if not (len(prompts) == len(seeds) == masks.shape[0]):
            raise ValueError(f"{masks.shape[0]} masks, {len(prompts)} prompts, {len(seeds)} seeds: counts must match")
        multiple = self.size_multiple
        if masks.shape[1] % multiple or masks.shape[2] % multiple:
            raise ValueError(f"mask size {tuple(masks.shape[1:])} must be divisible by {multiple} for these components "
                             f"(scripts/generate.py fits masks to it: its resolution and fit settings)")
        latent_size = (masks.shape[1] // self.vae_factor, masks.shape[2] // self.vae_factor)
        if any(side % self.decode_downsample for side in latent_size):
            raise ValueError(f"latent size {latent_size} of masks {tuple(masks.shape[1:])} must be divisible by "
                             f"decode_downsample={self.decode_downsample}")

    def guided_objective(self, x0: Tensor, masks: Tensor,
                         generators: Optional[Sequence[torch.Generator]] = None) -> Tensor:
        """The objective of the x0 estimate ``[N, 4, h, w]`` decoded (by the guidance decoder, at
        1/``decode_downsample`` resolution) against ``masks [N, H, W]``: ``[N]``. An objective that draws random numbers
        (``draws``: MC dropout, sampled labels) gets ``generators``, one per sample."""
        factor = self.decode_downsample
        draws = {"generators": generators} if generators is not None and getattr(self.objective, "draws", False) else {}
        latents = downsample_latents(x0, factor)
        images = self.decode(latents, self.guidance_decoder)
        if self.guidance_decoder is not None and self.decoder_image == "vae":
            with torch.no_grad():
                full = self.decode(latents)
            images = full + (images - images.detach())  # the VAE's image, the tiny decoder's gradient
        return self.objective(images, downsample_masks(masks, factor), **draws)

    def _guidance_gradient(self, run: "Denoising", i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(model output, gradient w.r.t. latents, objective values) at guided step ``i``."""
        latents, t, generators = run.latents, run.timesteps[i], run.step_generators(i, self.device)
        if self.gradient_path == "through_unet":
            with torch.enable_grad():
                z = latents.detach().requires_grad_(True)
                output = self.predict_noise(z, t, run.embeddings, run.controls)
                value = self.guided_objective(run.fill_known(self.x0_estimate(z, output, t)), run.objective_masks,
                                              generators)
                (gradient,) = torch.autograd.grad(value.sum(), z)
            return output.detach(), gradient, value.detach()
        with torch.no_grad():
            output = self.predict_noise(latents, t, run.embeddings, run.controls)
            x0 = self.x0_estimate(latents, output, t)
        with torch.enable_grad():
            x0 = x0.detach().requires_grad_(True)
            value = self.guided_objective(run.fill_known(x0), run.objective_masks, generators)
            (gradient,) = torch.autograd.grad(value.sum(), x0)
        return output, gradient, value.detach()

    def guidance_step(self, run: "Denoising", i: int) -> GuidanceStep:
        """Guidance at step ``i`` of ``run``: the model output, the objective's gradient and the latent
        update (zero outside a known region's regenerated part, and for a non-finite gradient)."""
        t = run.timesteps[i]
        output, gradient, value = self._guidance_gradient(run, i)
        finite = torch.isfinite(gradient.flatten(1)).all(1).view(-1, 1, 1, 1)
        gradient = torch.where(finite, gradient, 0)
        if run.region is not None:  # only the regenerated part moves (and sets the normalisation)
            gradient = gradient * run.region
        noise_level = float((1 - self.components.scheduler.alphas_cumprod[int(t)]).sqrt())
        update = self.schedule.update(gradient, i, len(run.timesteps), noise_level, run.region).to(run.latents.dtype) * finite
        return GuidanceStep(output, gradient, value, update, finite.flatten())

    # -- the loop ------------------------------------------------------------------------------
    def prepare(self, masks: Tensor, prompts: Sequence[str], seeds: Sequence[int], extra_controls: Sequence[Tensor] = (),
                known: Optional[KnownRegion] = None) -> Denoising:
        """Everything the denoising loop needs, up to the initial latents (steps 1-4 of ``__call__``)."""
        # 1. Check inputs
        self._check(masks, prompts, seeds)
        if len(extra_controls) != len(self.components.controlnets) - 1:
            raise ValueError(f"{len(self.components.controlnets)} ControlNets need {len(self.components.controlnets) - 1} "
                             f"extra control images besides the mask, got {len(extra_controls)}")
        if known is not None:
            known.check(masks.shape)
        masks = masks.to(self.device)
        n, height, width = masks.shape
        # 2. Encode prompts
        embeddings = self.encode_prompts(prompts)
        # 3. Control images: the palette mask first, then any extra controls
        controls = [self.palette.colourise(masks), *[c.to(self.device) for c in extra_controls]]
        if self.do_cfg:
            negative = controls[0] if self.negative_mask_fill is None else \
                self.palette.colourise(torch.full_like(masks, self.negative_mask_fill))
            controls = [torch.cat([negative, controls[0]]), *[torch.cat([c] * 2) for c in controls[1:]]]
        # contiguous NCHW, as diffusers' image processor hands them over: on a channels-last view (the
        # palette's permute) the convolutions take other kernels and round differently
        controls = [c.to(self.dtype, memory_format=torch.contiguous_format) for c in controls]
        # 4. Timesteps; with a known region, the last ``strength`` of the schedule (diffusers' get_timesteps)
        scheduler = self.components.scheduler
        scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if known is not None:
            skipped = self.num_inference_steps - min(int(self.num_inference_steps * known.strength), self.num_inference_steps)
            timesteps = timesteps[skipped * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(skipped * scheduler.order)
        # 5. Initial latents: one generator per sample, so a sample does not depend on its batch. With a
        # known region the generator first samples the image's latent (as the inpainting pipeline does)
        shape = (4, height // self.vae_factor, width // self.vae_factor)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        image_latents = region = None
        if known is not None:
            image_latents = self.encode(known.images.to(self.device), generators)
        noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(self.device,
                                                                                                          self.dtype)
        if known is None or known.strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(n))
        objective_masks = masks
        if known is not None:
            regenerate = known.regenerate.to(self.device)
            # binarised, then nearest to the latent grid, as the pipeline's mask processor does
            region = F.interpolate(regenerate[:, None].float(), size=shape[1:]).to(self.dtype)
            objective_masks = torch.where(regenerate, masks, torch.full_like(masks, self.palette.ignore_index))
        return Denoising(embeddings, controls, timesteps, latents, objective_masks, noise, image_latents, region,
                         [SampleTrace() for _ in range(n)], [int(seed) for seed in seeds])

    def encode(self, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] -> scaled latents, one posterior sample per image from its
        generator (diffusers' ``_encode_vae_image``)."""
        vae = self.components.vae
        with torch.no_grad():
            latents = torch.cat([vae.encode(image[None].to(vae.dtype) * 2 - 1).latent_dist.sample(generator)
                                 for image, generator in zip(images, generators)])
        return vae.config.scaling_factor * latents.to(self.dtype)

    def denoise_step(self, run: Denoising, i: int) -> None:
        """Step ``i`` of ``run`` in place: guidance (if scheduled), the scheduler step, and with a known
        region its noised image latents outside the regenerated part."""
        scheduler, t = self.components.scheduler, run.timesteps[i]
        if self.guided and self.schedule.is_guided(i, len(run.timesteps)):
            step = self.guidance_step(run, i)
            output = step.output
            run.latents = run.latents + step.update
            for j, trace in enumerate(run.traces):
                trace.steps.append(i)
                trace.objective.append(float(step.value[j]))
                trace.gradient_norm.append(float(step.gradient[j].norm()) if step.finite[j] else float("nan"))
                if not step.finite[j]:
                    message = f"step {i}: non-finite gradient, update skipped"
                    trace.warnings.append(message)
                    warnings.warn(f"sample {j}: {message}")
        else:
            with torch.no_grad():
                output = self.predict_noise(run.latents, t, run.embeddings, run.controls)
        run.latents = scheduler.step(output, t, run.latents, return_dict=False)[0]
        if run.region is not None:  # the pipeline's 4-channel-UNet blending: no re-noise after the last step
            proper = run.image_latents
            if i < len(run.timesteps) - 1:
                proper = scheduler.add_noise(proper, run.noise, torch.tensor([run.timesteps[i + 1]]))
            run.latents = (1 - run.region) * proper + run.region * run.latents

    @property
    def guided(self) -> bool:
        return self.objective is not None and self.schedule.strength > 0

    def __call__(self, masks: Tensor, prompts: Sequence[str], seeds: Sequence[int],
                 extra_controls: Sequence[Tensor] = (), known: Optional[KnownRegion] = None) -> SamplerOutput:
        """``masks [N, H, W]`` class ids; with ``known``, only its ``regenerate`` pixels are generated."""
        run = self.prepare(masks, prompts, seeds, extra_controls, known)
        for i in tqdm(range(len(run.timesteps)), desc="denoise", disable=not self.progress, leave=False):
            self.denoise_step(run, i)
        with torch.no_grad():
            images = self.decode(run.latents)
        return SamplerOutput(images=images, latents=run.latents, traces=run.traces)
