"""Stage 1, the VAE (reconstruction + KL, sets ``scaling_factor``), and the decoder-only fine-tune
that runs after stage 2."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from guidedgen.components import Components
from guidedgen.training.config import TrainControlNetConfig
from guidedgen.training.data import TrainingData, batch_indices
from guidedgen.training.loss_log import write_losses
from guidedgen.training.models import save_module


def train_vae(components: Components, data: TrainingData, config: TrainControlNetConfig, output: Path,
              accelerator: Accelerator) -> None:
    """Stage 1. Sets ``vae.config.scaling_factor`` to 1 / std of the latents."""
    vae = components.vae
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    losses = []
    bar = tqdm(range(config.vae_steps), desc="VAE", disable=not (config.progress and accelerator.is_main_process))
    for step in bar:
        index = batch_indices(len(data.images), config.vae_batch_size, config.seed, -1 - step, accelerator.process_index)
        images = data.images[index].to(accelerator.device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
                + config.kl_weight * posterior.kl().mean())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.images[i:i + 64].to(accelerator.device)).latent_dist.mean
                             for i in range(0, min(len(data.images), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    components.vae = vae
    if accelerator.is_main_process:
        write_losses(output / "vae_losses.csv", losses)
        save_module(vae, output / "vae", config.save_dtype)
    accelerator.wait_for_everyone()


def finetune_vae_decoder(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int, learning_rate: float,
                         seed: int, device: torch.device, progress: bool = True) -> list[float]:
    """Train only the decoder (and post-quant conv) on posterior samples of the frozen encoder.

    The encoder, hence the latent space the UNet learnt, does not move, so this can run after
    (or beside) stage 2. Returns the loss per step."""
    vae.to(device).requires_grad_(False)
    decoder = [vae.decoder, vae.post_quant_conv]
    for module in decoder:
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([p for m in decoder for p in m.parameters()], lr=learning_rate)
    losses = []
    for step in tqdm(range(steps), desc="VAE decoder", disable=not progress):
        index = batch_indices(len(images), batch_size, seed, -1_000_000 - step, 0)
        batch = images[index].to(device)
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample()
        reconstruction = vae.decode(latents).sample
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses
