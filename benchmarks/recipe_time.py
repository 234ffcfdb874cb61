"""Projected wall time of the full ``scripts/train_controlnet.py`` recipe, from rates measured in one run.

Runs every stage of the recipe (its data, architecture and batch sizes) for a few steps in a
scratch folder — VAE, UNet + ControlNet (with one accelerate checkpoint), one validation sheet,
VAE decoder — times each, and projects the recipe's step counts. Per-step times include each
stage's warm-up and its one checkpoint, so the projection errs long.

    python benchmarks/recipe_time.py [--config configs/controlnet_digits.yaml --steps 300]

Last line: ``projected_recipe_minutes: <x>``.
"""

import argparse
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

from al.config import load_config
from guidedgen.training import (
    TrainControlNetConfig,
    build_untrained,
    finetune_vae_decoder,
    load_training_data,
    train_denoiser,
    train_vae,
    validation_sheet,
)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/controlnet_digits.yaml")
    parser.add_argument("--vae-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300, help="UNet + ControlNet steps to time")
    parser.add_argument("--decoder-steps", type=int, default=30)
    args = parser.parse_args()
    recipe = load_config(TrainControlNetConfig, args.config, [])
    recipe.validate()
    cpu = not torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch)
        config = replace(recipe, output_dir=scratch, vae_steps=args.vae_steps, max_train_steps=args.steps,
                         checkpointing_steps=args.steps, validation_steps=0, max_train_minutes=None,
                         resume_from_checkpoint=None)
        (data, classes), load = timed(load_training_data, config)
        components = build_untrained(config, len(classes))
        _, vae = timed(train_vae, components, data, config, output, Accelerator(cpu=cpu))
        summary, denoiser = timed(train_denoiser, components, data, config, output, Accelerator(cpu=cpu))
        loop = summary["stage_minutes"] * 60
        _, sheet = timed(validation_sheet, components, config, classes, output / "sheet.png")
        _, decoder = timed(finetune_vae_decoder, components.vae, data.images, args.decoder_steps, config.vae_batch_size,
                           config.vae_learning_rate, config.seed, components.unet.device, config.progress)
    sheets = recipe.max_train_steps // recipe.validation_steps if recipe.validation_steps else 0
    stages = {  # seconds in the full recipe
        "load data": load,
        "VAE": vae / args.vae_steps * recipe.vae_steps,
        "encode latents and prompts": denoiser - loop,
        "UNet + ControlNet": loop / args.steps * recipe.max_train_steps,
        f"{sheets} validation sheets": sheet * sheets,
        "VAE decoder": decoder / args.decoder_steps * recipe.vae_decoder_steps,
    }
    print(f"\nmeasured: VAE {vae / args.vae_steps:.2f} s/step, UNet + ControlNet {loop / args.steps:.3f} s/step "
          f"({args.steps / loop * 60:.0f} steps/min), VAE decoder {decoder / args.decoder_steps:.2f} s/step, "
          f"validation sheet {sheet:.1f} s; peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"projected for {args.config} ({torch.get_num_threads()} threads):")
    for name, seconds in stages.items():
        print(f"  {name:28} {seconds / 60:6.1f} min")
    print(f"projected_recipe_minutes: {sum(stages.values()) / 60:.1f}")


if __name__ == "__main__":
    main()
