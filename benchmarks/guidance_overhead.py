"""Guided vs unguided generation: cost and objective gain of each guidance variant, same seeds, one run.

Two component sets, each in its own process:
- ``digits``: the committed DigitScenes model with the demo's settings (``configs/demo.yaml``: 20
  DDIM steps, CFG 4 against a no-label mask, entropy guidance at strength 0.1 in [0, 0.8)),
  guided by the demo segmenter (trained first if missing: about 2 minutes on 2 idle cores), on
  held-out val masks. Fidelity: the judge's mIoU (``models/digitscenes-judge``) when it exists.
- ``mid``: a random ~41 M-parameter set at 256 px whose VAE upsamples 8x, as SD's does, guided
  by a random segmenter at strength 0.3 (10 steps, batch 2). Its cost profile is SD-like; its
  objective gains do not count (random models: the segmenter's entropy sits within 0.5% of
  ln C, and a random VAE does not decode a block-averaged latent to a smaller copy of the image).

A variant is a set of ``guidance.`` config keys. ``every: k`` also multiplies the strength by k,
so the latent gets the same total push from k-times fewer guided steps. Per variant:
- time guided / unguided, wall clock and process CPU time. The unguided runs sit between the
  variants and each ratio divides by the two beside it. The workers' OpenMP threads sleep at
  barriers (``OMP_WAIT_POLICY=PASSIVE``): with other processes on the cores, spinning threads
  took 10x the work, so CPU time then counted waiting;
- the objective gain: the guiding objective on the final full-resolution images, guided /
  unguided, and its rise as a share of the exact path's (``through_unet``, full-resolution
  decode);
- on the trained set, the strength at which the variant's rise matches the exact path's:
  ``--calibration-steps`` updates of its strength multiplier (``next_multiplier``: proportional
  until the tried rises bracket the exact one, then interpolated), keeping the run whose share
  is nearest 1; then its share and the judge's mIoU at that strength. A variant *keeps the
  gain* when its calibrated share is >= ``--keep`` (0.9) and its calibrated judge mIoU is at
  most ``--fidelity-drop`` (0.05) below the exact path's. Its cost does not depend on the
  strength, so its time ratio stands.
- the reduced view error (``decode_downsample``): how far the decode of the block-averaged
  latent is from a smaller copy of the image;
- the tiny decoder error (``decoder``): how far the tiny decoder's image of the unguided final
  latents is from the full VAE's (RMS gap over the image's RMS contrast).

The tiny-decoder variants (``decoder: TINY_DECODER``) decode the x0 estimate for guidance with an
``AutoencoderTiny``: on ``digits`` the one distilled for the committed model
(``make tiny-decoder``); on ``mid`` a random one of TAESD's default architecture (8x, as
``madebyollin/taesd``), for its cost only. Mid's random VAE is ~20x lighter than SD-1.5's (its
decoder forward + backward at 256 px: 0.9 s on one thread, TAESD's 1.1 s, SD-1.5's architecture
22.5 s), so mid shows no saving from a tiny decoder, while with SD-1.5's VAE TAESD's decode is
~20x cheaper than the full one.

    python benchmarks/guidance_overhead.py [--count 8 --mid-steps 10 --mid-batch 2 --calibration-steps 3]
    python benchmarks/guidance_overhead.py --variants "through_unet, tiny decoder" "x0_shortcut, tiny decoder"
    # quick check of the wiring (minutes, numbers meaningless):
    python benchmarks/guidance_overhead.py --sets mid --mid-steps 2 --mid-batch 1 --calibration-steps 0 \
        --variants "x0_shortcut, tiny decoder"

Last line: ``ratio: <guided / unguided CPU time on mid>`` of the cheapest variant that keeps the gain.
"""

import argparse
import dataclasses
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DEMO_CONFIG = "configs/demo.yaml"
GUIDE_CONFIG = "configs/segmenter_digits.yaml"  # trains the demo's guide


@dataclasses.dataclass(frozen=True)
class Variant:
    keys: dict  # guidance config keys
    strength: float = 1.0  # factor on the set's strength (besides ``every``'s)


