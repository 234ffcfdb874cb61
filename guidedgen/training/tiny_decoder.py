"""Distil a tiny decoder (diffusers' ``AutoencoderTiny``, TAESD's architecture) from a component
set's full VAE decoder, for guidance to decode the x0 estimate with (``guidance.decoder``).

The student learns the teacher's output, not the real images: guidance needs the image the full
VAE would show the segmenter. It reads UNet-space latents (the VAE's encodings times its
``scaling_factor``; its own ``scaling_factor`` stays 1.0, TAESD's convention). Half of each batch
is clean latents of train scenes; the other half is off the latent manifold, where guidance
takes its gradient early in sampling: the x0 estimate then is a blurred average of plausible
scenes with noise left in, which blends of two scenes plus Gaussian noise imitate.

Guidance uses the decoder's gradient, not only its output. ``gradient_weight`` adds a
gradient-matching term: for a random image-space probe ``v`` (an objective's gradient on the
image), the student's latent gradient ``J_tiny^T v`` is pulled to the teacher's ``J_full^T v``.
Over Gaussian probes its expectation is ``||J_tiny - J_full||_F^2``, so no particular objective is
favoured. It needs a second-order backward through the student only. It corrects the Jacobian
the objective's gradient travels back through, not the image the objective reads
(``guidance.decoder_image: vae`` gives it the full VAE's; docs/methods.md has what each costs).

Only the decoder is trained; ``AutoencoderTiny`` always builds an encoder, kept here at its
smallest (one 8-channel conv per stage, untrained: do not encode with it).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from tqdm.auto import tqdm

from al.config import ConfigError, require
from al.data.config import DataConfig
from al.folder_lock import FolderLock
from guidedgen.guidance_decoder import check_guidance_decoder, decode_latents, to_unit_range
from guidedgen.training.data import batch_indices

RECORD_NAME = "distillation.json"


@dataclass
class DistillTinyDecoderConfig:
    output_dir: str = "models/digitscenes-controlnet/tiny_decoder"
    model: str = "models/digitscenes-controlnet"  # the component set whose vae/ is distilled
    seed: int = 0
    # the scenes the model was trained on (its training_config.json), and held-out val scenes
    data: DataConfig = field(default_factory=lambda: DataConfig(num_train_images=4000, num_val_images=256))
    # AutoencoderTiny decoder: one stage per VAE level (each upsamples 2x), `channels` wide throughout
    # (its blocks cannot change width), decoder_blocks[i] residual blocks in stage i
    channels: int = 32
    decoder_blocks: list[int] = field(default_factory=lambda: [2, 1])
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3  # cosine-decayed to 0
    clean_share: float = 0.5  # of each batch: clean latents; the rest off-manifold (module docstring)
    noise_std: float = 0.5  # off-manifold latents get Gaussian noise of std up to this (latents have std ~1)
    # weight of the gradient-matching term (module docstring): the relative squared error of the
    # latent gradient for a Gaussian image probe, beside L1 + MSE on the images; 0 = images only
    gradient_weight: float = 0.0
    init_from: Optional[str] = None  # a tiny decoder folder of this architecture to fine-tune (None: fresh)
    overwrite: bool = False  # replace an existing output_dir
    progress: bool = True

    def validate(self) -> None:
        self.data.validate("data")
        require(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        require(self.batch_size >= 2, "batch_size", self.batch_size, "an integer >= 2")
        require(self.channels >= 1, "channels", self.channels, "an integer >= 1")
        require(len(self.decoder_blocks) >= 1 and min(self.decoder_blocks) >= 0, "decoder_blocks",
                self.decoder_blocks, "one block count >= 0 per VAE level")
        require(0.0 <= self.clean_share <= 1.0, "clean_share", self.clean_share, "a number in [0, 1]")
        require(self.noise_std >= 0.0, "noise_std", self.noise_std, "a number >= 0")
        require(self.gradient_weight >= 0.0, "gradient_weight", self.gradient_weight, "a number >= 0 (0 = images only)")
        require(self.init_from is None or Path(self.init_from, "config.json").is_file(), "init_from", self.init_from,
                "a tiny decoder folder (with config.json) or null")


def build_tiny_decoder(config: DistillTinyDecoderConfig, vae: AutoencoderKL) -> AutoencoderTiny:
    """An untrained ``AutoencoderTiny`` whose decoder fits ``vae`` (checked as guidance checks it)."""
    stages = len(config.decoder_blocks)
    torch.manual_seed(config.seed)
    decoder = AutoencoderTiny(
        in_channels=vae.config.out_channels, out_channels=vae.config.out_channels,
        latent_channels=vae.config.latent_channels, upsampling_scaling_factor=2,
        decoder_block_out_channels=(config.channels,) * stages, num_decoder_blocks=tuple(config.decoder_blocks),
        encoder_block_out_channels=(8,) * stages, num_encoder_blocks=(0,) * stages,
    )
    try:
        check_guidance_decoder(decoder, vae, f"decoder_blocks={config.decoder_blocks}")
    except ConfigError as error:
        raise ConfigError(f"{error} (decoder_blocks needs one entry per VAE level)") from None
    if config.init_from is not None:
        try:
            decoder.load_state_dict(AutoencoderTiny.from_pretrained(config.init_from).state_dict())
        except RuntimeError:
            raise ConfigError(f"config key 'init_from' = {config.init_from!r}: its architecture is not channels="
                              f"{config.channels}, decoder_blocks={config.decoder_blocks}; set those to the folder's "
                              f"(its config.json), or init_from=null") from None
    return decoder


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """UNet-space latents of ``images [N, 3, H, W]`` in [0, 1]: posterior means times ``scaling_factor``."""
    return torch.cat([vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist.mean
                      for i in range(0, len(images), batch_size)]) * vae.config.scaling_factor


def off_manifold(latents: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Each latent blended with another of the batch at a uniform weight, plus Gaussian noise of a
    uniform std in [0, ``noise_std``]: stand-ins for early x0 estimates."""
    n = len(latents)
    partners = latents[torch.randperm(n, generator=generator)]
    weight = torch.rand(n, 1, 1, 1, generator=generator)
    sigma = noise_std * torch.rand(n, 1, 1, 1, generator=generator)
    return weight * latents + (1 - weight) * partners + sigma * torch.randn(latents.shape, generator=generator)


