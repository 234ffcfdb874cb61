"""Cost of last-layer MC dropout: al.mc.mc_probs with K samples vs one deterministic forward
pass of the same segmenter, same inputs, same run (median of repeats).

    python benchmarks/mc_cost.py [--k 20 --batch 32 --size 64]

Last line: ``ratio: <mc_probs time / deterministic time>`` (target: under 1.5).
"""

import argparse
import statistics
import time

import torch

from al.loop import ModelConfig
from al.mc import mc_probs


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    # The model of configs/al_digits.yaml (random weights: cost does not depend on them).
    model = ModelConfig(encoder="tu-efficientnet_lite0").build(args.classes).eval()
    images = torch.rand(args.batch, 3, args.size, args.size)
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def deterministic():
        return model(images).softmax(1)

    single = median_seconds(deterministic, args.repeats)
    mc = median_seconds(lambda: mc_probs(model, images, args.k, generator), args.repeats)
    print(f"deterministic forward: {single * 1000:8.1f} ms  ({args.batch}x3x{args.size}x{args.size})")
    print(f"mc_probs K={args.k}:        {mc * 1000:8.1f} ms")
    print(f"ratio: {mc / single:.2f}")


if __name__ == "__main__":
    main()
