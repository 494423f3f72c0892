"""Benchmark: FID activation extraction on Ray Data (Inception actor pool) against a plain loop.

  python jobs/bench_fid.py [--n 64] [--size 128x256] [--dims 2048] [--batch-size 16] [--actors N]
                           [--inception-weights PATH|URI]

Writes N procedural images (the demo generator's real-looking side) to a temporary folder. Both
variants read, decode and run pytorch-fid's Inception on the same files: the plain loop in this
process with one network (what `python -m pytorch_fid` does), the Ray variant through
`synreal_ray.fid.set_activations` with an empty cache (actor start-up and Parquet writes included;
Ray itself started before the clock). Without real weights (flag, $SYNREAL_INCEPTION_WEIGHTS or
torch's hub cache) a seeded random-weight file is used and the output says so: the speed is the
same. One row per device: CPU always, GPU when this machine has one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe, pool_row  # noqa: E402
from synreal_ray import fid, storage  # noqa: E402
from synreal_ray.datasets.demo import make_demo_data  # noqa: E402


def plain_loop(files: list[str], weights: bytes, dims: int, batch_size: int, device: str) -> float:
    model = fid.load_inception(weights, dims, device)
    t = time.perf_counter()
    for s in range(0, len(files), batch_size):
        fid.activations([fid.decode_for_inception(storage.read_bytes(u), None, u) for u in files[s:s + batch_size]], model)
    return len(files) / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--size", default="128x256", help="HxW of the generated images (Inception resizes to 299)")
    p.add_argument("--dims", type=int, default=2048, choices=fid.DIMS)
    p.add_argument("--batch-size", type=int, default=16, help="small enough to give every actor several batches")
    p.add_argument("--actors", type=int, default=None, help="default: one per GPU, else CPUs / 2")
    p.add_argument("--inception-weights", default=None)
    args = p.parse_args(argv)

    import ray
    import torch

    from synreal_ray.cluster import init_ray

    h, w = (int(v) for v in args.size.split("x"))
    tmp = tempfile.mkdtemp(prefix="bench-fid-")
    make_demo_data(os.path.join(tmp, "demo"), num_syn=1, num_real=args.n, num_val=0, height=h, width=w, progress=False)
    root = os.path.join(tmp, "demo", "real", "leftImg8bit")
    try:
        weights_uri, note = fid.find_weights(args.inception_weights), "pytorch-fid FID weights"
    except FileNotFoundError:
        weights_uri = fid.make_random_inception_weights(os.path.join(tmp, "random-inception.pth"), seed=0)
        note = "RANDOM weights (no FID weights file here; speed is the same, values are not FIDs)"
    weights = storage.read_bytes(weights_uri)
    files = [f.uri for f in fid.list_images(root)]
    init_ray()

    print(f"machine: {describe()}")
    print(f"{len(files)} images of {h}x{w} (Inception input 299x299), dims {args.dims}, batch {args.batch_size}, "
          f"{note}; Ray cluster {ray.cluster_resources().get('CPU', 0):g} logical CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs\n")
    print("| device | plain loop (images/s) | Ray end to end (images/s) | Ray after actor start-up (images/s) "
          "| actors | Ray / plain (end to end, steady) |")
    print("|---|---|---|---|---|---|")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        plain = plain_loop(files, weights, args.dims, args.batch_size, device)
        cfg = fid.FidConfig(a=root, b=root, weights=weights_uri, dims=args.dims, cache=os.path.join(tmp, f"cache-{device}"),
                            batch_size=args.batch_size, actors=args.actors, device=device, in_process_max=0)  # the pool
        t = time.perf_counter()
        info = fid.set_activations([root], cfg, weights_uri, weights)[0]
        pool = len(files) / (time.perf_counter() - t)
        label = "CPU" if device == "cpu" else f"GPU ({torch.cuda.get_device_name(0)})"
        print(pool_row(label, plain, pool, info["steady_images_per_s"], info["actors"]))
    if not torch.cuda.is_available():
        print("| GPU | skipped: no GPU in this session | | | | |")
    storage.delete_dir(tmp)


if __name__ == "__main__":
    main()