def training_batch(latents: torch.Tensor, step: int, config: DistillTinyDecoderConfig) -> torch.Tensor:
    """Batch ``step``: depends only on (seed, step), so a run is reproducible."""
    index = batch_indices(len(latents), config.batch_size, config.seed, step, 0)
    batch = latents[index]
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    clean = round(config.clean_share * len(batch))
    return torch.cat([batch[:clean], off_manifold(batch[clean:], config.noise_std, generator)])


def latent_gradient(decoded: torch.Tensor, latents: torch.Tensor, probes: torch.Tensor,
                    create_graph: bool = False) -> torch.Tensor:
    """``d <decoded, probes> / d latents``: the gradient guidance gets on the latents through the
    decoder that made ``decoded`` from ``latents``, for an objective whose image gradient is ``probes``."""
    return torch.autograd.grad((decoded * probes).sum(), latents, create_graph=create_graph)[0]


def relative_gradient_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``||student - teacher||^2 / ||teacher||^2`` per sample, averaged: blind to the gradients' scale."""
    return ((student - teacher).square().sum((1, 2, 3)) / teacher.square().sum((1, 2, 3)).clamp_min(1e-12)).mean()


def gradient_cosine(decoder: AutoencoderTiny, vae: AutoencoderKL, latents: torch.Tensor, seed: int) -> float:
    """Mean cosine between the latent gradients through ``decoder`` and through ``vae`` for Gaussian
    image probes (one per latent, from ``seed``)."""
    latents = latents.detach().requires_grad_(True)
    full = decode_latents(vae, latents)
    probes = torch.randn(full.shape, generator=torch.Generator().manual_seed(seed))
    teacher = latent_gradient(full, latents, probes)
    student = latent_gradient(decode_latents(decoder, latents), latents, probes)
    return float(F.cosine_similarity(student.flatten(1), teacher.flatten(1)).mean())


