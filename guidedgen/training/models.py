"""The component set being trained: built untrained from the architecture, saved in the diffusers
layout (each folder atomically, cast to the save dtype)."""

from __future__ import annotations

import shutil
from copy import deepcopy as copy_module
from pathlib import Path

import torch
from diffusers import ControlNetModel, DDIMScheduler

from guidedgen.components import TORCH_DTYPES, Components, tiny_components
from guidedgen.training.config import TrainControlNetConfig


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


def save_module(module: torch.nn.Module, directory: Path, save_dtype: str) -> None:
    """Save a copy cast to ``save_dtype`` (the trained module keeps its own dtype)."""
    copy = copy_module(module).to(TORCH_DTYPES[save_dtype])
    _atomic_save(copy.save_pretrained, directory)


def _atomic_save(save, directory: Path) -> None:
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


def save_components(components: Components, output: Path, save_dtype: str) -> None:
    """Write the final set (diffusers layout) next to the checkpoints, each folder atomically."""
    for name, module in (("unet", components.unet), ("controlnet", components.controlnets[0])):
        save_module(module, output / name, save_dtype)
    _atomic_save(components.text_encoder.save_pretrained, output / "text_encoder")
    _atomic_save(components.tokenizer.save_pretrained, output / "tokenizer")
    _atomic_save(components.scheduler.save_pretrained, output / "scheduler")
