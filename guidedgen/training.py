"""Train a small mask-conditioned SD + ControlNet set on a segmentation dataset (DigitScenes).

No pretrained Stable Diffusion exists on this machine, so the whole stack is trained here, in
two resumable stages, following the diffusers training examples:

1. **VAE** (``AutoencoderKL``): L1 + MSE reconstruction with a small KL term. Its latent std
   sets ``scaling_factor``, as SD's does. Saved to ``vae/`` when done; a re-run skips it.
2. **UNet + ControlNet, jointly**: epsilon prediction under the DDPM noise schedule, min-SNR
   loss weighting (``snr_gamma``) and optionally more weight on latent pixels that touch an object
   (``foreground_loss_weight``), a share of empty prompts for classifier-free guidance, the
   ControlNet initialised from the UNet (``ControlNetModel.from_unet``) and conditioned on the
   palette image of the mask exactly as ``guidedgen.generate`` builds it. The two are trained
   together because there is no pretrained UNet to freeze. Optional EMA. ``accelerate``
   checkpoints every ``checkpointing_steps``; ``resume_from_checkpoint="latest"`` continues.

The text encoder is a tiny random CLIP that stays frozen (SD freezes its own); it only has to
tell prompts apart. The output folder has the diffusers layout, so
``guidedgen.components.load_components`` loads it through ``from_pretrained`` like SD-1.5.
"""

from __future__ import annotations

import csv
import json
import resource
import shutil
import time
from copy import deepcopy as copy_module
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from al.config import require
from al.experiment import DATA_KINDS, DataConfig
from guidedgen.components import TORCH_DTYPES, Components, tiny_components
from guidedgen.generate import PaletteConfig, build_palette
from guidedgen.palette import DEFAULT_PROMPT_TEMPLATE, prompt_for


@dataclass
class ArchitectureConfig:
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # 3 levels: latents are 1/4 size
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    cross_attention_dim: int = 32
    text_max_length: int = 48


