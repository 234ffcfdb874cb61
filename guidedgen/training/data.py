"""The training set, loaded and precomputed once (images, palette controls, prompts, loss weights),
and the reproducible batches drawn from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from guidedgen.palette import build_palette, prompt_for
from guidedgen.training.config import TrainControlNetConfig


@dataclass
class TrainingData:
    """Everything stage 2 draws batches from, precomputed once (the encoders are frozen)."""

    images: torch.Tensor  # [N, 3, S, S] in [-1, 1]
    controls: torch.Tensor  # [N, 3, S, S] palette images in [0, 1]
    null_control: torch.Tensor  # [3, S, S] palette image of an all-ignore mask (no label anywhere)
    prompts: list[str]
    loss_weights: torch.Tensor  # [N, 1, s, s] per latent pixel (see ``foreground_weights``)


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


def batch_indices(count: int, batch_size: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """Batch ``step`` depends only on (seed, step, rank), so a resumed run draws what it would have."""
    generator = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
    return torch.randint(count, (batch_size,), generator=generator)
