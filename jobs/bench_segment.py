"""Benchmark: `synreal seg-eval` (Ray Data + segmenter actor pool) against a plain loop.

  python jobs/bench_segment.py [--n 48] [--size 128x256] [--model lraspp_mobilenet_v3_large]
                               [--batch-size 4] [--actors N]

Writes N procedural synthetic images with their label maps (the demo generator) and a checkpoint
of an untrained segmenter (speed does not depend on the weights) to a temporary folder. Both
variants do the same work on the same files: read and decode the image and its label map, map
the labels to train IDs, predict at full resolution, add the image's confusion matrix. The plain
loop runs in this process (torch's default threads); the Ray variant is `run_seg_eval` end to
end (listing, actor start-up, eval.json/eval.md/confusion.png and _SUCCESS included; Ray itself
started before the clock). One row per device: CPU always, GPU when this machine has one.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe, pool_row  # noqa: E402
from synreal_ray import storage  # noqa: E402
from synreal_ray.datasets.demo import make_demo_data  # noqa: E402
from synreal_ray.datasets.labels import NUM_CLASSES  # noqa: E402
from synreal_ray.datasets.layouts import list_dataset  # noqa: E402
from synreal_ray.segment import (  # noqa: E402
    STATE,
    SegEvalConfig,
    build_segmenter,
    confusion_matrix,
    predict,
    read_sample,
    read_segmenter,
    run_seg_eval,
    segmenter_from_payload,
)


def save_checkpoint(folder: str, name: str, size) -> None:
    """A segment checkpoint (state.pt + meta.json) of an untrained model."""
    import torch

    torch.manual_seed(0)
    model = build_segmenter(name)
    buf = io.BytesIO()
    torch.save({"model_name": name, "num_classes": NUM_CLASSES, "model": model.state_dict(), "optimizer": {},
                "scheduler": {}, "scaler": None, "step": 0}, buf)
    storage.write_bytes(storage.join(folder, STATE), buf.getvalue())
    storage.write_json(storage.join(folder, "meta.json"),
                       {"step": 0, "model_name": name, "num_classes": NUM_CLASSES, "image_size": list(size),
                        "state_bytes": len(buf.getvalue())})


def plain_loop(ckpt: str, dataset: str, batch_size: int, device: str) -> tuple[float, np.ndarray]:
    """images/s of one process doing the stage's work batch by batch, no Ray; and its matrix."""
    samples, _ = list_dataset(dataset, "synscapes")
    model = segmenter_from_payload(read_segmenter(ckpt), device)
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    t = time.perf_counter()
    for s in range(0, len(samples), batch_size):
        pairs = [read_sample(x.image_uri, x.label_uri) for x in samples[s:s + batch_size]]
        for pred, (_, label) in zip(predict(model, [im for im, _ in pairs]), pairs):
            cm += confusion_matrix(pred, label)
    return len(samples) / (time.perf_counter() - t), cm


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--size", default="128x256", help="HxW of the generated images")
    p.add_argument("--model", default="lraspp_mobilenet_v3_large")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", type=int, default=None, help="default: one per GPU, else CPUs / 2")
    args = p.parse_args(argv)

    import ray
    import torch

    from synreal_ray.cluster import init_ray

    h, w = (int(v) for v in args.size.split("x"))
    tmp = tempfile.mkdtemp(prefix="bench-segment-")
    make_demo_data(os.path.join(tmp, "demo"), num_syn=args.n, num_real=1, num_val=0, height=h, width=w, progress=False)
    dataset, ckpt = os.path.join(tmp, "demo", "syn"), os.path.join(tmp, "ckpt")
    save_checkpoint(ckpt, args.model, (h, w))
    init_ray()

    print(f"machine: {describe()}; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{args.n} images of {h}x{w}, {args.model} (untrained), batch {args.batch_size}; Ray cluster "
          f"{ray.cluster_resources().get('CPU', 0):g} logical CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
          f"plain loop with {torch.get_num_threads()} torch threads\n")
    print("| device | plain loop (images/s) | Ray end to end (images/s) | Ray after actor start-up (images/s) "
          "| actors | Ray / plain (end to end, steady) |")
    print("|---|---|---|---|---|---|")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    notes = []
    for device in devices:
        plain, cm = plain_loop(ckpt, dataset, args.batch_size, device)
        cfg = SegEvalConfig(model=ckpt, dataset=dataset, layout="synscapes", out=os.path.join(tmp, f"eval-{device}"),
                            batch_size=args.batch_size, actors=args.actors, device=device, in_process_max=0)  # the pool
        t = time.perf_counter()
        rec = run_seg_eval(cfg, force=True)
        pool = args.n / (time.perf_counter() - t)
        # near-tie pixels may flip between the loop's and the actors' thread counts and batches
        flipped = int(np.abs(np.asarray(rec["confusion"]) - cm).sum()) // 2
        label = "CPU" if device == "cpu" else f"GPU ({torch.cuda.get_device_name(0)}, fp16 autocast)"
        print(pool_row(label, plain, pool, rec["steady_images_per_s"], rec["actors"]))
        notes.append(f"{label}: the pool's and the loop's confusion matrices differ by {flipped} of "
                     f"{int(cm.sum())} pixels")
    if not torch.cuda.is_available():
        print("| GPU | skipped: no GPU in this session | | | | |")
    print("\n" + "\n".join(notes))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    storage.delete_dir(tmp)


if __name__ == "__main__":
    main()
