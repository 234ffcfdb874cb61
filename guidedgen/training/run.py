"""``train_controlnet``: run (or resume) every stage in order into one output folder."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL

from al.resume import check_resume, identity
from guidedgen.training.config import (
    NOT_IDENTITY,
    RUN_LENGTH_KEYS,
    TrainControlNetConfig,
)
from guidedgen.training.data import load_training_data
from guidedgen.training.denoiser import train_denoiser
from guidedgen.training.loss_log import plot_losses, write_losses
from guidedgen.training.models import build_untrained, save_components, save_module
from guidedgen.training.report import write_model_card
from guidedgen.training.vae import finetune_vae_decoder, train_vae


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
    # no overwrite here: replacing would delete a long run's checkpoints; a new folder costs nothing
    check_resume(identity(json.loads(record.read_text()), NOT_IDENTITY) if record.exists() else None,
                 identity(config, NOT_IDENTITY), output, defaults=identity(TrainControlNetConfig(), NOT_IDENTITY),
                 remedy=f"pick a new output_dir (only {', '.join(RUN_LENGTH_KEYS)} may change on resume)")
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
        save_module(components.vae, output / "vae", config.save_dtype)
        write_losses(decoder_done, losses)  # last: marks the stage done
    summary["total_minutes"] = (time.monotonic() - started) / 60
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if accelerator.is_main_process:
        save_components(components, output, config.save_dtype)
        write_model_card(output, config, summary, command)
        plot_losses(output)
    accelerator.wait_for_everyone()
    return output