SHORTCUT = {"gradient_path": "x0_shortcut"}
TINY_DECODER = "models/digitscenes-controlnet/tiny_decoder"  # digits' distilled decoder; mid builds a random TAESD
GRADIENT_DECODER = "models/digitscenes-controlnet/tiny_decoder_gradients"  # the same, fine-tuned on gradients
# the first is today's default, the exact path
VARIANTS: dict[str, Variant] = {
    "through_unet": Variant({}),
    "through_unet, decode /2": Variant({"decode_downsample": 2}),
    "x0_shortcut": Variant(SHORTCUT),
    "x0_shortcut, decode /2": Variant({**SHORTCUT, "decode_downsample": 2}),
    "x0_shortcut, decode /4": Variant({**SHORTCUT, "decode_downsample": 4}),
    "x0_shortcut, every 2": Variant({**SHORTCUT, "every": 2}),
    "x0_shortcut, decode /2, every 2": Variant({**SHORTCUT, "decode_downsample": 2, "every": 2}),
    "through_unet, decode /2, every 2": Variant({"decode_downsample": 2, "every": 2}),
    # the exact gradient path guiding sparsely: its UNet backward alone is ~1.4 unguided passes
    # per guided step on mid, so only about every 4th step fits 1.5x (every 3rd: 1.58x)
    "through_unet, decode /2, every 4": Variant({"decode_downsample": 2, "every": 4}),
    "through_unet, every 4": Variant({"every": 4}),
    "through_unet, tiny decoder": Variant({"decoder": TINY_DECODER}),
    "x0_shortcut, tiny decoder": Variant({**SHORTCUT, "decoder": TINY_DECODER}),
    "x0_shortcut, gradient-matched tiny decoder": Variant({**SHORTCUT, "decoder": GRADIENT_DECODER}),
    # the VAE's image for the objective (one VAE forward more), the gradient through the tiny decoder
    "x0_shortcut, gradient-matched tiny decoder, VAE image": Variant({**SHORTCUT, "decoder": GRADIENT_DECODER,
                                                                     "decoder_image": "vae"}),
    # half the guided steps at twice the strength, each at full resolution
    "x0_shortcut, tiny decoder, every 2": Variant({**SHORTCUT, "decoder": TINY_DECODER, "every": 2}),
    "x0_shortcut, gradient-matched tiny decoder, every 2": Variant({**SHORTCUT, "decoder": GRADIENT_DECODER, "every": 2}),
    "x0_shortcut, tiny decoder, decode /2, VAE image": Variant({**SHORTCUT, "decoder": TINY_DECODER,
                                                               "decode_downsample": 2, "decoder_image": "vae"}),
    # on mid the full-resolution view, not the decoder, is what costs (see above)
    "x0_shortcut, tiny decoder, decode /2": Variant({**SHORTCUT, "decoder": TINY_DECODER, "decode_downsample": 2}),
}
EXACT = "through_unet"


@dataclasses.dataclass
class Run:
    wall: float  # seconds
    cpu: float  # process CPU seconds (all threads)
    objective: float  # mean guiding objective of the final images
    fidelity: Optional[float]  # judge mIoU of the final images


@dataclasses.dataclass
class Setup:
    make_sampler: Callable  # guidance config (None: unguided) -> GuidedControlNetSampler
    guidance: object  # the set's GuidanceConfig, that the variants change
    masks: Tensor  # [N, H, W]
    prompts: list[str]
    seeds: list[int]
    objective: Callable  # the guiding objective, (images [N, 3, H, W], masks) -> [N]
    fidelity: Callable  # images [N, 3, H, W] -> judge mIoU against the masks, or None
    trained: bool  # whether the set's models are trained (only then does its objective gain count)


def guidance_for(base, variant: Variant):
    """``base`` (a GuidanceConfig) with a variant's keys; ``every: k`` scales the strength by k."""
    return dataclasses.replace(base, **variant.keys, strength=base.strength * variant.strength * variant.keys.get("every", 1))


def next_multiplier(tried: list[tuple[float, float]], target: float, limit: float = 4.0) -> float:
    """The next strength multiplier to try for an objective rise of ``target``, from the
    ``(multiplier, rise)`` pairs tried so far. Once two neighbouring multipliers' rises straddle
    the target, linear interpolation between the lowest such pair (the rise need not grow
    monotonically with strength, and the lower strength harms the image less); before that, the
    multiplier that would hit it if the last rise were proportional to strength, changing by at
    most ``limit``x (a rise <= 0 says only "push harder")."""
    ordered = sorted(tried)
    for (low, low_rise), (high, high_rise) in zip(ordered, ordered[1:]):
        if (low_rise - target) * (high_rise - target) <= 0 and low_rise != high_rise:
            return low + (target - low_rise) * (high - low) / (high_rise - low_rise)
    multiplier, rise = tried[-1]
    factor = target / rise if rise > 0 else limit
    return multiplier * min(max(factor, 1 / limit), limit)


def guide_overrides(args) -> list[str]:
    """``--guide``: calibrate against another segmenter than the demo's (the strength that matches
    the exact path's push depends on the guide)."""
    return [f"guidance.segmenters=[{args.guide}]"] if args.guide else []