@dataclass
class TrainControlNetConfig:
    output_dir: str = "outputs/controlnet_digits"
    seed: int = 0
    data: DataConfig = field(default_factory=lambda: DataConfig(num_train_images=4000, num_val_images=16))
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    palette: PaletteConfig = field(default_factory=PaletteConfig)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    # stage 1: VAE
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    # stage 3: decoder-only fine-tuning (as SD's ft-MSE VAE): sharper images, same latent space
    vae_decoder_steps: int = 0
    # stage 2: UNet + ControlNet (names follow diffusers' train_controlnet.py)
    max_train_steps: int = 8000
    max_train_minutes: Optional[float] = None  # stop stage 2 early (checkpointing first) after this long
    train_batch_size: int = 32
    learning_rate: float = 5e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 200
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    snr_gamma: Optional[float] = 5.0
    # Weight of latent pixels that cover an object (any class but "background") in the denoising
    # loss, relative to background ones; 1 = diffusers' plain MSE. Digits fill ~15% of a scene, so
    # unweighted, the loss is mostly about modelling background texture the masks do not constrain.
    foreground_loss_weight: float = 1.0
    proportion_empty_prompts: float = 0.1
    # Share of samples that see neither prompt nor mask (empty prompt, all-ignore control image):
    # the negative branch of classifier-free guidance *over the mask* (sample with
    # ``negative_mask_fill`` = the ignore index). Without it, both CFG branches see the mask and
    # guidance amplifies only the prompt.
    proportion_unconditional: float = 0.0
    use_ema: bool = True
    ema_decay: float = 0.999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: Optional[str] = "latest"
    validation_steps: int = 1000  # sample sheet every N steps (0 = never)
    mixed_precision: str = "no"
    save_dtype: str = "fp16"  # weights on disk; loading casts to the requested dtype
    progress: bool = True

    def validate(self) -> None:
        require(self.data.kind in DATA_KINDS, "data.kind", self.data.kind, f"one of {list(DATA_KINDS)}")
        require(self.vae_steps >= 1, "vae_steps", self.vae_steps, "an integer >= 1")
        require(self.max_train_steps >= 1, "max_train_steps", self.max_train_steps, "an integer >= 1")
        require(self.checkpointing_steps >= 1, "checkpointing_steps", self.checkpointing_steps, "an integer >= 1")
        require(0.0 <= self.proportion_empty_prompts < 1.0, "proportion_empty_prompts", self.proportion_empty_prompts,
                "a number in [0, 1)")
        require(0.0 <= self.proportion_unconditional < 1.0, "proportion_unconditional", self.proportion_unconditional,
                "a number in [0, 1)")
        require(self.foreground_loss_weight > 0, "foreground_loss_weight", self.foreground_loss_weight,
                "a number > 0 (1 = unweighted)")
        require(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", self.mixed_precision, "no, fp16 or bf16")
        require(self.save_dtype in TORCH_DTYPES, "save_dtype", self.save_dtype, f"one of {sorted(TORCH_DTYPES)}")
        arch = self.architecture
        require(len(arch.conditioning_embedding_out_channels) == len(arch.vae_channels),
                "architecture.conditioning_embedding_out_channels", arch.conditioning_embedding_out_channels,
                f"{len(arch.vae_channels)} values: its stride-2 convs must match the VAE's downsampling")
        require(self.data.size % 2 ** (len(arch.vae_channels) - 1 + len(arch.unet_channels) - 1) == 0, "data.size",
                self.data.size, "a multiple of the VAE and UNet downsampling factors")


@dataclass
class TrainingData:
    """Everything stage 2 draws batches from, precomputed once (the encoders are frozen)."""

    images: torch.Tensor  # [N, 3, S, S] in [-1, 1]
    controls: torch.Tensor  # [N, 3, S, S] palette images in [0, 1]
    null_control: torch.Tensor  # [3, S, S] palette image of an all-ignore mask (no label anywhere)
    prompts: list[str]
    loss_weights: torch.Tensor  # [N, 1, s, s] per latent pixel (see ``foreground_weights``)


def build_untrained(config: TrainControlNetConfig, num_classes: int) -> Components:
    arch = config.architecture
    components = tiny_components(
        config.seed, 1, "ddim", tuple(arch.unet_channels), tuple(arch.vae_channels), config.data.size,
        arch.layers_per_block, arch.cross_attention_dim, arch.text_max_length,
    )
    components.controlnets = [ControlNetModel.from_unet(
        components.unet, conditioning_embedding_out_channels=tuple(arch.conditioning_embedding_out_channels))]
    # SD's inference conventions; the DDPM training schedule shares its betas.
    components.scheduler = DDIMScheduler.from_config(components.scheduler.config, clip_sample=False,
                                                     set_alpha_to_one=False, steps_offset=1)
    return components


def load_training_data(config: TrainControlNetConfig) -> tuple[TrainingData, list[str]]:
    dataset = config.data.build(config.data.train_split)
    classes = list(dataset.classes)
    palette = build_palette(config.palette, classes, dataset.ignore_index)
    samples = [dataset[i] for i in tqdm(range(len(dataset)), desc="load data", disable=not config.progress)]
    masks = torch.stack([s.mask for s in samples])
    images = torch.stack([s.image for s in samples]) * 2.0 - 1.0
    prompts = [prompt_for(m, classes, config.prompt_template) for m in masks]
    latent_size = config.data.size // 2 ** (len(config.architecture.vae_channels) - 1)
    background = classes.index("background") if "background" in classes else None
    weights = foreground_weights(masks, latent_size, config.foreground_loss_weight, background, dataset.ignore_index)
    null_control = palette.colourise(torch.full_like(masks[:1], dataset.ignore_index))[0]
    return TrainingData(images, palette.colourise(masks), null_control, prompts, weights), classes


def foreground_weights(masks: torch.Tensor, latent_size: int, foreground_weight: float,
                       background_index: Optional[int], ignore_index: int) -> torch.Tensor:
    """Per-latent-pixel loss weights [N, 1, s, s]: ``foreground_weight`` where the latent pixel
    touches an object pixel (max-pooled, so thin strokes still count), 1 elsewhere."""
    objects = masks != ignore_index
    if background_index is not None:
        objects &= masks != background_index
    touched = F.adaptive_max_pool2d(objects.float().unsqueeze(1), latent_size)
    return 1.0 + (foreground_weight - 1.0) * touched


def weighted_denoising_error(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean of the squared error [B]; ``weights`` [B, 1, h, w] spans channels.
    Normalised by the weights' sum, so uniform weights give exactly the plain per-sample MSE."""
    squared = (prediction.float() - target.float()) ** 2
    weights = weights.expand_as(squared)
    return (weights * squared).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))


