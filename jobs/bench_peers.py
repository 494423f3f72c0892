"""Benchmark: whole `synreal` commands against their peers, on the same files, weights and threads.

  python jobs/bench_peers.py [--quick] [--only fid,train,translate] [--repeats 3] [--steps 20]
                             [--inception-weights PATH]

What a user pays is the whole command: Python start-up, imports and Ray start-up included. Each
comparison runs both commands as subprocesses of this script, on one machine, interleaved
A, B, A, B, ... `--repeats` times, and reports the medians and the ratio synreal / peer:

  fid        `synreal fid` against `python -m pytorch_fid A B --device cpu` (a dependency), same
             batch size and dims (2048), on the same images (pytorch-fid reads flat folders, so the
             real set, in city subfolders, is given to it as a folder of symlinks). Cold: an empty
             activation cache (a fresh one per repeat); warm: the same command again, cache
             filled (pytorch-fid has no cache: its one time serves both). Both print an FID: they
             should agree (synreal_ray/fid.py claims pytorch-fid's numbers).
  train      `synreal train` (1 worker, CPU, random pairing, no weighting: no other stage needed)
             against the plain loop of jobs/bench_train.py in a subprocess of this script
             (`--plain train`) at the torch thread count the Ray Train worker gets
             (cluster.use_assigned_cpus: min(its CPUs, the machine's cores)). Whole command, and
             steady time per iteration (images/s after the first step: stage.json's
             `images_per_s` against the plain loop's, measured the same way). And Ray Train's
             floor (`--plain ray-floor`): Ray started as synreal starts it and one TorchTrainer
             fit whose worker only imports torch: what any `synreal train` pays before its work.
  translate  `synreal translate` (default `--scale train`) against a plain loop in a subprocess
             (`--plain translate`): read, decode, translate at the training scale and back
             (translate.translate_images), encode PNG, write, copy the label; one torch thread,
             as synreal's in-process path and each of its pool actors use. The checkpoint is an
             untrained one (speed does not depend on the weights).

Settings (the original measurement): CycleGAN, base_channels 16, 6 residual blocks, trained at
64x128, batch 4, on the demo data (128x256): FID of the 96 synthetic against the 64 real images,
20 training iterations, translation of the 96 synthetic images. `--quick` shrinks the data and
steps and runs once: a smoke test, its ratios are not the targets'.

Inception weights: `--inception-weights`, else $SYNREAL_INCEPTION_WEIGHTS, else pytorch-fid's file
in the user's torch hub cache; without any, a seeded random-weight file in pytorch-fid's format
(the output says so: speed is the same, the values are not real FIDs). Either way the file is
placed in a temporary TORCH_HOME where both tools look, so both load the same file. Everything
lives in one temporary folder (Ray's session files too), removed at the end; the commands get
a local Ray of their own (RAY_ADDRESS unset), as on a user's machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = Path(__file__).resolve().parent
sys.path.insert(0, str(JOBS))
sys.path.insert(0, str(JOBS.parent))

MODEL_CONFIG = {"base_channels": 16, "n_res": 6}
TRAIN_SIZE = (64, 128)
DEMO_SIZE = (128, 256)
BATCH = 4  # training batch
TRANSLATE_BATCH = 8  # synreal translate's default --batch-size
FID_BATCH = 50  # the default of both tools
TARGETS = {"fid_cold": 1.1, "train_whole": 2.0, "train_steady": 1.05, "translate_whole": 1.5}
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID_WEIGHTS_URL file name


# --- plain loops (run as `--plain ...` subprocesses of this script) ---------------------------

def plain_train(config: str, steps: int, threads: int) -> dict:
    """jobs/bench_train.py's plain loop on the train config `synreal train` gets."""
    import torch

    from bench_train import plain_loop
    from synreal_ray.config import apply_overrides, load_config
    from synreal_ray.train import TrainConfig

    torch.set_num_threads(threads)
    cfg = apply_overrides(load_config(config, TrainConfig, section="train"), {"steps": steps})
    return {"images_per_s": plain_loop(cfg, torch.device("cpu")), "threads": torch.get_num_threads()}