def digits_setup(args) -> Setup:
    """The committed model with the demo's settings and guide."""
    from al.config import load_config
    from al.metrics import SegmentationScores, confusion_matrix
    from al.models import load_model
    from guidedgen.generate import GenerateConfig, build_components, build_sampler
    from guidedgen.palette import build_palette
    from guidedgen.guidance import build_objective
    from guidedgen.palette import prompt_for
    from guidedgen.quality import JUDGE_DIR, load_judge
    from guidedgen.writer import sample_seed

    config = load_config(GenerateConfig, DEMO_CONFIG, ["progress=false"] + guide_overrides(args))
    data = dataclasses.replace(config.masks, num_val_images=args.count, num_train_images=args.count).build(config.masks_split)
    masks = torch.stack([data[i].mask for i in range(args.count)])
    prompts = [prompt_for(m, list(data.classes), config.prompt_template) for m in masks]
    seeds = [sample_seed(config.seed, i) for i in range(args.count)]
    guides = [load_model(path, "cpu") for path in config.guidance.segmenters]
    objective = build_objective(config.guidance.objective, guides, data.ignore_index, **config.guidance.options)
    components = build_components(config, torch.device("cpu"))
    palette = build_palette(config.palette, list(data.classes), data.ignore_index)
    judge = load_judge(JUDGE_DIR)[0] if Path(JUDGE_DIR, "config.json").is_file() else None

    def make_sampler(guidance):
        variant = dataclasses.replace(config, guidance=guidance or config.guidance)
        return build_sampler(variant, components, palette, guides, data.ignore_index,
                             strength=None if guidance else 0.0)

    def fidelity(images):
        if judge is None:
            return None
        confusion = confusion_matrix(judge.predict(images), masks, len(data.classes), data.ignore_index)
        return SegmentationScores.from_confusion(confusion).miou

    return Setup(make_sampler, config.guidance, masks, prompts, seeds, objective, fidelity, trained=True)


def mid_setup(args) -> Setup:
    """The random mid-size set (no judge: its images are not scenes)."""
    from diffusers import AutoencoderTiny

    from al.data import DIGIT_CLASSES, DigitScenesConfig, digit_scenes
    from al.models import build_segmenter
    from guidedgen.components import tiny_components
    from guidedgen.generate import GuidanceConfig
    from guidedgen.guidance import build_objective
    from guidedgen.guidance_decoder import FULL_VAE
    from guidedgen.palette import Palette, distinct_ade20k_colours
    from guidedgen.sampler import GuidedControlNetSampler

    components = tiny_components(0, unet_channels=(64, 128, 256, 256), vae_channels=(32, 64, 128, 128))
    masks = torch.from_numpy(digit_scenes(DigitScenesConfig(num_images=args.mid_batch, size=256)).masks).long()
    torch.manual_seed(0)
    segmenter = build_segmenter("unet", "tu-resnet10t", 11, encoder_depth=4, decoder_channels=(64, 32, 16, 16))
    base = GuidanceConfig(strength=0.3)
    objective = build_objective(base.objective, [segmenter])
    palette = Palette(tuple(DIGIT_CLASSES), distinct_ade20k_colours(11))
    torch.manual_seed(0)
    taesd = AutoencoderTiny().requires_grad_(False).eval()  # TAESD's default architecture: upsamples 8x

    def make_sampler(guidance):
        guidance = guidance or dataclasses.replace(base, strength=0.0)
        return GuidedControlNetSampler(components, palette, objective, guidance.schedule(), guidance.gradient_path,
                                       args.mid_steps, decode_downsample=guidance.decode_downsample,
                                       guidance_decoder=None if guidance.decoder == FULL_VAE else taesd,
                                       decoder_image=guidance.decoder_image)

    return Setup(make_sampler, base, masks, ["digits"] * args.mid_batch, list(range(args.mid_batch)), objective,
                 lambda images: None, trained=False)


SETS = {"digits": digits_setup, "mid": mid_setup}


@dataclasses.dataclass
class SetResult:
    unguided: list[Run]  # before the first variant and after each one
    runs: dict[str, Run]  # variant name -> its run
    view_error: dict[int, float]  # decode_downsample -> relative_view_error on the unguided latents
    decoder_error: Optional[float]  # relative_decoder_error on the unguided latents (None: no tiny-decoder variant)
    trained: bool
    calibrated: dict[str, list[tuple[float, Run]]]  # variant -> (strength multiplier, run) tried, trained sets