def _batch_indices(count: int, batch_size: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """Batch ``step`` depends only on (seed, step, rank), so a resumed run draws what it would have."""
    generator = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
    return torch.randint(count, (batch_size,), generator=generator)


def _save_module(module: torch.nn.Module, directory: Path, save_dtype: str) -> None:
    """Save a copy cast to ``save_dtype`` (the trained module keeps its own dtype)."""
    copy = copy_module(module).to(TORCH_DTYPES[save_dtype])
    _atomic_save(copy.save_pretrained, directory)


def _atomic_save(save, directory: Path) -> None:
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


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
        index = _batch_indices(len(data.images), config.vae_batch_size, config.seed, -1 - step, accelerator.process_index)
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
        _write_losses(output / "vae_losses.csv", losses)
        _save_module(vae, output / "vae", config.save_dtype)
    accelerator.wait_for_everyone()


def _truncate_losses(path: Path, first_step: int) -> None:
    """Drop logged steps at or after ``first_step`` (they are about to be redone)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) < first_step]))


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
        index = _batch_indices(len(images), batch_size, seed, -1_000_000 - step, 0)
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


def _write_losses(path: Path, losses: list[float], first_step: int = 0, mode: str = "w") -> None:
    with open(path, mode, newline="") as handle:
        writer = csv.writer(handle)
        if mode == "w":
            writer.writerow(["step", "loss"])
        writer.writerows((first_step + i, f"{loss:.6f}") for i, loss in enumerate(losses))


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
                _truncate_losses(output / "losses.csv", first_step)
    start, losses, done = time.monotonic(), [], first_step
    bar = tqdm(range(first_step, config.max_train_steps), initial=first_step, total=config.max_train_steps,
               desc="UNet+ControlNet", disable=not (config.progress and accelerator.is_main_process))
    for step in bar:
        generator = torch.Generator().manual_seed(hash((config.seed, step, accelerator.process_index)) & 0x7FFFFFFF)
        index = _batch_indices(len(data.images), config.train_batch_size, config.seed, step, accelerator.process_index)
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
        _write_losses(log, losses, first_step, mode="a" if log.exists() else "w")
    accelerator.save_state(str(output / "checkpoints" / f"checkpoint-{step}"))
    if accelerator.is_main_process:
        for old in _checkpoints(output)[:-limit]:
            shutil.rmtree(old)


@torch.no_grad()
def validation_sheet(components: Components, config: TrainControlNetConfig, classes: list[str], path: Path,
                     count: int = 8) -> Path:
    """Unguided samples for the first ``count`` validation masks: control row over sample row."""
    from PIL import Image

    from guidedgen.sampler import GuidedControlNetSampler

    dataset = config.data.build(config.data.val_split)
    masks = torch.stack([dataset[i].mask for i in range(min(count, len(dataset)))])
    palette = build_palette(config.palette, classes, dataset.ignore_index)
    prompts = [prompt_for(m, classes, config.prompt_template) for m in masks]
    # with an unconditional share, CFG compares against the no-label mask it was trained on
    negative_mask_fill = dataset.ignore_index if config.proportion_unconditional > 0 else None
    sampler = GuidedControlNetSampler(components, palette, num_inference_steps=20, guidance_scale=2.0,
                                      negative_prompt="", negative_mask_fill=negative_mask_fill, progress=False)
    images = sampler(masks.to(components.unet.device), prompts, list(range(len(masks)))).images.cpu()
    grid = torch.cat([torch.cat(list(palette.colourise(masks)), dim=2), torch.cat(list(images), dim=2)], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def write_model_card(output: Path, config: TrainControlNetConfig, summary: dict, command: str) -> None:
    card = f"""# DigitScenes ControlNet set (guidedgen)

A small Stable-Diffusion-style stack trained from scratch on this project's DigitScenes
benchmark by `guidedgen.training`: VAE, UNet and a segmentation ControlNet conditioned on the
palette image of the mask, with a frozen random character-level CLIP text encoder.

- **Data:** {config.data.num_train_images} DigitScenes train scenes ({config.data.size}x{config.data.size}, seed {config.data.seed}).
- **Steps:** VAE {config.vae_steps} x batch {config.vae_batch_size}; UNet+ControlNet {summary.get('last_step')} x batch {config.train_batch_size}.
- **Seed:** {config.seed}. **Command:** `{command}`
- **Wall time:** {summary.get('total_minutes', float('nan')):.1f} minutes on this machine's 2 CPU cores; peak memory {summary.get('peak_rss_mb', float('nan')):.0f} MB.
- **Quality:** see `quality.json` when `benchmarks/mask_fidelity.py` has been run on this folder.

Load it with `guidedgen.components.load_components(ComponentsConfig(pretrained_model_name_or_path=<this folder>,
controlnet_model_name_or_path=[<this folder>/controlnet], local_files_only=True))`.

Full training config:

```json
{json.dumps(asdict(config), indent=2)}
```
"""
    (output / "README.md").write_text(card)


def plot_losses(output: Path) -> Optional[Path]:
    from matplotlib.figure import Figure

    from al.plots import save_figure

    # A run that reused a finished VAE has no VAE log: draw only the stages this folder logged.
    logged = [(output / name, title) for name, title in (("vae_losses.csv", "VAE"),
                                                        ("losses.csv", "UNet + ControlNet (denoising loss)"))
              if (output / name).exists()]
    if not logged:
        return None
    figure = Figure(figsize=(5 * len(logged), 3.5))
    for axis, (path, title) in zip(np.atleast_1d(figure.subplots(1, len(logged))), logged):
        rows = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        window = max(1, len(rows) // 50)
        smooth = np.convolve(rows[:, 1], np.ones(window) / window, mode="valid")
        axis.plot(rows[:, 0], rows[:, 1], alpha=0.25)
        axis.plot(rows[window - 1:, 0], smooth)
        axis.set(title=title, xlabel="step", ylabel="loss", yscale="log")
    figure.tight_layout()
    save_figure(figure, output / "loss_curve.png")
    return output / "loss_curve.png"


def save_components(components: Components, output: Path, save_dtype: str) -> None:
    """Write the final set (diffusers layout) next to the checkpoints, each folder atomically."""
    for name, module in (("unet", components.unet), ("controlnet", components.controlnets[0])):
        _save_module(module, output / name, save_dtype)
    _atomic_save(components.text_encoder.save_pretrained, output / "text_encoder")
    _atomic_save(components.tokenizer.save_pretrained, output / "tokenizer")
    _atomic_save(components.scheduler.save_pretrained, output / "scheduler")


# Keys a resumed run may change: how long it runs and how it reports, not what it trains.
RUN_LENGTH_KEYS = ("max_train_steps", "max_train_minutes", "checkpointing_steps", "checkpoints_total_limit",
                   "validation_steps", "resume_from_checkpoint", "progress")


def _defining(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in RUN_LENGTH_KEYS}


def train_controlnet(config: TrainControlNetConfig, command: str = "") -> Path:
    """Run (or resume) both stages; returns the output folder in the diffusers layout."""
    config.validate()
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # One Accelerator per stage: a checkpoint holds exactly stage 2's models, whether or not
    # this process also trained the VAE.
    new_accelerator = lambda: Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                                          project_config=ProjectConfiguration(project_dir=str(output)))
    accelerator = new_accelerator()
    set_seed(config.seed)
    started = time.monotonic()
    record = output / "training_config.json"
    if record.exists() and _defining(json.loads(record.read_text())) != _defining(asdict(config)):
        raise FileExistsError(f"{output} holds a run with another config ({record}); pick a new output_dir or delete it "
                              f"(only {', '.join(RUN_LENGTH_KEYS)} may change on resume)")
    if accelerator.is_main_process:
        record.write_text(json.dumps(asdict(config), indent=2))
    data, classes = load_training_data(config)
    components = build_untrained(config, len(classes))
    if not (output / "vae" / "config.json").exists():
        train_vae(components, data, config, output, new_accelerator())
    # stage 2 always encodes with the VAE as saved, so a resumed run sees exactly the same latents
    components.vae = AutoencoderKL.from_pretrained(output / "vae", torch_dtype=torch.float32).requires_grad_(False)
    summary = train_denoiser(components, data, config, output, accelerator, classes)
    decoder_done = output / "vae_decoder_losses.csv"
    if config.vae_decoder_steps and not decoder_done.exists() and accelerator.is_main_process:
        losses = finetune_vae_decoder(components.vae, data.images, config.vae_decoder_steps, config.vae_batch_size,
                                      config.vae_learning_rate, config.seed, accelerator.device, config.progress)
        _save_module(components.vae, output / "vae", config.save_dtype)
        _write_losses(decoder_done, losses)  # last: marks the stage done
    summary["total_minutes"] = (time.monotonic() - started) / 60
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if accelerator.is_main_process:
        save_components(components, output, config.save_dtype)
        write_model_card(output, config, summary, command)
        plot_losses(output)
    accelerator.wait_for_everyone()
    return output
