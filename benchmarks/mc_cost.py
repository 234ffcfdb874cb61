"""Cost of last-layer MC dropout vs one deterministic forward pass of the same segmenter, same
inputs, same run: al.mc.mc_probs (the [K, N, C, H, W] stack), mc_moments at full resolution and
at the decoder's resolution (what the AL loop runs). Beside them two references: the floor of
any last-layer MC, the backbone alone, and K separate deterministic heads + softmaxes (no masks,
no statistics) at full and at decoder resolution.

Each variant is timed in turns with the forward, and its ratio is the median of the pairs'
ratios, so a machine that speeds up or slows down moves both sides of a ratio alike. With the
forward timed once beforehand (best of 5), four idle runs put the Unet at 1.47-1.86x; the median
of 20 pairs gave 1.45, 1.45 and 1.46 in three trials of one run.

Two settings: BalEntAcq's (DeepLabV3+ MobileNetV2, 19 classes, 2x3x512x512) and the AL
benchmark's Unet (configs/al_digits3.yaml: EfficientNet-Lite0 encoder, depth 4, 4 classes,
32x3x64x64; it decodes at full resolution, so both mc_moments rows are the same work).

    python benchmarks/mc_cost.py [--k 20 --repeats 11]

Last line: ``ratio: <mc_moments at decoder resolution / deterministic>``, the larger of the two
settings (target <= 1.5), with each setting's ratio and backbone-alone floor beside it.
"""

import argparse
import statistics
import time

import torch

from al.mc import mc_moments, mc_probs
from al.models import build_segmenter

SETTINGS = {
    "al benchmark unet 32x64x64": (dict(arch="unet", encoder="tu-efficientnet_lite0", num_classes=4, encoder_depth=4,
                                        decoder_channels=(64, 32, 16, 16)), (32, 3, 64, 64)),
    "balentacq deeplabv3+ mobilenet_v2 2x512x512": (dict(arch="deeplabv3plus", encoder="mobilenet_v2", num_classes=19),
                                                     (2, 3, 512, 512)),
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratio(fn, reference, repeats: int) -> tuple[float, float, float]:
    """``fn`` and ``reference`` run in turns after one warm-up each: the median of the pairs'
    time ratios, and the best time of each."""
    fn(), reference()
    pairs = [(seconds(fn), seconds(reference)) for _ in range(repeats)]
    return statistics.median(a / b for a, b in pairs), min(a for a, _ in pairs), min(b for _, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    ratios, floors = {}, {}
    for name, (spec, shape) in SETTINGS.items():
        torch.manual_seed(0)
        model = build_segmenter(**spec).eval()  # random weights: cost does not depend on them
        images = torch.rand(shape)
        generator = torch.Generator().manual_seed(0)

        @torch.no_grad()
        def deterministic():
            return model(images).softmax(1)

        def heads_only(upsample: bool):
            @torch.no_grad()
            def run():
                features = model.features(images)
                for _ in range(args.k):
                    model.classify(features, stochastic=False, upsample=upsample).softmax(1)
            return run

        variants = {
            "mc_probs": lambda: mc_probs(model, images, args.k, generator),
            "mc_moments": lambda: mc_moments(model, images, args.k, generator),
            "mc_moments at decoder resolution": lambda: mc_moments(model, images, args.k, generator, True),
            "floor: the backbone alone": torch.no_grad()(lambda: model.features(images)),
            "K separate heads, no masks or sums": heads_only(True),
            "K separate heads at decoder resolution": heads_only(False),
        }
        for variant, fn in variants.items():
            ratio, cost, single = paired_ratio(fn, deterministic, args.repeats)
            print(f"{name}: {variant:38s} K={args.k}: {ratio:.2f}x the deterministic forward "
                  f"(best {cost * 1000:.1f} ms vs {single * 1000:.1f} ms)", flush=True)
            if variant == "mc_moments at decoder resolution":
                ratios[name] = ratio
            elif variant.startswith("floor"):
                floors[name] = ratio
    beside = "; ".join(f"{name} {ratios[name]:.2f}x, floor {floors[name]:.2f}x" for name in ratios)
    print(f"ratio: {max(ratios.values()):.2f} ({beside})")


if __name__ == "__main__":
    main()