def relative_view_error(decode: Callable, latents: Tensor, factor: int) -> float:
    """How far the reduced view (decode of the block-averaged latent) is from a smaller copy of the
    image (the block-averaged full decode): RMS of their gap over the image's RMS contrast.
    ``latents [N, 4, h, w]``; 0 = the view is exactly the downsampled image."""
    from guidedgen.resolution import downsample_latents

    with torch.no_grad():
        view = decode(downsample_latents(latents, factor))
        reference = F.avg_pool2d(decode(latents), factor)
    return float((view - reference).square().mean().sqrt() / (reference - reference.mean()).square().mean().sqrt())


def relative_decoder_error(sampler, latents: Tensor) -> float:
    """How far ``sampler``'s guidance decoder shows ``latents [N, 4, h, w]`` from the full VAE's image:
    RMS of their gap over the image's RMS contrast (0 = the same images)."""
    with torch.no_grad():
        tiny, full = sampler.decode(latents, sampler.guidance_decoder), sampler.decode(latents)
    return float((tiny - full).square().mean().sqrt() / (full - full.mean()).square().mean().sqrt())


def worker(name: str, variants: list[str], args, queue) -> None:
    """Unguided runs between the variants; each variant's base is the mean of the two beside it, so
    a change in contention from other processes during the run reaches both sides of its ratio."""
    torch.set_num_threads(args.threads)
    setup = SETS[name](args)
    setup.make_sampler(None)(setup.masks[:1], setup.prompts[:1], setup.seeds[:1])  # warm-up: first-call allocations

    def run(guidance) -> tuple[Run, Tensor]:
        sampler = setup.make_sampler(guidance)
        wall, cpu = time.perf_counter(), time.process_time()
        output = sampler(setup.masks, setup.prompts, setup.seeds)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with torch.no_grad():
            value = float(setup.objective(output.images, setup.masks).mean())
        return Run(wall, cpu, value, setup.fidelity(output.images)), output.latents

    def calibrate(variant: str, target: float) -> list[tuple[float, Run]]:
        """The variant's runs at the strength multipliers tried to reach the ``target`` rise."""
        tried = [(VARIANTS[variant].strength, runs[variant])]
        for _ in range(args.calibration_steps):
            multiplier = next_multiplier([(m, r.objective - first.objective) for m, r in tried], target)
            scaled = dataclasses.replace(VARIANTS[variant], strength=multiplier)
            tried.append((multiplier, run(guidance_for(setup.guidance, scaled))[0]))
        return tried

    first, latents = run(None)
    unguided, runs = [first], {}
    for variant in variants:
        runs[variant] = run(guidance_for(setup.guidance, VARIANTS[variant]))[0]
        unguided.append(run(None)[0])
    target = runs[EXACT].objective - first.objective
    calibrated = {v: calibrate(v, target) for v in variants if v != EXACT} if setup.trained and target > 0 else {}
    factors = sorted({VARIANTS[v].keys.get("decode_downsample", 1) for v in variants} - {1})
    decode = setup.make_sampler(None).decode
    tiny = next((v for v in variants if "decoder" in VARIANTS[v].keys), None)
    decoder_error = relative_decoder_error(setup.make_sampler(guidance_for(setup.guidance, VARIANTS[tiny])),
                                           latents) if tiny else None
    queue.put(SetResult(unguided, runs, {f: relative_view_error(decode, latents, f) for f in factors}, decoder_error,
                        setup.trained, calibrated))


