"""Benchmark the pairing KNN: faiss CPU (flat, IVF), numpy brute force, faiss GPU when present.

    python jobs/bench_knn.py                # 25,000 synthetic queries x 3,000 real, D=399, k=15
    python jobs/bench_knn.py --large        # 1M x 100k: GPU only (CPU rows timed on a sample)

The data is seeded random SP-Feat-shaped vectors (levels 1,2,4 of 19 classes: 21 cells, each a
class histogram summing to 1, coarse cells the means of the fine ones, drawn around a few dozen
scene layouts). Prints a Markdown table of queries/s and the ratio against numpy brute force, which
runs in the same process as the baseline. "exact" rows include KnnIndex's exact refinement
(distances from differences, ties by index); "raw" rows are faiss's own search alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from machine import describe  # noqa: E402
from synreal_ray.knn import KnnIndex, brute_force_knn, gpu_available, measure_recall  # noqa: E402

CLASSES = 19
FINE = 4  # the finest level is a 4 x 4 grid; levels 2 and 1 are block means of it


def spfeat_like(n: int, rng: np.random.Generator, layouts: np.ndarray, chunk: int = 50_000) -> np.ndarray:
    """n SP-Feat-shaped rows (levels 1, 2, 4): each image mixes two scene layouts plus noise."""
    out = np.empty((n, (1 + 4 + FINE * FINE) * CLASSES), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        a, b = rng.integers(0, len(layouts), (2, m))
        mix = rng.random((m, 1, 1))
        shape = 20.0 * (mix * layouts[a] + (1 - mix) * layouts[b]) + 0.05
        fine = rng.standard_gamma(shape).astype(np.float32)
        fine /= fine.sum(-1, keepdims=True)
        grid = fine.reshape(m, FINE, FINE, CLASSES)
        level2 = grid.reshape(m, 2, 2, 2, 2, CLASSES).mean(axis=(2, 4)).reshape(m, 4, CLASSES)
        level1 = grid.mean(axis=(1, 2)).reshape(m, 1, CLASSES)
        out[s : s + m] = np.concatenate([level1, level2, fine], axis=1).reshape(m, -1)
    return out


def machine() -> str:
    return (f"{describe()}; faiss {faiss.__version__} with {faiss.omp_get_max_threads()} OpenMP threads, "
            f"{faiss.get_num_gpus()} GPU(s) visible to faiss; numpy {np.__version__}")


def best_time(fn, repeat: int):
    """(best wall time in seconds, last result) over `repeat` runs: the machine may be shared."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="1M synthetic x 100k real (needs a GPU)")
    ap.add_argument("--n-syn", type=int, default=None, help="synthetic queries (default 25,000; 1M with --large)")
    ap.add_argument("--n-real", type=int, default=None, help="real set size (default 3,000; 100k with --large)")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default KnnIndex's)")
    ap.add_argument("--sample", type=int, default=2000, help="queries for IVF recall, and for CPU rows with --large")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per row, best kept (default 3; 1 with --large)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(machine())
    if args.large and not gpu_available():
        why = "faiss sees no GPU" if faiss.get_num_gpus() == 0 else "this faiss build has no GPU support"
        print(f"--large (1M x 100k) runs on a GPU only and was skipped: {why} (faiss-gpu-cu12 on a GPU machine).")
        return 2
    n_syn = args.n_syn or (1_000_000 if args.large else 25_000)
    n_real = args.n_real or (100_000 if args.large else 3_000)
    repeat = args.repeat or (1 if args.large else 3)
    k = args.k

    rng = np.random.default_rng(args.seed)
    layouts = rng.dirichlet(np.full(CLASSES, 0.3), size=(48, FINE * FINE))
    t = time.perf_counter()
    real = spfeat_like(n_real, rng, layouts)
    queries = spfeat_like(n_syn, rng, layouts)
    gen_s = time.perf_counter() - t
    print(f"data: {n_syn:,} synthetic x {n_real:,} real, D={real.shape[1]}, k={k} ({gen_s:.1f} s to generate)")

    # With --large only the GPU searches all queries; the CPU rows time a sample (queries/s is linear in it).
    cpu_q = queries[: args.sample] if args.large else queries
    cpu_note = f" (on {len(cpu_q):,} queries)" if args.large else ""
    rows: list[tuple[str, str, float, float, int, str]] = []

    t_np, (_, ref_i) = best_time(lambda: brute_force_knn(real, cpu_q, k), repeat)
    rows.append(("numpy brute force (BLAS float64)" + cpu_note, "cpu", 0.0, t_np, len(cpu_q), "reference"))
    qps_np = len(cpu_q) / t_np

    def run(name: str, device: str, q: np.ndarray, **kw) -> None:
        t = time.perf_counter()
        index = KnnIndex(real, device=device, **kw)
        build = time.perf_counter() - t
        index.search(q[:256], k)  # warm-up: thread pools, GPU kernels
        secs, (_, got_i) = best_time(lambda: index.search(q, k), repeat)
        if index.kind == "ivf":
            recall = measure_recall(index, real, queries[: args.sample], k)
            check = f"recall@{k} = {recall:.4f} (nlist={index.nlist}, nprobe={index.nprobe})"
        else:
            n = min(len(got_i), len(ref_i))
            same = float((got_i[:n] == ref_i[:n]).all(axis=1).mean())
            check = f"{100 * same:.2f}% of rows = numpy" + (f" (first {n:,})" if n < len(got_i) else "")
        rows.append((name, index.device, build, secs, len(q), check))

    run("faiss flat, exact" + cpu_note, "cpu", cpu_q)
    run("faiss flat, raw" + cpu_note, "cpu", cpu_q, refine=False)
    run("faiss IVF-flat, exact distances" + cpu_note, "cpu", cpu_q, kind="ivf", nprobe=args.nprobe)
    gpu_note = None
    if gpu_available():
        run("faiss flat, exact", "cuda", queries)
        run("faiss flat, raw", "cuda", queries, refine=False)
        run("faiss IVF-flat, exact distances", "cuda", queries, kind="ivf", nprobe=args.nprobe)
    else:
        why = "faiss sees no GPU" if faiss.get_num_gpus() == 0 else "this faiss build has no GPU support"
        gpu_note = f"faiss GPU rows skipped: {why} (faiss {faiss.__version__})."

    print()
    print("| method | device | build s | search s | queries/s | vs numpy | check |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, device, build, secs, n, check in rows:
        qps = n / secs
        print(f"| {name} | {device} | {build:.2f} | {secs:.2f} | {qps:,.0f} | {qps / qps_np:.1f}x | {check} |")
    if gpu_note:
        print(f"\n{gpu_note}")
    print(f"\nbest of {repeat} run(s) per row; search s is for that row's query count.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