def plain_ray_train_floor(threads: int) -> dict:
    """The least a `synreal train` can cost here: start Ray as synreal does (cluster.init_ray) and
    fit Ray Train's TorchTrainer once, one worker with the CPUs synreal's gets, whose loop imports
    torch and sets its threads, then returns."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from synreal_ray.cluster import cpus_per_worker, init_ray

    def loop(config: dict) -> None:
        import torch

        torch.set_num_threads(config["threads"])

    init_ray()
    TorchTrainer(loop, train_loop_config={"threads": threads},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus_per_worker(1)})).fit()
    return {"threads": threads}


def plain_translate(checkpoint: str, dataset: str, out: str, batch_size: int, threads: int) -> dict:
    """What `synreal translate --scale train` does to each image, in one process, no Ray, no journal."""
    import torch

    from synreal_ray import storage
    from synreal_ray.datasets.layouts import list_dataset
    from synreal_ray.translate import decode_rgb, encode_image, generator_from_payload, read_generator, translate_images

    torch.set_num_threads(threads)
    samples, _ = list_dataset(dataset, "synscapes")
    payload = read_generator(checkpoint)
    gen, multiple = generator_from_payload(payload, "cpu")
    train_size = tuple(payload["image_size"])
    for s in range(0, len(samples), batch_size):
        batch = samples[s:s + batch_size]
        images = [decode_rgb(storage.read_bytes(x.image_uri), x.image_uri) for x in batch]
        for x, y in zip(batch, translate_images(gen, images, multiple, amp=False, train_size=train_size)):
            storage.write_bytes(storage.join(out, storage.relpath(x.image_uri, dataset)), encode_image(y, x.image_uri))
            storage.write_bytes(storage.join(out, storage.relpath(x.label_uri, dataset)), storage.read_bytes(x.label_uri))
    return {"images": len(samples), "threads": torch.get_num_threads()}


def run_plain(args: argparse.Namespace) -> None:
    if args.plain == "train":
        result = plain_train(args.config, args.steps, args.threads)
    elif args.plain == "ray-floor":
        result = plain_ray_train_floor(args.threads)
    else:
        result = plain_translate(args.checkpoint, args.dataset, args.out, TRANSLATE_BATCH, args.threads)
    print(json.dumps(result))  # the last line: the parent reads it


# --- the set-up ------------------------------------------------------------------------------

def ray_worker_threads() -> int:
    """The torch threads of `synreal train`'s one worker on a fresh local Ray: init_ray gives the
    cluster max(4, cores) CPUs, cpus_per_worker(1) all but one of them, use_assigned_cpus
    min(that, cores)."""
    from synreal_ray.cluster import machine_cores

    cores = machine_cores()
    cpus = max(4, cores)
    return max(1, min(cpus - 1, cores))


def user_weights(flag: str | None) -> str | None:
    """A local pytorch-fid weights file the user already has (flag, env, torch hub cache), or None."""
    from synreal_ray import fid

    if flag and not os.path.isfile(flag):
        raise SystemExit(f"--inception-weights {flag}: not a local file")
    for path in (flag, os.environ.get(fid.WEIGHTS_ENV), fid.hub_weights_path()):
        if path and os.path.isfile(path):
            return path
    return None


def place_weights(torch_home: Path, flag: str | None) -> str:
    """Put the weights where pytorch-fid's loader (and synreal's find_weights) look under
    `torch_home`; returns a note for the output."""
    from synreal_ray import fid

    target = torch_home / "hub" / "checkpoints" / FID_WEIGHTS_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    found = user_weights(flag)
    if found:
        target.symlink_to(os.path.abspath(found))
        return f"pytorch-fid's weights from {found}"
    fid.make_random_inception_weights(str(target), seed=0)
    return "RANDOM Inception weights (seeded; no weights file on this machine): speed is the same, the values are not real FIDs"


def child_env(root: Path) -> dict:
    """The environment of every command: a local Ray of its own under `root` (as tests/conftest.py
    sets it up), torch's hub cache under `root`, no download."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SYNREAL_INCEPTION_WEIGHTS", "SYNREAL_FID_CACHE")}
    env.update({
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(root / "ray"),
        "TMPDIR": str(root / "tmp"),
        "RAY_raylet_start_wait_time_s": "120",
        "TORCH_HOME": str(root / "torch"),
        "SYNREAL_INCEPTION_URL": f"file:///nonexistent/{FID_WEIGHTS_NAME}",
        "MPLBACKEND": "Agg",
    })
    return env


