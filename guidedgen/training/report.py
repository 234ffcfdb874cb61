"""What a run shows of itself: the validation sample sheet and the model card (README.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guidedgen.components import Components
from guidedgen.palette import build_palette, prompt_for
from guidedgen.sampler import GuidedControlNetSampler
from guidedgen.training.config import TrainControlNetConfig


@torch.no_grad()
def validation_sheet(components: Components, config: TrainControlNetConfig, classes: list[str], path: Path,
                     count: int = 8) -> Path:
    """Unguided samples for the first ``count`` validation masks: control row over sample row."""
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
