"""Guided vs unguided generation: wall time and peak memory, same seeds, same run.

Each variant runs in a fresh process so its peak RSS is its own. Component sets: the tiny one
(64x64) and a mid-size one (~41 M parameters, 256x256). Guidance: the default schedule of
``guidedgen.generate.GuidanceConfig`` (entropy, every step in [0, 0.8)), both gradient paths.

    python benchmarks/guidance_overhead.py [--steps 10 --batch 2]

Last line: ``ratio: <guided / unguided wall time>`` for the mid-size set, ``through_unet``.
"""

import argparse
import multiprocessing as mp
import resource
import time

import torch

from guidedgen.generate import GuidanceConfig

PRESETS = {
    "tiny": dict(size=64, unet_channels=(16, 32), vae_channels=(8, 16, 16)),
    "mid": dict(size=256, unet_channels=(64, 128, 256, 256), vae_channels=(32, 64, 128, 128)),
}


def worker(preset: str, path: str, args, queue) -> None:
    from al.data import DIGIT_CLASSES, DigitScenesConfig, digit_scenes
    from al.models import build_segmenter
    from guidedgen.components import tiny_components
    from guidedgen.guidance import build_objective
    from guidedgen.palette import Palette, distinct_ade20k_colours
    from guidedgen.sampler import GuidedControlNetSampler

    torch.set_num_threads(args.threads)
    spec = PRESETS[preset]
    components = tiny_components(0, unet_channels=spec["unet_channels"], vae_channels=spec["vae_channels"])
    masks = torch.from_numpy(digit_scenes(DigitScenesConfig(num_images=args.batch, size=spec["size"])).masks).long()
    torch.manual_seed(0)
    segmenter = build_segmenter("unet", "tu-resnet10t", 11, encoder_depth=4, decoder_channels=(64, 32, 16, 16))
    defaults = GuidanceConfig(strength=0.3, every=args.every)
    objective = build_objective(defaults.objective, [segmenter]) if path != "unguided" else None
    sampler = GuidedControlNetSampler(
        components, Palette(tuple(DIGIT_CLASSES), distinct_ade20k_colours(11)), objective, defaults.schedule(),
        gradient_path=path if path != "unguided" else "through_unet", num_inference_steps=args.steps,
    )
    prompts, seeds = ["digits"] * args.batch, list(range(args.batch))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    sampler(masks, prompts, seeds)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for m in components.modules() for p in m.parameters()) / 1e6
    queue.put((seconds, peak - base, params))


def measure(preset: str, path: str, args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=worker, args=(preset, path, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=GuidanceConfig.every, help="guide every n-th step of the window")
    args = parser.parse_args()
    ratio = None
    for preset in PRESETS:
        base_seconds, base_memory, params = measure(preset, "unguided", args)
        print(f"{preset} ({params:.1f} M params, {PRESETS[preset]['size']}px, batch {args.batch}, {args.steps} steps): "
              f"unguided {base_seconds:6.2f} s, peak +{base_memory:6.0f} MB")
        for path in ("through_unet", "x0_shortcut"):
            seconds, memory, _ = measure(preset, path, args)
            print(f"  {path:12s}: {seconds:6.2f} s ({seconds / base_seconds:4.2f}x), peak +{memory:6.0f} MB "
                  f"({memory / max(base_memory, 1):4.2f}x)")
            if preset == "mid" and path == "through_unet":
                ratio = seconds / base_seconds
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