def make_data(root: Path, num_syn: int, num_real: int) -> dict:
    """Demo data, a flat folder of symlinks to the real images for pytorch-fid, an untrained
    checkpoint and the train config; returns their paths."""
    from bench_translate import save_checkpoint
    from synreal_ray.datasets.demo import make_demo_data

    data = root / "data"
    make_demo_data(str(data), num_syn=num_syn, num_real=num_real, num_val=0, height=DEMO_SIZE[0], width=DEMO_SIZE[1],
                   progress=False)
    real = data / "real" / "leftImg8bit" / "train"
    flat = root / "fid-real-flat"
    flat.mkdir()
    for f in sorted(real.rglob("*.png")):
        (flat / f.name).symlink_to(f)
    ckpt = root / "untrained-ckpt"
    save_checkpoint(str(ckpt), "cyclegan", dict(MODEL_CONFIG), TRAIN_SIZE)
    config = root / "train.yaml"
    train = {"syn": str(data / "syn"), "syn_layout": "synscapes", "real": str(data / "real"), "real_layout": "cityscapes",
             "real_split": "train", "pairing": "random", "weighting": "none", "model": "cyclegan",
             "model_config": MODEL_CONFIG, "image_size": f"{TRAIN_SIZE[0]}x{TRAIN_SIZE[1]}", "batch_size": BATCH,
             "workers": 1, "use_gpu": False}
    config.write_text(json.dumps({"train": train}, indent=2))  # JSON is YAML
    return {"syn": data / "syn", "syn_images": data / "syn" / "img" / "rgb", "real_images": real, "real_flat": flat,
            "checkpoint": ckpt, "config": config}


# --- timing ---------------------------------------------------------------------------------

