"""The GPU checks of shared/GPU-CHECKLIST.md as one prepared script: the project's pure cores
(no Ray), each timed on the accelerator against the same work on the CPU in this process.

  python jobs/bench_gpu.py [--device auto|cuda|cpu] [--quick] [--out DIR] [--only train,kliep,...]

Checks, in the checklist's order of worth:
  train       UNIT and CycleGAN (their default, official-size configs) train steps at 256x512,
              fp32 and AMP: images/s, peak GPU memory, whether every loss stayed finite
  kliep       Gaussian kernel + KLIEP Newton solve: torch on the device vs numpy on the CPU, and
              how far apart their objectives are
  translate   the s2r generator over a batch (translate.translate_batch), fp32 and fp16
  inception   pytorch-fid's InceptionV3 activations (random weights, fid.activations); skipped
              with a line saying so when pytorch-fid is not installed
  segment     DeepLabV3-ResNet50 predictions (segment.predict), fp32 and fp16
  knn         faiss exact search (knn.KnnIndex), GPU vs CPU; skipped without faiss
Every row says what ran and on what; a check that raises prints its error and the script exits 1
at the end (the rest still run). The CPU side runs fewer repeats (it is the slow one). Results go
to stdout as a Markdown table and to OUT/bench_gpu.json.

--quick shrinks every size so the whole script runs in seconds on a CPU (tests/test_bench_gpu.py
runs it so, in CI, where "accelerator" and CPU are the same device): the code paths stay tested.

Nothing here imports Ray (the device machine has none; the test runs it with Ray hidden). That
machine has torch, torchvision, numpy, scipy, pyarrow, pillow and pyyaml, but not pytorch-fid or
faiss. pytorch-fid (15 KB) travels as a wheel; faiss-gpu-cu12 (48 MB) needs CUDA 12's runtime and
cuBLAS wheels, far over the 64 MiB a call carries, so the knn row says it was skipped. Here:
  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .whl pytorch-fid==0.3.0
then one device call, carrying .whl (not yet timed there; the CPU side is the slow part):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit; \
  PYTHONPATH=/tmp/site:. python3 jobs/bench_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

FULL = {"size": (256, 512), "batch": 4, "steps": 10, "cpu_steps": 2, "kliep": (20000, 5000, 1000, 399),
        "batches": (8, 32), "knn": (100_000, 10_000, 399, 15), "models": {}}
QUICK = {"size": (64, 64), "batch": 2, "steps": 2, "cpu_steps": 1, "kliep": (300, 200, 40, 16),
         "batches": (2,), "knn": (200, 100, 16, 3), "models": {"base_channels": 8, "n_res": 1}}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of fn() after one warm-up call, synchronising the GPU around the clock."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def note_row(check: str, note: str) -> dict:
    """A row with no measurement: a check skipped or failed, and why."""
    return {"check": check, "setting": "-", "unit": "-", "device": None, "cpu": None, "peak_mib": None, "note": note}


def check_train(p: dict, dev: torch.device, cpu: torch.device) -> list[dict]:
    from synreal_ray.models import build_model

    rows = []
    h, w = p["size"]
    for name in ("unit", "cyclegan"):
        def run(device, amp, steps, name=name):
            torch.manual_seed(0)
            model = build_model(name, **p["models"]).to(device)
            opts = model.make_optimizers()
            use_amp = amp and device.type == "cuda"
            scaler = torch.amp.GradScaler("cuda") if use_amp else None
            x = [torch.rand(p["batch"], 3, h, w, device=device) * 2 - 1 for _ in range(2)]
            wts = torch.ones(p["batch"], device=device)
            finite = []

            def step():
                losses = model.train_step(x[0], x[1], wts, wts, opts, scaler=scaler, amp=use_amp)
                finite.append(all(np.isfinite(v) for v in losses.values()))
            reset_peak(device)
            sec = timed(step, device, steps)
            return p["batch"] / sec, peak_mib(device), all(finite)

        cpu_ips, _, cpu_ok = run(cpu, False, p["cpu_steps"])
        for amp in (False, True):
            ips, mib, ok = run(dev, amp, p["steps"])
            rows.append({"check": "train", "setting": f"{name} {h}x{w} batch {p['batch']} {'amp' if amp else 'fp32'}",
                         "unit": "images/s", "device": ips, "cpu": cpu_ips, "peak_mib": mib,
                         "finite": ok and cpu_ok, "note": "losses finite" if ok and cpu_ok else "NON-FINITE LOSS"})
    return rows


def check_kliep(p: dict, dev: torch.device, cpu: torch.device) -> list[dict]:
    from synreal_ray.kliep import gaussian_kernel, median_distance, solve_kliep

    n_t, n_s, b, d = p["kliep"]
    rng = np.random.default_rng(0)
    target = rng.normal(size=(n_t, d)).astype(np.float32)
    source = (rng.normal(size=(n_s, d)) * 1.2 + 0.3).astype(np.float32)
    centres = target[:b]
    sigma = median_distance(target)

    def with_numpy():
        a, m = gaussian_kernel(target, centres, sigma), gaussian_kernel(source, centres, sigma).mean(0)
        return solve_kliep(a, m, backend="numpy", device="cpu")

    def with_torch():  # on the device side, also when that is the CPU (--quick in CI)
        t, c = torch.from_numpy(target).to(dev), torch.from_numpy(centres).to(dev)
        a, m = gaussian_kernel(t, c, sigma), gaussian_kernel(torch.from_numpy(source).to(dev), c, sigma).mean(0)
        return solve_kliep(a, m, backend="torch", device=str(dev))

    out = {}
    gpu_s = timed(lambda: out.__setitem__("dev", with_torch()), dev, 3)
    cpu_s = timed(lambda: out.__setitem__("cpu", with_numpy()), cpu, 1)
    gap = abs(out["dev"].objective - out["cpu"].objective)
    return [{"check": "kliep", "setting": f"{n_t} target x {b} centres, {n_s} source, D={d}, newton, torch vs numpy",
             "unit": "solves/s",
             "device": 1 / gpu_s, "cpu": 1 / cpu_s, "peak_mib": None, "objective_gap": gap,
             "note": f"objectives differ by {gap:.1e}; {out['dev'].iterations} vs {out['cpu'].iterations} passes"}]


def inference_rows(check: str, label: str, run, module, p: dict, dev: torch.device, cpu: torch.device,
                   precisions: tuple[bool, ...] = (False, True)) -> list[dict]:
    """images/s of run(module, images, half) over random uint8 images of p's size, per batch size:
    once on the CPU in fp32, then on the device for each precision (half: fp16 autocast)."""
    h, w = p["size"]
    rows = []
    for batch in p["batches"]:
        images = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(batch)]
        cpu_ips = batch / timed(partial(run, module.to(cpu), images, False), cpu, 1)
        for half in precisions:
            reset_peak(dev)
            ips = batch / timed(partial(run, module.to(dev), images, half), dev, 3)
            precision = f" {'fp16' if half else 'fp32'}" if len(precisions) > 1 else ""
            rows.append({"check": check, "setting": f"{label} {h}x{w} batch {batch}{precision}", "unit": "images/s",
                         "device": ips, "cpu": cpu_ips, "peak_mib": peak_mib(dev), "note": ""})
    return rows


def check_translate(p: dict, dev: torch.device, cpu: torch.device) -> list[dict]:
    from synreal_ray.models import build_model
    from synreal_ray.translate import translate_batch

    rows = []
    for name in ("unit", "cyclegan"):
        torch.manual_seed(0)
        gen = build_model(name, **p["models"]).generator_s2r().eval()
        rows += inference_rows("translate", name, lambda g, images, half: translate_batch(g, images, amp=half),
                               gen, p, dev, cpu)
    return rows


def check_inception(p: dict, dev: torch.device, cpu: torch.device) -> list[dict]:
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        return [note_row("inception", "skipped: pytorch-fid is not installed (carry its wheel)")]
    from synreal_ray.fid import activations, load_inception, make_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        model = load_inception(make_random_inception_weights(f"{tmp}/random.pth", seed=0), 2048)
    return inference_rows("inception", "2048 dims", lambda m, images, _: activations(images, m), model, p, dev, cpu,
                          precisions=(False,))


def check_segment(p: dict, dev: torch.device, cpu: torch.device) -> list[dict]:
    from synreal_ray.segment import build_segmenter, predict

    torch.manual_seed(0)
    model = build_segmenter("deeplabv3_resnet50").eval()
    return inference_rows("segment", "deeplabv3_resnet50", lambda m, images, half: predict(m, images, amp=half),
                          model, p, dev, cpu)


def check_knn(p: dict, dev: torch.device, cpu: torch.device) -> list[dict]:
    try:
        from synreal_ray.knn import KnnIndex, gpu_available
    except ImportError:
        return [note_row("knn", "skipped: faiss is not installed (carry a faiss-gpu wheel)")]
    nq, nr, d, k = p["knn"]
    rng = np.random.default_rng(0)
    real, queries = rng.random((nr, d), dtype=np.float32), rng.random((nq, d), dtype=np.float32)
    found = {}
    cpu_qps = nq / timed(lambda: found.__setitem__("cpu", KnnIndex(real, device="cpu").search(queries, k)), cpu, 1)
    if dev.type == "cuda" and not gpu_available():
        return [{"check": "knn", "setting": f"{nq} queries x {nr} real, D={d}, k={k}", "unit": "queries/s",
                 "device": None, "cpu": cpu_qps, "peak_mib": None, "note": "this faiss build has no GPU support"}]
    side = "cuda" if dev.type == "cuda" else "cpu"
    qps = nq / timed(lambda: found.__setitem__("dev", KnnIndex(real, device=side).search(queries, k)), dev, 2)
    same = float(np.mean(found["dev"][1] == found["cpu"][1]))
    return [{"check": "knn", "setting": f"{nq} queries x {nr} real, D={d}, k={k}, flat + refine", "unit": "queries/s",
             "device": qps, "cpu": cpu_qps, "peak_mib": None, "agreement": same, "note": f"{same:.4f} of the neighbours equal the CPU's"}]


CHECKS = {"train": check_train, "kliep": check_kliep, "translate": check_translate, "inception": check_inception,
          "segment": check_segment, "knn": check_knn}


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def table(rows: list[dict], device_name: str) -> str:
    lines = [f"| check | setting | unit | {device_name} | CPU | ratio | peak MiB | note |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = r["device"] / r["cpu"] if r.get("device") and r.get("cpu") else None
        lines.append(f"| {r['check']} | {r['setting']} | {r['unit']} | {fmt(r['device'])} | {fmt(r['cpu'])} | "
                     f"{'-' if ratio is None else f'{ratio:.1f}x'} | {fmt(r['peak_mib'])} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="the accelerator side (default auto)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU (the CI test)")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks (default {','.join(CHECKS)})")
    ap.add_argument("--out", default=None, help="folder for bench_gpu.json (default: none written)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU")
    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    unknown = set(args.only.split(",")) - set(CHECKS)
    if unknown:
        ap.error(f"--only: unknown checks {', '.join(sorted(unknown))}")
    p = QUICK if args.quick else FULL
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (as the device)"
    print(f"machine: {describe()}; torch {torch.__version__}; device side: {device_name}", flush=True)

    rows, failed = [], []
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            rows += CHECKS[name](p, dev, torch.device("cpu"))
            print(f"{name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - a GPU check reports what broke and goes on
            failed.append(name)
            rows.append(note_row(name, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            traceback.print_exc()
    print("\n" + table(rows, device_name))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_gpu.json").write_text(json.dumps(
            {"machine": describe(), "torch": torch.__version__, "device": device_name, "quick": args.quick,
             "rows": rows, "failed": failed}, indent=2))
    if failed:
        print(f"failed checks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
