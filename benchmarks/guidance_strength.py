"""Guidance strength sweep: how far does guidance push its objective before the scene breaks?

For each strength, generates the same held-out masks with the same seeds as a generation config
(default: the demo's, i.e. the committed model guided by the demo segmenter) and reports the
objective under the guiding models on the final images (guidance should raise it) beside the
pixel accuracy and mIoU of an independent judge segmenter trained on real scenes (the scene
should still follow its mask). Too strong a push paints adversarial patterns: the objective
still rises while the judge falls.

    python scripts/train_segmenter.py --config configs/segmenter_digits.yaml  # the guide (make demo does it)
    python scripts/train_segmenter.py --config configs/segmenter_judge.yaml   # the judge
    python benchmarks/guidance_strength.py [--config configs/demo.yaml --strengths 0 0.01 0.03 0.1 0.3]
"""

import argparse
import dataclasses
import time

import torch

from al.config import load_config
from al.metrics import SegmentationScores, confusion_matrix
from al.models import load_model
from guidedgen.generate import (
    GenerateConfig,
    build_components,
    build_palette,
    build_sampler,
)
from guidedgen.guidance import build_objective
from guidedgen.palette import prompt_for
from guidedgen.writer import sample_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--judge", default="outputs/segmenter_judge")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--count", type=int, default=16)
    args = parser.parse_args()
    config = load_config(GenerateConfig, args.config)
    config.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = dataclasses.replace(config.masks, num_val_images=args.count, num_train_images=args.count)
    data = dataset.build(config.masks_split)
    classes, ignore_index = list(data.classes), data.ignore_index
    masks = torch.stack([data[i].mask for i in range(args.count)]).to(device)
    prompts = [prompt_for(m, classes, config.prompt_template) for m in masks]
    seeds = [sample_seed(config.seed, i) for i in range(args.count)]
    guides = [load_model(path, device) for path in config.guidance.segmenters]
    objective = build_objective(config.guidance.objective, guides, ignore_index, **config.guidance.objective_options())
    judge = load_model(args.judge, device)
    components = build_components(config, device)
    palette = build_palette(config.palette, classes, ignore_index)
    print(f"{config.guidance.objective} guidance, {args.count} {config.masks_split} masks, judge {args.judge}")
    print(f"{'strength':>8}  {'objective':>9}  {'judge accuracy':>14}  {'judge mIoU':>10}  {'s/sample':>8}")
    for strength in args.strengths:
        sampler = build_sampler(config, components, palette, guides, ignore_index, strength=strength)
        start = time.perf_counter()
        images = torch.cat([sampler(masks[i:i + config.batch_size], prompts[i:i + config.batch_size],
                                    seeds[i:i + config.batch_size]).images
                            for i in range(0, args.count, config.batch_size)]).float()
        seconds = (time.perf_counter() - start) / args.count
        with torch.no_grad():
            value = float(objective(images, masks).mean())
            prediction = judge.predict(images)
        scores = SegmentationScores.from_confusion(confusion_matrix(prediction, masks, len(classes), ignore_index))
        print(f"{strength:>8g}  {value:>9.3f}  {scores.pixel_accuracy:>14.3f}  {scores.miou:>10.3f}  {seconds:>8.2f}")


if __name__ == "__main__":
    main()
