"""BalEnt scoring throughput: al.scores.balent_acquisition vs a straightforward float64 torch
port of the reference code (whole tensor at once, log-probabilities -> logsumexp mean, as in
jaeohwoo/BalancedEntropy), same inputs, same run. Each variant runs in its own process so its
peak extra memory (RSS above the input) is measured separately.

    python benchmarks/balent_speed.py [--k 20 --c 19 --n 2 --size 512]

Last line: ``ratio: <ours pixels/s / reference pixels/s>``.
"""

import argparse
import math
import multiprocessing as mp
import resource
import time

import numpy as np
import torch


def reference_port(mc_probs: torch.Tensor) -> torch.Tensor:
    """The reference formula, float64 end to end, on [pixels, K, C] log-probabilities."""
    k, n, c = mc_probs.shape[:3]
    logits = mc_probs.permute(1, 3, 4, 0, 2).reshape(-1, k, c).double().clamp_min(1e-45).log()
    mean = torch.exp(torch.logsumexp(logits, dim=1) - math.log(k))
    var = torch.var(torch.exp(logits), dim=1)
    m, v = mean.clamp_min(1e-9), var.clamp_min(1e-9)
    alpha = m * m * (1 - m) / v - m
    beta = (1 / m - 1) * alpha
    beta_function = torch.exp(torch.lgamma(alpha + 1) + torch.lgamma(beta) - torch.lgamma(alpha + beta + 1)) + 1e-32
    h = (torch.log(beta_function) - alpha * torch.digamma(alpha + 1)
         - (beta - 1) * torch.digamma(beta) + (alpha + beta - 1) * torch.digamma(alpha + beta + 1))
    term = m * h
    term[term > 0] = 0
    joint = term.sum(1)
    joint[torch.isnan(joint)] = -99999999999
    mean_log = torch.logsumexp(logits, dim=1) - math.log(k)
    ent = -torch.sum(torch.exp(mean_log) * mean_log, dim=1)
    value = (ent + 0.69314718056) / (joint + ent)
    value[value < 0] = 1 / value[value < 0]
    return value.reshape(n, *mc_probs.shape[3:])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(variant: str, args, queue) -> None:
    from al.scores import balent_acquisition

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    # softmax in place, so creating the input leaves no high-water mark above it
    mc_probs = torch.randn(args.k, args.n, args.c, args.size, args.size, generator=generator).mul_(2).exp_()
    mc_probs /= mc_probs.sum(2, keepdim=True)
    base = rss_mb()
    fn = balent_acquisition if variant == "ours" else reference_port
    start = time.perf_counter()
    out = fn(mc_probs)
    seconds = time.perf_counter() - start
    queue.put((variant, seconds, rss_mb() - base, out[0, :4, :4].numpy().copy()))  # numpy: no shared fd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--c", type=int, default=19)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pixels = args.n * args.size * args.size
    context = mp.get_context("spawn")
    results = {}
    for variant in ("reference", "ours"):
        queue = context.Queue()
        process = context.Process(target=worker, args=(variant, args, queue))
        process.start()
        results[variant] = queue.get()
        process.join()
        _, seconds, extra, _ = results[variant]
        print(f"{variant:9s}: {seconds:7.2f} s  {pixels / seconds / 1e6:6.3f} Mpixel/s  peak extra memory {extra:8.0f} MB")
    assert np.allclose(results["ours"][3], results["reference"][3], rtol=1e-6), "outputs differ"
    print(f"input: K={args.k} C={args.c} {args.n}x{args.size}x{args.size} float32; outputs agree (rtol 1e-6)")
    print(f"memory ratio (reference / ours): {results['reference'][2] / max(results['ours'][2], 1):.1f}")
    print(f"ratio: {results['reference'][1] / results['ours'][1]:.2f}")


if __name__ == "__main__":
    main()
