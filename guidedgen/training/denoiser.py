"""Stage 2, UNet + ControlNet jointly: the weighted denoising loss, frozen text encoding, and the
resumable training loop with its accelerate checkpoints."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from guidedgen.components import Components
from guidedgen.training.config import TrainControlNetConfig
from guidedgen.training.data import TrainingData, batch_indices
from guidedgen.training.loss_log import truncate_losses, write_losses
from guidedgen.training.report import validation_sheet


def weighted_denoising_error(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean of the squared error [B]; ``weights`` [B, 1, h, w] spans channels.
    Normalised by the weights' sum, so uniform weights give exactly the plain per-sample MSE."""
    squared = (prediction.float() - target.float()) ** 2
    weights = weights.expand_as(squared)
    return (weights * squared).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))


@torch.no_grad()
def encode_text(components: Components, prompts: list[str], device: torch.device) -> torch.Tensor:
    tokenizer = components.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    encoder = components.text_encoder.to(device)
    return torch.cat([encoder(ids[i:i + 256].to(device))[0] for i in range(0, len(ids), 256)])


def _checkpoints(output: Path) -> list[Path]:
    return sorted(output.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def train_denoiser(components: Components, data: TrainingData, config: TrainControlNetConfig, output: Path,
                   accelerator: Accelerator, classes: Optional[list[str]] = None) -> dict:
    """Stage 2: UNet + ControlNet jointly. Returns a summary (steps, minutes, final loss)."""
    device = accelerator.device
    vae = components.vae.to(device)
    with torch.no_grad():  # frozen encoders: latents' posterior parameters and prompt embeddings once
        moments = torch.cat([vae.encode(data.images[i:i + 64].to(device)).latent_dist.parameters.cpu()
                             for i in range(0, len(data.images), 64)])
    embeddings = encode_text(components, data.prompts, device).cpu()
    empty = encode_text(components, [""], device).cpu()
    scaling = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    unet, controlnet = components.unet, components.controlnets[0]
    unet.train().requires_grad_(True)
    controlnet.train().requires_grad_(True)
    parameters = list(unet.parameters()) + list(controlnet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    unet, controlnet, optimizer, lr_scheduler = accelerator.prepare(unet, controlnet, optimizer, lr_scheduler)
    ema = EMAModel(parameters, decay=config.ema_decay) if config.use_ema else None
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    first_step = 0
    if config.resume_from_checkpoint:
        found = _checkpoints(output) if config.resume_from_checkpoint == "latest" else [Path(config.resume_from_checkpoint)]
        if found:
            accelerator.load_state(str(found[-1]))
            first_step = int(found[-1].name.split("-")[1])
            accelerator.print(f"resumed from {found[-1]} at step {first_step}")
            if accelerator.is_main_process:
                truncate_losses(output / "losses.csv", first_step)
    start, losses, done = time.monotonic(), [], first_step
    bar = tqdm(range(first_step, config.max_train_steps), initial=first_step, total=config.max_train_steps,
               desc="UNet+ControlNet", disable=not (config.progress and accelerator.is_main_process))
    for step in bar:
        generator = torch.Generator().manual_seed(hash((config.seed, step, accelerator.process_index)) & 0x7FFFFFFF)
        index = batch_indices(len(data.images), config.train_batch_size, config.seed, step, accelerator.process_index)
        mean, logvar = moments[index].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        drop = torch.rand(len(index), generator=generator) < config.proportion_empty_prompts
        unconditional = torch.rand(len(index), generator=generator) < config.proportion_unconditional
        drop |= unconditional
        text = torch.where(drop.view(-1, 1, 1), empty, embeddings[index])
        control = torch.where(unconditional.view(-1, 1, 1, 1), data.null_control, data.controls[index])
        latents, noise, timesteps, text, weights, control = (
            x.to(device) for x in (latents, noise, timesteps, text, data.loss_weights[index], control))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with accelerator.autocast():
            down, mid = controlnet(noisy, timesteps, encoder_hidden_states=text,
                                   controlnet_cond=control, return_dict=False)
            prediction = unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, return_dict=False)[0]
        error = weighted_denoising_error(prediction, noise, weights)
        if config.snr_gamma is not None:  # min-SNR weighting (Hang et al. 2023), epsilon form as in diffusers
            snr = compute_snr(noise_scheduler, timesteps)
            error = error * torch.clamp(snr, max=config.snr_gamma) / snr
        loss = error.mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.step(parameters)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        done = step + 1
        out_of_time = config.max_train_minutes is not None and (time.monotonic() - start) / 60 > config.max_train_minutes
        if done % config.checkpointing_steps == 0 or done == config.max_train_steps or out_of_time:
            _checkpoint(accelerator, output, done, losses, first_step, config.checkpoints_total_limit)
            first_step, losses = done, []
        if classes and config.validation_steps and done % config.validation_steps == 0 and accelerator.is_main_process:
            validation_sheet(components, config, classes, output / "samples" / f"step-{done:06d}.png")
        if out_of_time:
            accelerator.print(f"stopping after {config.max_train_minutes} minutes at step {done}")
            break
    if ema is not None:
        ema.copy_to(parameters)  # the saved weights are the EMA ones
    components.unet = accelerator.unwrap_model(unet).eval().requires_grad_(False)
    components.controlnets = [accelerator.unwrap_model(controlnet).eval().requires_grad_(False)]
    return {"last_step": done, "stage_minutes": (time.monotonic() - start) / 60}


def _checkpoint(accelerator: Accelerator, output: Path, step: int, losses: list[float], first_step: int,
                limit: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        log = output / "losses.csv"
        write_losses(log, losses, first_step, mode="a" if log.exists() else "w")
    accelerator.save_state(str(output / "checkpoints" / f"checkpoint-{step}"))
    if accelerator.is_main_process:
        for old in _checkpoints(output)[:-limit]:
            shutil.rmtree(old)
