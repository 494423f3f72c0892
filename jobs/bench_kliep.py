"""Benchmark: KLIEP kernel evaluation against its bound, and the solver's time for growing N.

  python jobs/bench_kliep.py [--n 100000] [--dim 399] [--centers 100]

(1) rows/s of `gaussian_kernel` (N x D features against b centres) against a plain torch matmul of
    the same shape, the bound (the kernel is that matmul plus norms and an exp), in one process;
(2) wall time of `solve_kliep` (the default Newton method) for N = 1k, 10k, 100k target rows.
CPU always; the same on a GPU when torch sees one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from synreal_ray.kliep import gaussian_kernel, solve_kliep  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def spfeat_like(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.gamma(0.3, size=(n, dim)).astype(np.float32)
    return x / x.sum(1, keepdims=True) * (dim / 19)  # rows of per-cell histograms, roughly


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=399)
    p.add_argument("--centers", type=int, default=100)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x, c = spfeat_like(rng, args.n, args.dim), spfeat_like(rng, args.centers, args.dim)
    sigma = 1.0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"machine: {describe()}\n")
    print(f"(1) kernel rows: {args.n} x {args.dim} features against {args.centers} centres (float32)\n")
    print("| device | gaussian_kernel rows/s | torch matmul rows/s (bound) | kernel / bound |\n|---|---|---|---|")
    for dev in devices:  # each lambda is timed within its own iteration, so late binding is harmless
        if dev == "cpu":
            kern = best(lambda: gaussian_kernel(x, c, sigma))
            xt, ct = torch.from_numpy(x), torch.from_numpy(c)
            mm = best(lambda: xt @ ct.T)  # noqa: B023
        else:
            xt, ct = torch.from_numpy(x).cuda(), torch.from_numpy(c).cuda()
            kern = best(lambda: (gaussian_kernel(xt, ct, sigma), torch.cuda.synchronize()))  # noqa: B023
            mm = best(lambda: (xt @ ct.T, torch.cuda.synchronize()))  # noqa: B023
        print(f"| {dev} | {args.n / kern:,.0f} | {args.n / mm:,.0f} | {mm / kern:.2f} |")
    if len(devices) == 1:
        print("| cuda | skipped: no GPU in this session | | |")

    print(f"\n(2) solve_kliep (newton) on N target kernel rows x {args.centers} centres\n")
    print("| device | N | seconds | passes | converged |\n|---|---|---|---|---|")
    source_mean = gaussian_kernel(spfeat_like(rng, 2000, args.dim), c, sigma).mean(0)
    for dev in devices:
        for n in (1_000, 10_000, 100_000):
            a = gaussian_kernel(spfeat_like(rng, n, args.dim), c, sigma)
            t = time.perf_counter()
            sol = solve_kliep(a, source_mean, device=dev)
            print(f"| {dev} | {n:,} | {time.perf_counter() - t:.2f} | {sol.iterations} | {sol.converged} |")


if __name__ == "__main__":
    main()