class Runner:
    """Runs whole commands in the benchmark's environment, timing each."""

    def __init__(self, env: dict, cwd: Path):
        self.env, self.cwd, self.commands = env, cwd, {}
        exe = Path(sys.executable).with_name("synreal")
        self.synreal = [str(exe)] if exe.exists() else [sys.executable, "-m", "synreal_ray.cli"]

    def time(self, name: str, cmd: list[str]) -> tuple[float, str]:
        """Seconds of the whole command and its stdout; a failure ends the benchmark with its stderr."""
        self.commands.setdefault(name, shlex.join(cmd))
        t = time.perf_counter()
        done = subprocess.run(cmd, env=self.env, cwd=self.cwd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode:
            raise RuntimeError(f"{name} failed (exit {done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
        print(f"  {name}: {seconds:.1f} s", flush=True)
        return seconds, done.stdout

    def plain(self, *args: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--plain", *args]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def fid_value(stdout: str) -> float:
    """The FID both tools print last ('FID: x' / 'FID:  x')."""
    line = [x for x in stdout.splitlines() if x.startswith("FID:")][-1]
    return float(line.split(":", 1)[1])


def bench_fid(run: Runner, d: dict, root: Path, repeats: int) -> list[tuple]:
    cold, warm, peer, values = [], [], [], {}
    for i in range(repeats):
        cache = root / f"fid-cache-{i}"
        cmd = run.synreal + ["fid", "--a", str(d["syn_images"]), "--b", str(d["real_images"]), "--dims", "2048",
                             "--batch-size", str(FID_BATCH), "--device", "cpu", "--cache", str(cache)]
        secs, out = run.time("synreal fid (cold)", cmd)
        cold.append(secs)
        values["synreal-ray"] = fid_value(out)
        secs, out = run.time("pytorch_fid", [sys.executable, "-m", "pytorch_fid", str(d["syn_images"]), str(d["real_flat"]),
                                             "--device", "cpu", "--dims", "2048", "--batch-size", str(FID_BATCH)])
        peer.append(secs)
        values["pytorch-fid"] = fid_value(out)
        secs, out = run.time("synreal fid (warm)", cmd)
        warm.append(secs)
        if "all cached" not in out:
            print("  warning: the warm synreal fid did not find its activations cached")
    a, b = values["synreal-ray"], values["pytorch-fid"]
    print(f"  FID: synreal-ray {a:.6f}, pytorch-fid {b:.6f} (relative difference {abs(a - b) / max(abs(b), 1e-12):.2e})")
    n_a, n_b = len(list(d["syn_images"].glob("*.png"))), len(list(d["real_flat"].glob("*.png")))
    what = f"FID of {n_a} vs {n_b} images"
    return [(f"{what}, cold (empty activation cache)", seconds(cold), seconds(peer), ratio(cold, peer), TARGETS["fid_cold"]),
            (f"{what}, warm (cache filled; pytorch-fid has none)", seconds(warm), seconds(peer), ratio(warm, peer), None)]


def bench_train(run: Runner, d: dict, root: Path, repeats: int, steps: int, threads: int) -> list[tuple]:
    whole, plain_whole, ips, plain_ips, floor = [], [], [], [], []
    for i in range(repeats):
        out = root / f"train-{i}"
        secs, _ = run.time("synreal train", run.synreal + ["train", "--config", str(d["config"]), "--steps", str(steps),
                                                           "--out", str(out)])
        whole.append(secs)
        ips.append(json.loads((out / "stage.json").read_text())["images_per_s"])
        secs, stdout = run.time("plain train loop", run.plain("train", "--config", str(d["config"]), "--steps", str(steps),
                                                              "--threads", str(threads)))
        plain_whole.append(secs)
        plain_ips.append(last_json(stdout)["images_per_s"])
        secs, _ = run.time("Ray Train floor", run.plain("ray-floor", "--threads", str(threads)))
        floor.append(secs)
    per_it = [BATCH / r for r in ips]
    plain_per_it = [BATCH / r for r in plain_ips]
    return [(f"train {steps} iterations, whole command (plain loop at {threads} torch threads)", seconds(whole),
             seconds(plain_whole), ratio(whole, plain_whole), TARGETS["train_whole"]),
            ("Ray Train's floor: Ray started as synreal does, one TorchTrainer.fit whose one worker imports torch "
             "and returns, whole command (against the same plain loop)", seconds(floor), seconds(plain_whole),
             ratio(floor, plain_whole), None),
            (f"train steady, per iteration (batch {BATCH}, after the first step)", f"{statistics.median(per_it):.3f} s",
             f"{statistics.median(plain_per_it):.3f} s", ratio(per_it, plain_per_it), TARGETS["train_steady"])]


def bench_translate(run: Runner, d: dict, root: Path, repeats: int) -> list[tuple]:
    whole, plain_whole = [], []
    n = len(list(d["syn_images"].glob("*.png")))
    for i in range(repeats):
        secs, _ = run.time("synreal translate", run.synreal + [
            "translate", "--checkpoint", str(d["checkpoint"]), "--dataset", str(d["syn"]), "--layout", "synscapes",
            "--out", str(root / f"translate-{i}"), "--device", "cpu"])
        whole.append(secs)
        secs, _ = run.time("plain translate loop", run.plain(
            "translate", "--checkpoint", str(d["checkpoint"]), "--dataset", str(d["syn"]),
            "--out", str(root / f"plain-translate-{i}"), "--threads", "1"))
        plain_whole.append(secs)
    return [(f"translate {n} images, whole command (scale train, 1 torch thread)", seconds(whole), seconds(plain_whole),
             ratio(whole, plain_whole), TARGETS["translate_whole"])]


def seconds(samples: list[float]) -> str:
    return f"{statistics.median(samples):.1f} s"


def ratio(ours: list[float], peer: list[float]) -> float:
    return statistics.median(ours) / statistics.median(peer)


def table(rows: list[tuple], quick: bool) -> str:
    lines = ["| work | synreal-ray | peer | ratio | target |", "|---|---|---|---|---|"]
    for work, ours, peer, r, target in rows:
        if target is None:
            goal = "-"
        else:
            goal = f"<= {target:.2f}x" + ("" if quick else (" (met)" if r <= target else " (MISSED)"))
        lines.append(f"| {work} | {ours} | {peer} | {r:.2f}x | {goal} |")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and steps, one repeat: a smoke test")
    p.add_argument("--only", default="fid,train,translate", help="comma-separated: fid, train, translate")
    p.add_argument("--repeats", type=int, default=None, help="runs of each command, interleaved (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="training iterations (default 20; --quick 6)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the plain train loop (default: what synreal's Ray Train worker gets here)")
    p.add_argument("--inception-weights", default=None, help="a local pytorch-fid weights file (default: the user's cache, else random)")
    internal = p.add_argument_group("plain-loop mode (this script runs itself so; not for direct use)")
    internal.add_argument("--plain", choices=["train", "ray-floor", "translate"], default=None)
    internal.add_argument("--config", help="train: the YAML `synreal train` gets")
    internal.add_argument("--checkpoint", help="translate: a checkpoint folder")
    internal.add_argument("--dataset", help="translate: a synscapes-layout dataset")
    internal.add_argument("--out", help="translate: the output folder")
    args = p.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(args.only) - {"fid", "train", "translate"}
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))} (choose from fid, train, translate)")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.steps = args.steps or (6 if args.quick else 20)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plain:
        run_plain(args)
        return
    from machine import describe

    num_syn, num_real = (24, 16) if args.quick else (96, 64)
    threads = args.threads or ray_worker_threads()
    root = Path(tempfile.mkdtemp(prefix="bench-peers-", dir="/tmp" if os.path.isdir("/tmp") else None))  # short: Ray's socket paths
    try:
        for sub in ("ray", "tmp"):
            (root / sub).mkdir()
        note = place_weights(root / "torch", args.inception_weights) if "fid" in args.only else None
        d = make_data(root, num_syn, num_real)
        run = Runner(child_env(root), cwd=root)
        print(f"machine: {describe()}")
        print(f"command: {shlex.join([Path(sys.executable).name] + sys.argv)}")
        print(f"cyclegan {MODEL_CONFIG}, trained at {TRAIN_SIZE[0]}x{TRAIN_SIZE[1]}, batch {BATCH}; demo images "
              f"{DEMO_SIZE[0]}x{DEMO_SIZE[1]}: {num_syn} synthetic, {num_real} real; medians of {args.repeats} interleaved run(s)"
              + ("; QUICK smoke run: not the demo scale, the targets do not apply" if args.quick else ""))
        if note:
            print(f"inception weights: {note}")
        rows = []
        if "fid" in args.only:
            rows += bench_fid(run, d, root, args.repeats)
        if "train" in args.only:
            rows += bench_train(run, d, root, args.repeats, args.steps, threads)
        if "translate" in args.only:
            rows += bench_translate(run, d, root, args.repeats)
        print("\ncommands (paths under a temporary folder, removed):")
        for name, cmd in run.commands.items():
            print(f"  {name}: {cmd}")
        print()
        print(table(rows, args.quick))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
