"""Guidance strength sweep: how far does guidance push its objective before the scene breaks?

For each strength, generates the same held-out masks with the same seeds as a generation config
(default: the demo's, i.e. the committed model guided by the demo segmenter) and reports the
objective under the guiding models on the final images (guidance should raise it) beside the
pixel accuracy and mIoU of an independent judge segmenter trained on real scenes (the committed
``models/digitscenes-judge``: the scene should still follow its mask). Too strong a push paints
adversarial patterns: the objective still rises while the judge falls. A missing guiding
segmenter is trained first with ``--guide-config`` (the demo's: about 2 minutes on 2 cores).

    python benchmarks/guidance_strength.py [--config configs/demo.yaml --strengths 0 0.01 0.03 0.1 0.3]

Last line: ``ratio: <objective at the config's strength / unguided objective>``.
"""

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import torch

from al.config import load_config
from al.metrics import SegmentationScores, confusion_matrix
from al.models import load_model
from guidedgen.generate import GenerateConfig, build_components, build_sampler
from guidedgen.guidance import build_objective
from guidedgen.palette import build_palette, prompt_for
from guidedgen.quality import JUDGE_DIR, load_judge
from guidedgen.writer import sample_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--judge", default=JUDGE_DIR)
    parser.add_argument("--guide-config", default="configs/segmenter_digits.yaml",
                        help="scripts/train_segmenter.py config that trains a missing guiding segmenter")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--count", type=int, default=16)
    args = parser.parse_args()
    config = load_config(GenerateConfig, args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        judge, _ = load_judge(args.judge, device)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    for path in config.guidance.segmenters:
        if not Path(path, "config.json").is_file():
            start = time.perf_counter()
            subprocess.run([sys.executable, "scripts/train_segmenter.py", "--config", args.guide_config,
                            f"output_dir={path}"], check=True)
            print(f"trained the missing guide {path} in {(time.perf_counter() - start) / 60:.1f} min")
    config.validate()  # after the guides exist: it checks their folders
    strengths = sorted({0.0, config.guidance.strength, *args.strengths})  # the ratio's two ends always run
    dataset = dataclasses.replace(config.masks, num_val_images=args.count, num_train_images=args.count)
    data = dataset.build(config.masks_split)
    classes, ignore_index = list(data.classes), data.ignore_index
    masks = torch.stack([data[i].mask for i in range(args.count)]).to(device)
    prompts = [prompt_for(m, classes, config.prompt_template) for m in masks]
    seeds = [sample_seed(config.seed, i) for i in range(args.count)]
    guides = [load_model(path, device) for path in config.guidance.segmenters]
    objective = build_objective(config.guidance.objective, guides, ignore_index, **config.guidance.options)
    components = build_components(config, device)
    palette = build_palette(config.palette, classes, ignore_index)
    print(f"{config.guidance.objective} guidance, {args.count} {config.masks_split} masks, judge {args.judge}")
    print(f"{'strength':>8}  {'objective':>9}  {'judge accuracy':>14}  {'judge mIoU':>10}  {'s/sample':>8}")
    objectives = {}
    for strength in strengths:
        sampler = build_sampler(config, components, palette, guides, ignore_index, strength=strength)
        start = time.perf_counter()
        images = torch.cat([sampler(masks[i:i + config.batch_size], prompts[i:i + config.batch_size],
                                    seeds[i:i + config.batch_size]).images
                            for i in range(0, args.count, config.batch_size)]).float()
        seconds = (time.perf_counter() - start) / args.count
        with torch.no_grad():
            value = objectives[strength] = float(objective(images, masks).mean())
            prediction = judge.predict(images)
        scores = SegmentationScores.from_confusion(confusion_matrix(prediction, masks, len(classes), ignore_index))
        print(f"{strength:>8g}  {value:>9.3f}  {scores.pixel_accuracy:>14.3f}  {scores.miou:>10.3f}  {seconds:>8.2f}")
    print(f"ratio: {objectives[config.guidance.strength] / objectives[0.0]:.3f}")


if __name__ == "__main__":
    main()
