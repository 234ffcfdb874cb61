"""Mask fidelity of the trained DigitScenes ControlNet set: do generated images show their masks?

Fidelity = mIoU between held-out conditioning masks (DigitScenes val) and the predictions of a
segmenter trained on *real* DigitScenes (the committed judge, ``models/digitscenes-judge``), on
images generated from those masks (unguided). Beside it, the same segmenter on the real images
of those masks (the judge's own ceiling) and on their VAE reconstructions (the ceiling any
sample of this VAE can reach).

    python benchmarks/mask_fidelity.py [--model models/digitscenes-controlnet --count 64]
    python scripts/train_segmenter.py --config configs/segmenter_judge.yaml \
        output_dir=models/digitscenes-judge   # remakes the judge (about 42 minutes on 2 cores)

The sampling defaults are the committed model's (CFG 4 against a no-label mask, conditioning
scale 1.5, 20 DDIM steps), read from configs/base/digitscenes_controlnet.yaml, the file the
generation configs include; ``--negative-mask none`` is diffusers' CFG, whose negative branch
sees the mask too.

Last line: ``mask_fidelity: <mIoU of generated images>``.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from al.config import load_config
from al.data import DigitScenesConfig, digit_scenes
from al.metrics import SegmentationScores, confusion_matrix
from al.models import Segmenter
from al.plots import class_colours, save_figure
from guidedgen.components import SCHEDULERS, ComponentsConfig, load_components
from guidedgen.generate import GenerateConfig, negative_mask_fill
from guidedgen.palette import PaletteConfig, build_palette, prompt_for
from guidedgen.quality import JUDGE_DIR, load_judge
from guidedgen.sampler import GuidedControlNetSampler

# the committed model and its sampling settings, as the generation configs use them
MODEL_SETTINGS = Path(__file__).resolve().parents[1] / "configs" / "base" / "digitscenes_controlnet.yaml"


def miou(segmenter: Segmenter, images: torch.Tensor, masks: torch.Tensor, num_classes: int,
         ignore_index: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        prediction = torch.cat([segmenter(images[i:i + 32]).argmax(1) for i in range(0, len(images), 32)])
    confusion = confusion_matrix(prediction, masks, num_classes, ignore_index)
    return SegmentationScores.from_confusion(confusion).miou, prediction


def object_errors(prediction: torch.Tensor, masks: torch.Tensor, background: int = 0, ignore_index: int = 255) -> dict:
    """Where the judge goes wrong on object pixels: ``missed`` = called background (the object is
    not visible to it), ``misread`` = called another object class (visible, wrong shape/identity)."""
    objects = (masks != background) & (masks != ignore_index)
    predicted = prediction[objects]
    return {"missed": float((predicted == background).float().mean()),
            "misread": float(((predicted != background) & (predicted != masks[objects])).float().mean())}


def sheet(masks, generated, predictions, real, colours, path: Path, rows: int = 6) -> None:
    titles = ["mask", "generated (unguided)", "judge on generated", "real image"]
    figure = Figure(figsize=(2.0 * len(titles), 2.1 * rows))
    for r in range(rows):
        panels = [colours[masks[r]], generated[r], colours[predictions[r]], real[r]]
        for c, panel in enumerate(panels):
            axes = figure.add_subplot(rows, len(titles), r * len(titles) + c + 1)
            axes.imshow(panel)
            axes.set_xticks([])
            axes.set_yticks([])
            if r == 0:
                axes.set_title(titles[c], fontsize=8)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # defaults: the committed model's sampling settings (its model card), so a bare run measures it as shipped
    shipped = load_config(GenerateConfig, MODEL_SETTINGS)
    parser.add_argument("--model", default=shipped.components.pretrained_model_name_or_path)
    parser.add_argument("--judge", default=JUDGE_DIR)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--steps", type=int, default=shipped.num_inference_steps)
    parser.add_argument("--scheduler", default=shipped.components.scheduler, choices=sorted(SCHEDULERS))
    parser.add_argument("--guidance-scale", type=float, default=shipped.guidance_scale)
    parser.add_argument("--conditioning-scale", type=float, default=shipped.controlnet_conditioning_scale[0],
                        help="controlnet_conditioning_scale")
    parser.add_argument("--negative-mask", default=shipped.negative_mask or "none",
                        help='what the CFG negative branch sees instead of the mask: "ignore", a class name, '
                             'or "none" (it sees the mask itself, as in diffusers)')
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sheet", default="docs/results/mask_fidelity.png")
    parser.add_argument("--write-quality", action="store_true", help="also write <model>/quality.json")
    args = parser.parse_args()
    try:
        judge, judge_record = load_judge(args.judge)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    model = Path(args.model)
    components = load_components(ComponentsConfig(pretrained_model_name_or_path=str(model),
                                                  controlnet_model_name_or_path=[str(model / "controlnet")],
                                                  scheduler=args.scheduler, local_files_only=True))
    negative_mask = None if args.negative_mask == "none" else args.negative_mask
    data = digit_scenes(DigitScenesConfig(num_images=args.count, split="val", size=64))
    classes = list(data.classes)
    masks = torch.from_numpy(data.masks).long()
    real = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    palette = build_palette(PaletteConfig(), classes, data.ignore_index)
    sampler = GuidedControlNetSampler(components, palette, num_inference_steps=args.steps,
                                      guidance_scale=args.guidance_scale, negative_prompt=shipped.negative_prompt,
                                      controlnet_conditioning_scale=[args.conditioning_scale],
                                      negative_mask_fill=negative_mask_fill(negative_mask, classes, data.ignore_index))
    start = time.perf_counter()
    generated = torch.cat([
        sampler(masks[i:i + args.batch], [prompt_for(m, classes) for m in masks[i:i + args.batch]],
                list(range(i, min(i + args.batch, args.count)))).images
        for i in range(0, args.count, args.batch)])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        vae = components.vae
        reconstructed = (vae.decode(vae.encode(real * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    fidelity, predictions = miou(judge, generated, masks, len(classes), data.ignore_index)
    real_miou, real_predictions = miou(judge, real, masks, len(classes), data.ignore_index)
    vae_miou, vae_predictions = miou(judge, reconstructed, masks, len(classes), data.ignore_index)
    background = classes.index("background")
    errors = {name: object_errors(p, masks, background, data.ignore_index) for name, p in
              (("real", real_predictions), ("vae_reconstructions", vae_predictions), ("generated", predictions))}
    to_uint8 = lambda x: (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    colours = (class_colours(len(classes)) * 255).astype(np.uint8)
    Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
    sheet(masks.numpy(), to_uint8(generated), predictions.numpy(), to_uint8(real), colours, Path(args.sheet))
    result = {"mask_fidelity_miou": fidelity, "judge_on_real_miou": real_miou, "judge_on_vae_reconstructions_miou": vae_miou,
              "held_out_masks": args.count, "scheduler": args.scheduler, "steps": args.steps, "guidance_scale": args.guidance_scale,
              "controlnet_conditioning_scale": args.conditioning_scale, "negative_mask": negative_mask,
              "object_pixel_errors": errors, "seconds_per_sample": seconds / args.count, "judge": args.judge,
              "judge_val_miou": judge_record["val_miou"]}
    if args.write_quality:
        (model / "quality.json").write_text(json.dumps(result, indent=2))
    print(f"judge {args.judge}: {judge_record['val_miou']:.3f} mIoU on its own val scenes")
    print(f"judge on real val images:        {real_miou:.3f} mIoU")
    print(f"judge on VAE reconstructions:    {vae_miou:.3f} mIoU")
    print(f"judge on generated images:       {fidelity:.3f} mIoU ({seconds / args.count:.2f} s/sample, {args.steps} steps)")
    for name, error in errors.items():
        print(f"object pixels on {name + ':':20} {error['missed']:.3f} missed (called background), "
              f"{error['misread']:.3f} misread (another digit)")
    print(f"sheet: {args.sheet}")
    print(f"mask_fidelity: {fidelity:.3f}")


if __name__ == "__main__":
    main()