def distill(decoder: AutoencoderTiny, vae: AutoencoderKL, latents: torch.Tensor,
            config: DistillTinyDecoderConfig) -> list[float]:
    """Train ``decoder.decoder`` on ``latents`` [N, c, h, w] to match ``vae``'s decoder (L1 + MSE,
    plus ``gradient_weight`` x the gradient term); returns the loss per step."""
    vae.requires_grad_(False).eval()
    decoder.requires_grad_(False)
    decoder.decoder.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(decoder.decoder.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    losses = []
    bar = tqdm(range(config.steps), desc="distil tiny decoder", disable=not config.progress)
    for step in bar:
        batch = training_batch(latents, step, config).requires_grad_(config.gradient_weight > 0)
        with torch.set_grad_enabled(config.gradient_weight > 0):
            target = decode_latents(vae, batch)  # the teacher
        output = decode_latents(decoder, batch)
        loss = F.l1_loss(output, target.detach()) + F.mse_loss(output, target.detach())
        if config.gradient_weight > 0:
            probes = torch.randn(target.shape, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1))
            teacher = latent_gradient(target, batch, probes)
            student = latent_gradient(output, batch, probes, create_graph=True)
            loss = loss + config.gradient_weight * relative_gradient_error(student, teacher)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    decoder.requires_grad_(False).eval()
    return losses


def _mse_psnr(a: torch.Tensor, b: torch.Tensor) -> dict:
    mse = float((a - b).square().mean())
    return {"mse": mse, "psnr_db": 10 * math.log10(1 / mse) if mse > 0 else float("inf")}


