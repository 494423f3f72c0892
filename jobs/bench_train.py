"""Benchmark: the Ray Train loop against the same model in a plain single-process PyTorch loop.

  python jobs/bench_train.py [--model cyclegan] [--size 64x128] [--steps 30] [--batch-size 4] [--workers 1,2]

Both train the same model on the same procedural demo images (written to a temporary folder) for
the same number of steps; images/s leaves out the first (warm-up) step in both. The ratio
Ray / plain is the overhead of the distributed loop (Ray Data streaming, DDP, reporting). With a
GPU the default size becomes 256x512 (the seeds' resolution) and the workers use it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from synreal_ray.config import from_dict  # noqa: E402
from synreal_ray.datasets.demo import make_demo_data  # noqa: E402
from synreal_ray.models import build_model  # noqa: E402
from synreal_ray.train import TrainConfig, prepare_data, read_training_image, run_train, to_model_input  # noqa: E402


def plain_loop(cfg: TrainConfig, device: torch.device) -> float:
    """images/s of model.train_step over the sampler's batches, images loaded in this process."""
    data = prepare_data(cfg)
    sampler = data.sampler(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **cfg.model_config).to(device)
    opts = model.make_optimizers(lr=cfg.lr)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    syn_uri, real_uri = dict(zip(data.syn_ids, data.syn_uris)), dict(zip(data.real_ids, data.real_uris))
    t0 = None
    for step in range(cfg.steps):
        b = sampler.next_batch()
        syn = torch.from_numpy(np.stack([read_training_image(syn_uri[i], cfg.size) for i in b.syn_ids])).to(device)
        real = torch.from_numpy(np.stack([read_training_image(real_uri[i], cfg.size) for i in b.real_ids])).to(device)
        model.train_step(to_model_input(syn), to_model_input(real), torch.from_numpy(b.w_syn).to(device),
                         torch.from_numpy(b.w_real).to(device), opts, scaler=scaler, amp=use_amp)
        if step == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (cfg.steps - 1) * cfg.batch_size / (time.perf_counter() - t0)


def main(argv=None) -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cyclegan", choices=["unit", "cyclegan"])
    p.add_argument("--size", default="256x512" if gpu else "64x128")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to measure")
    p.add_argument("--base-channels", type=int, default=64 if gpu else 16)
    args = p.parse_args(argv)

    from synreal_ray.cluster import init_ray

    h, w = (int(v) for v in args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    make_demo_data(str(root / "data"), num_syn=32, num_real=32, num_val=0, height=h, width=w, progress=False)
    model_config = {"base_channels": args.base_channels, "n_res": 6 if gpu else 2}
    if args.model == "unit":
        model_config.update(dis_layers=3, dis_scales=2)
    base = {"syn": str(root / "data/syn"), "real": str(root / "data/real"), "real_split": "train",
            "model": args.model, "model_config": model_config, "image_size": args.size, "batch_size": args.batch_size,
            "steps": args.steps, "checkpoint_every": args.steps, "grid_every": args.steps, "log_every": args.steps}
    device = torch.device("cuda" if gpu else "cpu")
    print(f"machine: {describe()}")
    print(f"{args.model}, {args.size}, base_channels {args.base_channels}, batch {args.batch_size}, {args.steps} steps\n")
    if not gpu:
        torch.set_num_threads(1)  # as a Ray Train worker with its one CPU (Ray sets OMP_NUM_THREADS=1)
    t = time.perf_counter()
    plain = plain_loop(from_dict(TrainConfig, {**base, "out": str(root / "plain")}), device)
    rows = [("plain PyTorch loop, 1 process", plain, time.perf_counter() - t)]
    init_ray()
    for n in (int(v) for v in args.workers.split(",")):
        if args.batch_size % n:
            continue
        t = time.perf_counter()
        rec = run_train(from_dict(TrainConfig, {**base, "workers": n, "out": str(root / f"ray{n}")}))
        rows.append((f"Ray Train, {n} worker(s)", rec["images_per_s"], time.perf_counter() - t))
    print("| loop | images/s (after step 1) | vs plain | wall s, start-up included |\n|---|---|---|---|")
    for name, r, secs in rows:
        print(f"| {name} | {r:.2f} | {r / plain:.2f}x | {secs:.1f} |")
    shutil.rmtree(root, ignore_errors=True)
    if not gpu:
        print("\n256x512 on a GPU: skipped (no GPU on this machine)")


if __name__ == "__main__":
    main()
