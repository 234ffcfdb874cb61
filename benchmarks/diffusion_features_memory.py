"""Peak memory and time of diffusion-feature extraction + pixel-ensemble training: ours (pixels
sampled per image, features interpolated at those pixels only from the blocks' low-resolution
outputs, fp16, written into one budget-sized buffer) against a dense float32 reimplementation of
the reference (ddpm-segmentation keeps every training pixel's features as one float32 [pixels, D]
array, then trains on all of them), same UNet, same ensemble recipe, same run, one image per UNet
forward for both. Each (variant, image count) runs in its own process, so its peak RSS above the
loaded model and data is measured alone; then each ensemble's majority vote is scored on 20
held-out val scenes, so "same mIoU" is visible beside the memory.

    python benchmarks/diffusion_features_memory.py [--images 10 50 --members 10]

Ours samples 400 px/image: the val mIoU is that of 2,000 px/image (0.111 vs 0.112, measured) and
of the reference on every pixel, while 2,000 px would store 134 MB of fp16 features at 50 images
(ratio ~0.12). 2026-12-05, 2 cores beside another job, about 5 minutes:

    reference 50 images: 204,800 px, 187 s, peak extra 1,565 MB, val mIoU 0.107
    ours      50 images:  20,000 px,  29 s, peak extra    17 MB, val mIoU 0.112
    ratio: 0.011  (0.378 before: whole-batch upsampled maps, a buffer grown by concatenation, 2,000 px)

``--batch 8`` adds ~9 MB of UNet activations per image to ours. The reference trains its
ensemble on every pixel of every image (~3.5 s per image), so ``--images 10 50 200`` takes ~17 min.

Last line: ``ratio: <ours peak extra MB / dense reference peak extra MB, at 50 images>``.
"""

import argparse
import multiprocessing as mp
import resource
import time

import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(variant: str, count: int, args, queue) -> None:
    from al.data import DigitScenesConfig, digit_scenes
    from al.diffusion_features import (
        EnsembleConfig,
        PixelEnsemble,
        load_feature_extractor,
        sample_pixels,
    )

    torch.set_num_threads(args.threads)
    extractor = load_feature_extractor(args.model)
    dataset = digit_scenes(DigitScenesConfig(num_images=count, size=args.size))
    images = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float().div(255)
    masks = torch.from_numpy(dataset.masks).long()
    batches = [(images[i:i + args.batch], masks[i:i + args.batch]) for i in range(0, count, args.batch)]
    ensemble = PixelEnsemble(EnsembleConfig(in_features=extractor.dim, num_classes=dataset.num_classes,
                                            num_members=args.members))
    extractor(images[:1])  # first-call allocations belong to neither variant
    base = rss_mb()
    start = time.perf_counter()
    if variant == "ours":
        features, labels = sample_pixels(extractor.activations, batches, args.pixels_per_image, args.budget_mb * 2**20,
                                         generator=torch.Generator().manual_seed(0))
    else:  # the reference: dense float32 features of every pixel, all in memory, then flattened
        dense = torch.cat([extractor(batch) for batch, _ in batches])  # [N, D, H, W] float32
        features = dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1])
        del dense
        labels = masks.reshape(-1)
    extracted = time.perf_counter() - start
    ensemble.fit(features, labels)
    seconds = time.perf_counter() - start
    extra, pixels = rss_mb() - base, len(labels)
    del features, labels
    queue.put((variant, count, extracted, seconds, extra, pixels, val_miou(extractor, ensemble, args)))


def val_miou(extractor, ensemble, args) -> float:
    """mIoU of the ensemble's majority vote on held-out val scenes (after the memory reading)."""
    from al.data import DigitScenesConfig, digit_scenes
    from al.diffusion_features import majority_vote
    from al.metrics import SegmentationScores, confusion_matrix

    dataset = digit_scenes(DigitScenesConfig(num_images=args.val_images, size=args.size, split="val"))
    images = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float().div(255)
    masks = torch.from_numpy(dataset.masks).long()
    confusion = sum(confusion_matrix(majority_vote(ensemble.mc_probs(extractor(images[i:i + args.batch]))),
                                     masks[i:i + args.batch], dataset.num_classes)
                    for i in range(0, len(images), args.batch))
    return SegmentationScores.from_confusion(confusion).miou


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/digitscenes-controlnet")
    parser.add_argument("--images", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--pixels-per-image", type=int, default=400)
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="images per UNet forward (both variants)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--val-images", type=int, default=20, help="held-out scenes the mIoU is measured on")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = {}
    print(f"{'variant':<10} {'images':>6} {'pixels':>9} {'extract s':>9} {'total s':>8} {'peak extra MB':>13} "
          f"{'val mIoU':>8}")
    for count in args.images:
        for variant in ("reference", "ours"):
            queue = context.Queue()
            process = context.Process(target=worker, args=(variant, count, args, queue))
            process.start()
            result = queue.get()
            process.join()
            _, _, extracted, seconds, extra, pixels, miou = result
            results[variant, count] = result
            print(f"{variant:<10} {count:>6} {pixels:>9} {extracted:>9.1f} {seconds:>8.1f} {extra:>13.0f} {miou:>8.3f}")
    for count in args.images:
        memory = results["ours", count][4] / max(results["reference", count][4], 1.0)
        time_ratio = results["ours", count][3] / results["reference", count][3]
        print(f"{count} images: ours / reference peak extra memory {memory:.3f}, time {time_ratio:.2f}, "
              f"val mIoU {results['ours', count][6]:.3f} vs {results['reference', count][6]:.3f}")
    at = 50 if 50 in args.images else args.images[0]
    print(f"ratio: {results['ours', at][4] / max(results['reference', at][4], 1.0):.3f}")


if __name__ == "__main__":
    main()