def reconstruction_errors(decoder: AutoencoderTiny, vae: AutoencoderKL, latents: torch.Tensor, images: torch.Tensor,
                          noise_std: float, seed: int) -> dict:
    """Images in [0, 1]: tiny vs full decode, and each vs the real images, on clean latents; tiny
    vs full on off-manifold ones built from them (``off_manifold``); and the latent-gradient
    cosine (``gradient_cosine``) on both."""
    noisy = off_manifold(latents, noise_std, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full, tiny = to_unit_range(decode_latents(vae, latents)), to_unit_range(decode_latents(decoder, latents))
        errors = {
            "tiny_vs_full": _mse_psnr(tiny, full),
            "full_vs_real": _mse_psnr(full, images),
            "tiny_vs_real": _mse_psnr(tiny, images),
            "off_manifold_tiny_vs_full": _mse_psnr(to_unit_range(decode_latents(decoder, noisy)),
                                                   to_unit_range(decode_latents(vae, noisy))),
        }
    errors["gradient_cosine"] = {"clean": gradient_cosine(decoder, vae, latents, seed),
                                 "off_manifold": gradient_cosine(decoder, vae, noisy, seed)}
    return errors


def check_output(config: DistillTinyDecoderConfig) -> Path:
    """The output folder, refused if it holds anything and ``overwrite`` is off."""
    output = Path(config.output_dir)
    if output.exists() and any(output.iterdir()) and not config.overwrite:
        raise ConfigError(f"config key 'output_dir' = {config.output_dir!r} is not empty (a tiny decoder already?); "
                          f"pick another output_dir, or set overwrite=true to replace it")
    return output


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_card(record: dict, folder: Path) -> str:
    """The README of a distilled decoder in ``folder`` (its size read before the card is added)."""
    config, errors = record["config"], record["errors"]
    gradient_term = (f" + {config['gradient_weight']:g} x the relative error of the latent gradient for Gaussian "
                     f"image probes (gradient matching)" if config.get("gradient_weight") else "")
    if config.get("init_from"):
        gradient_term += f", starting from `{config['init_from']}`"
    cosine = errors.get("gradient_cosine")
    cosine_line = "" if cosine is None else (
        f"\nLatent gradients for Gaussian image probes (what guidance follows), cosine with the full decoder's:\n"
        f"clean latents {cosine['clean']:.3f}, off-manifold {cosine['off_manifold']:.3f}.\n")
    row = lambda name, what: f"| {what} | {errors[name]['mse']:.5f} | {errors[name]['psnr_db']:.1f} |"
    return f"""# Tiny guidance decoder for {config['model']}

An `AutoencoderTiny` (diffusers' TAESD architecture) whose decoder was distilled from the full VAE
decoder of `{config['model']}` by `guidedgen.training.tiny_decoder`, for guidance to decode the x0
estimate with: `guidance.decoder: {config['output_dir']}`. Final images are still decoded by the full VAE.

- **Input:** UNet-space latents (the VAE's encodings times its `scaling_factor`); its own
  `scaling_factor` is 1.0, so `decode(latents / scaling_factor)` is right, as in diffusers' pipelines.
- **Architecture:** decoder {len(config['decoder_blocks'])} stages of {config['channels']} channels, blocks
  {config['decoder_blocks']}, 2x upsampling per stage: **{record['decoder_parameters']:,} parameters**
  (the full decoder: {record['full_decoder_parameters']:,}). The encoder is an untrained placeholder
  (`AutoencoderTiny` always builds one): do not encode with it.
- **Training:** {config['steps']} steps x batch {config['batch_size']}, AdamW at {config['learning_rate']:g}
  (cosine), L1 + MSE against the full decoder's output{gradient_term}, on the posterior means of
  {config['data']['num_train_images']} DigitScenes train scenes (size {config['data']['size']}, seed
  {config['data']['seed']}); a share {1 - config['clean_share']:g} of each batch off the latent manifold
  (blends of two scenes + Gaussian noise of std up to {config['noise_std']:g}), where guidance takes
  its gradient early in sampling. Seed {config['seed']}.
- **Command:** `{record['command']}`
- **Wall time:** {record['train_minutes']:.1f} min of training, {record['total_minutes']:.1f} min in all (one thread).
- **Size:** {folder_size(folder) / 1e6:.2f} MB (weights, config, `{RECORD_NAME}`; this card aside).
- **Reconstruction** on the posterior means of {record['val_images']} held-out val scenes, images in [0, 1]:

| images | MSE | PSNR (dB) |
|---|---|---|
{row("tiny_vs_full", "tiny vs full decoder")}
{row("tiny_vs_real", "tiny decoder vs real images")}
{row("full_vs_real", "full decoder vs real images")}
{row("off_manifold_tiny_vs_full", "tiny vs full, off-manifold latents (blends + noise)")}
{cosine_line}
`{RECORD_NAME}` holds the config, the loss per step and these numbers.
"""


def save_atomically(decoder: AutoencoderTiny, record: dict, config: DistillTinyDecoderConfig) -> Path:
    """Write the decoder, ``distillation.json`` and the card into a staging folder held under a
    lock (``.<name>.partial`` beside the output), then move it into place in one rename: the output
    folder is absent, the old one, or complete. A second run on the same output is refused."""
    output = Path(config.output_dir)
    staging = output.with_name(f".{output.name}.partial")
    with FolderLock(staging, "tiny decoder being written"):
        check_output(config)  # again, under the lock: another run may have finished meanwhile
        folder = staging / "decoder"
        shutil.rmtree(folder, ignore_errors=True)  # left by a killed run
        decoder.save_pretrained(folder)
        (folder / RECORD_NAME).write_text(json.dumps(record, indent=2))
        (folder / "README.md").write_text(model_card(record, folder))
        if output.exists():
            shutil.rmtree(output)
        folder.rename(output)
    shutil.rmtree(staging, ignore_errors=True)
    return output


def run_distillation(config: DistillTinyDecoderConfig, command: str = "") -> Path:
    """Distil, evaluate on held-out val scenes and save (``save_atomically``)."""
    config.validate()
    check_output(config)  # before any training
    started = time.monotonic()
    vae = AutoencoderKL.from_pretrained(config.model, subfolder="vae", torch_dtype=torch.float32).requires_grad_(False)
    images = {split: torch.stack([s.image for s in config.data.build(split)])
              for split in (config.data.train_split, config.data.val_split)}
    latents = {split: encode_latents(vae.eval(), split_images) for split, split_images in images.items()}
    decoder = build_tiny_decoder(config, vae)
    train_started = time.monotonic()
    losses = distill(decoder, vae, latents[config.data.train_split], config)
    train_minutes = (time.monotonic() - train_started) / 60
    errors = reconstruction_errors(decoder, vae, latents[config.data.val_split], images[config.data.val_split],
                                   config.noise_std, config.seed + 1)
    record = {
        "config": asdict(config), "command": command, "train_minutes": train_minutes,
        "total_minutes": (time.monotonic() - started) / 60, "final_loss": losses[-1], "losses": losses,
        "decoder_parameters": sum(p.numel() for p in decoder.decoder.parameters()),
        "full_decoder_parameters": sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters()),
        "val_images": len(images[config.data.val_split]), "errors": errors,
    }
    return save_atomically(decoder, record, config)
