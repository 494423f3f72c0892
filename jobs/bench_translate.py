"""Benchmark: `synreal translate` (Ray Data + generator actor pool) against a plain loop.

  python jobs/bench_translate.py [--n 32] [--size 128x256] [--model cyclegan] [--base-channels 32]
                                 [--n-res 6] [--batch-size 8] [--actors N]

Writes N procedural synthetic images (the demo generator) and a checkpoint of an untrained model
(speed does not depend on the weights) to a temporary folder. Both variants do the same work on
the same files: read, decode, translate at full resolution, encode PNG, write the image and copy
its label. The plain loop runs in this process with one generator; the Ray variant is
`run_translate` end to end (actor start-up, journal and manifest included; Ray itself started
before the clock). One row per device: CPU always, GPU when this machine has one.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe, pool_row  # noqa: E402
from synreal_ray import storage  # noqa: E402
from synreal_ray.datasets.demo import make_demo_data  # noqa: E402
from synreal_ray.datasets.layouts import list_dataset  # noqa: E402
from synreal_ray.translate import (  # noqa: E402
    TranslateConfig,
    decode_rgb,
    encode_image,
    generator_from_payload,
    read_generator,
    run_translate,
    translate_batch,
)


def save_checkpoint(folder: str, name: str, config: dict, size) -> None:
    import torch

    from synreal_ray.models import build_model

    torch.manual_seed(0)
    model = build_model(name, **config)
    buf = io.BytesIO()
    torch.save({"model_name": name, "model_config": config, "model": model.state_dict(), "optimizers": {},
                "schedulers": {}, "sampler": {}, "step": 0}, buf)
    storage.write_bytes(storage.join(folder, "state.pt"), buf.getvalue())
    storage.write_json(storage.join(folder, "meta.json"),
                       {"step": 0, "model_name": name, "model_config": config, "image_size": list(size),
                        "state_bytes": len(buf.getvalue())})  # last, with state.pt's size: complete (checkpoints.py)


def plain_loop(ckpt: str, dataset: str, out: str, batch_size: int, device: str, amp: bool) -> float:
    """images/s of one process doing the stage's work batch by batch, no Ray."""
    samples, _ = list_dataset(dataset, "synscapes")
    gen, multiple = generator_from_payload(read_generator(ckpt), device)
    t = time.perf_counter()
    for s in range(0, len(samples), batch_size):
        batch = samples[s:s + batch_size]
        images = [decode_rgb(storage.read_bytes(x.image_uri), x.image_uri) for x in batch]
        for x, y in zip(batch, translate_batch(gen, images, multiple, amp)):
            storage.write_bytes(storage.join(out, storage.relpath(x.image_uri, dataset)), encode_image(y, x.image_uri))
            storage.write_bytes(storage.join(out, storage.relpath(x.label_uri, dataset)), storage.read_bytes(x.label_uri))
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return len(samples) / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--size", default="128x256", help="HxW of the generated images")
    p.add_argument("--model", default="cyclegan", choices=["cyclegan", "unit"])
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--n-res", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=None, help="default: one per GPU, else CPUs / 2")
    args = p.parse_args(argv)

    import ray
    import torch

    from synreal_ray.cluster import init_ray

    h, w = (int(v) for v in args.size.split("x"))
    config = {"base_channels": args.base_channels, "n_res": args.n_res}
    tmp = tempfile.mkdtemp(prefix="bench-translate-")
    make_demo_data(os.path.join(tmp, "demo"), num_syn=args.n, num_real=1, num_val=0, height=h, width=w, progress=False)
    dataset, ckpt = os.path.join(tmp, "demo", "syn"), os.path.join(tmp, "ckpt")
    save_checkpoint(ckpt, args.model, config, (h, w))
    init_ray()

    print(f"machine: {describe()}")
    print(f"{args.n} images of {h}x{w}, {args.model} {config}, batch {args.batch_size}; "
          f"Ray cluster {ray.cluster_resources().get('CPU', 0):g} logical CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs\n")
    print("| device | plain loop (images/s) | Ray end to end (images/s) | Ray after actor start-up (images/s) "
          "| actors | Ray / plain (end to end, steady) |")
    print("|---|---|---|---|---|---|")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        plain = plain_loop(ckpt, dataset, os.path.join(tmp, f"plain-{device}"), args.batch_size, device, amp=True)
        cfg = TranslateConfig(checkpoint=ckpt, dataset=dataset, layout="synscapes", out=os.path.join(tmp, f"ray-{device}"),
                              batch_size=args.batch_size, actors=args.actors, device=device)
        t = time.perf_counter()
        rec = run_translate(cfg, force=True)
        pool = args.n / (time.perf_counter() - t)
        label = "CPU" if device == "cpu" else f"GPU ({torch.cuda.get_device_name(0)}, fp16 autocast)"
        print(pool_row(label, plain, pool, rec["steady_images_per_s"], rec["actors"]))
    if not torch.cuda.is_available():
        print("| GPU | skipped: no GPU in this session | | | | |")
    storage.delete_dir(tmp)


if __name__ == "__main__":
    main()