def measure(name: str, variants: list[str], args):
    """One set's ``SetResult``, measured in a fresh process."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=worker, args=(name, variants, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def ensure_guide(args) -> None:
    """Train the demo's guiding segmenter if it is missing."""
    from al.config import load_config
    from guidedgen.generate import GenerateConfig

    for path in load_config(GenerateConfig, DEMO_CONFIG, guide_overrides(args)).guidance.segmenters:
        if not Path(path, "config.json").is_file():
            start = time.perf_counter()
            subprocess.run([sys.executable, "scripts/train_segmenter.py", "--config", GUIDE_CONFIG, f"output_dir={path}"],
                           check=True)
            print(f"trained the missing guide {path} in {(time.perf_counter() - start) / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--count", type=int, default=8, help="digits: val masks (one batch)")
    parser.add_argument("--mid-steps", type=int, default=10)
    parser.add_argument("--mid-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--guide", help="digits: a segmenter folder to guide with instead of the demo's")
    parser.add_argument("--calibration-steps", type=int, default=3, help="strength updates per variant (trained sets)")
    parser.add_argument("--keep", type=float, default=0.9, help="share of the exact path's objective rise to keep")
    parser.add_argument("--fidelity-drop", type=float, default=0.05, help="judge mIoU a variant may lose vs the exact path")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by the spawned workers' OpenMP
    variants = [EXACT] + [v for v in args.variants if v != EXACT]
    if "digits" in args.sets:
        ensure_guide(args)
        for folder, make in ((TINY_DECODER, "make tiny-decoder (about 15 minutes)"),
                             (GRADIENT_DECODER, "python scripts/distill_tiny_decoder.py --config "
                                                "configs/tiny_decoder_digits_gradients.yaml (about 17 minutes)")):
            if any(VARIANTS[v].keys.get("decoder") == folder for v in variants) and not Path(folder, "config.json").is_file():
                sys.exit(f"{folder} is missing: {make}, or leave out its variants")
    ratios, keeps, gains = {}, {v: [] for v in variants}, {v: [] for v in variants}
    start = time.perf_counter()
    for name in args.sets:
        result = measure(name, variants, args)
        unguided, base = result.unguided, result.unguided[0]
        judged = base.fidelity is not None
        print(f"{name}{'' if result.trained else ' (random models: its gains do not count)'}: unguided "
              f"{min(u.wall for u in unguided):.1f}-{max(u.wall for u in unguided):.1f} s wall, "
              f"{min(u.cpu for u in unguided):.1f}-{max(u.cpu for u in unguided):.1f} s CPU, objective {base.objective:.5f}"
              + (f", judge mIoU {base.fidelity:.3f}" if judged else ""))
        print("  reduced view error: " + ", ".join(f"/{f} {e:.3f}" for f, e in result.view_error.items()))
        if result.decoder_error is not None:
            print(f"  tiny decoder error: {result.decoder_error:.3f}")
        print(f"  {'variant':40s} {'wall':>6s} {'CPU':>6s} {'gain':>7s} {'of exact':>8s}" + ("  judge" if judged else "")
              + ("  | calibrated: strength, of exact" + (", judge" if judged else "") if result.calibrated else ""))
        exact = result.runs[EXACT]
        exact_rise = exact.objective - base.objective

        def share(run: Run) -> float:
            return (run.objective - base.objective) / exact_rise if exact_rise > 0 else float("nan")

        for (variant, run), before, after in zip(result.runs.items(), unguided, unguided[1:]):
            wall, cpu = run.wall / ((before.wall + after.wall) / 2), run.cpu / ((before.cpu + after.cpu) / 2)
            ratios.setdefault(variant, {})[name] = cpu
            line = (f"  {variant:40s} {wall:5.2f}x {cpu:5.2f}x {run.objective / base.objective:7.3f} {share(run):8.2f}"
                    + (f"  {run.fidelity:.3f}" if judged else ""))
            tried = result.calibrated.get(variant, [(VARIANTS[variant].strength, run)])
            at, calibrated = min(tried, key=lambda t: abs(share(t[1]) - 1))  # nearest the exact rise
            if variant in result.calibrated:
                line += f"  | x{at:.2f}, {share(calibrated):.2f}" + (f", {calibrated.fidelity:.3f}" if judged else "")
                line += "\n    tried: " + ", ".join(f"x{m:.2f} {share(r):.2f}" + (f" ({r.fidelity:.3f})" if judged else "")
                                             for m, r in sorted(tried, key=lambda t: t[0]))
            print(line)
            if result.trained:  # only trained models' gains count
                faithful = not judged or calibrated.fidelity >= exact.fidelity - args.fidelity_drop
                gains[variant].append(share(calibrated) >= args.keep)
                keeps[variant].append(gains[variant][-1] and faithful)
    # without a trained set no gain is judged, and only the exact path is known to keep its own
    kept = [v for v in variants if keeps[v] and all(keeps[v])] or [EXACT]
    print(f"total {(time.perf_counter() - start) / 60:.1f} min; keeps the gain (calibrated share >= {args.keep:g}, "
          f"judge mIoU >= the exact path's - {args.fidelity_drop:g}): {'; '.join(kept)}")
    headline = "mid" if "mid" in args.sets else args.sets[0]
    cheapest = min([v for v in variants if gains[v] and all(gains[v])] or [EXACT], key=lambda v: ratios[v][headline])
    print(f"the gain alone (judge not counted): cheapest {cheapest}, {ratios[cheapest][headline]:.2f}x on {headline}")
    best = min(kept, key=lambda v: ratios[v][headline])
    print(f"best: {best} ({headline})")
    print(f"ratio: {ratios[best][headline]:.2f}")


if __name__ == "__main__":
    main()
