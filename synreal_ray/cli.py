"""`synreal` command line: a thin shell over the stage functions (jobs/ call the same ones)."""

from __future__ import annotations

import argparse
import sys


def _features(a: argparse.Namespace) -> None:
    from synreal_ray.features import FeaturesConfig, run_features

    cfg = FeaturesConfig(dataset=a.dataset, layout=a.layout, out=a.out, split=a.split, levels=a.levels,
                         domain=a.domain, on_error=a.on_error, verify_images=a.verify_images)
    rec = run_features(cfg, force=a.force)
    state = "already up to date, skipped" if rec.get("skipped") else f"{rec['seconds']:.1f} s"
    print(f"features: {rec['rows']} samples ({rec['errors']} skipped for errors), dim {rec['dim']}, "
          f"levels {rec['levels']} -> {a.out} ({state})")


def _kliep(a: argparse.Namespace) -> None:
    from synreal_ray.weighting import KliepConfig, run_kliep

    sigma = None if a.sigma == "auto" else _positive_float(a.sigma, "--sigma")
    cfg = KliepConfig(syn=a.syn, real=a.real, out=a.out, sigma=sigma, centers=a.centers, folds=a.folds,
                      clip=a.clip, cv_samples=a.cv_samples, seed=a.seed, device=a.device)
    rec = run_kliep(cfg, force=a.force)
    print(f"kliep: sigma w={rec['sigma']['w']:.4g} psi={rec['sigma']['psi']:.4g}; effective sample size "
          f"{rec['ess_fraction']['w']:.0%} of synthetic, {rec['ess_fraction']['psi']:.0%} of real "
          f"-> {a.out} (report.json, histogram.png){' (up to date, skipped)' if rec.get('skipped') else ''}")


def _pairs(a: argparse.Namespace) -> None:
    from synreal_ray import storage
    from synreal_ray.pairing import PairsConfig, preview_grid, quality_markdown, run_pairs

    if a.preview and not a.out_png:
        raise ValueError("--preview N needs --out-png FILE")
    cfg = PairsConfig(syn=a.syn, real=a.real, out=a.out, weights=a.weights, k=a.k, max_distance=a.max_distance,
                      index=a.index, nprobe=a.nprobe, actors=a.actors, seed=a.seed)
    rec = run_pairs(cfg, force=a.force)
    report = storage.read_json(storage.join(a.out, "report.json"))
    print(quality_markdown(report))
    if cfg.max_distance is not None:
        print(f"--max-distance {cfg.max_distance}: dropped {report['dropped_by_max_distance']} pairs; "
              f"{report['syn_without_pairs']} synthetic images have no pair left")
    if "ivf_recall_at_k" in report:
        print(f"IVF recall@{cfg.k} against exact search: {report['ivf_recall_at_k']:.3f}")
    if a.preview:
        storage.write_bytes(a.out_png, preview_grid(a.out, a.preview))
        print(f"preview grid: {a.out_png}")
    print(f"pairs: {rec['pairs']} pairs (K={cfg.k}) -> {a.out}{' (up to date, skipped)' if rec.get('skipped') else ''}")


def _train(a: argparse.Namespace) -> None:
    from synreal_ray.config import apply_overrides, load_config
    from synreal_ray.train import TrainConfig, run_train

    cfg = load_config(a.config, TrainConfig, section="train") if a.config else TrainConfig()
    cfg = apply_overrides(cfg, {
        "model": a.model, "syn": a.syn, "syn_layout": a.syn_layout, "real": a.real, "real_layout": a.real_layout,
        "pairs": a.pairs, "weights": a.weights, "steps": a.steps, "image_size": a.image_size,
        "batch_size": a.batch_size, "workers": a.workers, "checkpoint_every": a.checkpoint_every, "out": a.out,
        "resume": True if a.resume else None})
    rec = run_train(cfg, force=a.force)
    if rec.get("skipped"):
        print(f"train: {cfg.out} is up to date (skipped)")
    outs = rec["outputs"]
    print(f"train: {rec['steps']} steps of {cfg.model} ({'resumed from step ' + str(rec['resumed_from']) if rec.get('resumed_from') else 'from scratch'})"
          f"\n  checkpoint:  {outs['checkpoint']}\n  metrics:     {outs['metrics']}"
          f"\n  loss curves: {outs['loss_curves']}\n  grids:       {outs['grids']}")


def _pipeline_overrides(a: argparse.Namespace) -> dict:
    return {"out": a.out, "fid.inception_weights": a.inception_weights}


def _run(a: argparse.Namespace) -> None:
    from synreal_ray.pipeline import load_pipeline_config, run_pipeline

    run_pipeline(load_pipeline_config(a.config, _pipeline_overrides(a)), force=a.force)


def _demo(a: argparse.Namespace) -> None:
    from synreal_ray import storage
    from synreal_ray.datasets.demo import make_demo_data
    from synreal_ray.pipeline import find_config, load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(a.config or find_config("demo.yaml"),
                               {**_pipeline_overrides(a), "data.syn": storage.join(a.data, "syn"),
                                "data.real": storage.join(a.data, "real")})
    if not storage.exists(storage.join(a.data, "syn")):
        make_demo_data(a.data, num_syn=a.num_syn, num_real=a.num_real, num_val=a.num_val)
    run_pipeline(cfg, force=a.force)


def _tune(a: argparse.Namespace) -> None:
    from synreal_ray.tune import load_sweep_config, run_sweep

    run_sweep(*load_sweep_config(a.config, _pipeline_overrides(a)))


def _report(a: argparse.Namespace) -> None:
    from synreal_ray import storage
    from synreal_ray.pipeline import load_pipeline_config, write_report

    write_report(load_pipeline_config(storage.join(a.run, "config.yaml"), {"out": a.run}))


def _positive_float(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a number (or 'auto')") from None
    if not value > 0:
        raise ValueError(f"{flag}: must be > 0, got {text}")
    return value


def _make_demo_data(a: argparse.Namespace) -> None:
    from synreal_ray.datasets.demo import make_demo_data

    info = make_demo_data(a.out, num_syn=a.num_syn, num_real=a.num_real, num_val=a.num_val,
                          height=a.height, width=a.width, seed=a.seed)
    print(f"demo data: {info['num_syn']} synthetic images in {info['syn']} (synscapes layout), "
          f"{info['num_real']} train + {info['num_val']} val real images in {info['real']} (cityscapes layout)")


def _translate(a: argparse.Namespace) -> None:
    from synreal_ray.translate import TranslateConfig, run_translate

    cfg = TranslateConfig(checkpoint=a.checkpoint, dataset=a.dataset, layout=a.layout, out=a.out, split=a.split,
                          batch_size=a.batch_size, actors=a.actors, amp=not a.no_amp, device=a.device)
    rec = run_translate(cfg, force=a.force)
    if rec.get("skipped"):
        print(f"translate: {rec['images']} images already translated in {a.out} (up to date, skipped)")
        return
    resumed = f", {rec['resumed_from']} kept from an interrupted run" if rec["resumed_from"] else ""
    rate = f", {rec['images_per_s']} images/s on {rec['actors']} actor(s)" if rec["images_per_s"] else ""
    if rec.get("steady_images_per_s"):
        rate += f" ({rec['steady_images_per_s']} once started)"
    print(f"translate: {rec['translated']} of {rec['images']} images with {rec['checkpoint']} (step {rec['step']})"
          f"{resumed}{rate} -> {a.out}")


def _fid(a: argparse.Namespace) -> None:
    import warnings

    from synreal_ray.fid import FidConfig, run_fid

    cfg = FidConfig(a=a.a, b=a.b, weights=a.inception_weights, dims=a.dims, size=a.size, max_images=a.max_images,
                    cache=a.cache, batch_size=a.batch_size, actors=a.actors, device=a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed below as one line each
        rec = run_fid(cfg)
    for w in rec["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for name in ("a", "b"):
        s = rec[name]
        how = f"computed {s['computed']}" if s["computed"] else "all cached"
        print(f"{name}: {s['images']} images in {s['root']} ({how}; cache {s['entry']})")
    print(f"inception weights: {rec['weights']}, dims {rec['dims']}" + (f", resized to {rec['size']}" if rec["size"] else ""))
    print(f"FID: {rec['fid']:.6f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synreal", description="Synthetic-to-real translation of driving datasets on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("make-demo-data", help="write the procedural demo datasets (synscapes + cityscapes layouts)")
    d.add_argument("--out", required=True, help="folder or s3:// prefix")
    d.add_argument("--num-syn", type=int, default=96)
    d.add_argument("--num-real", type=int, default=64, help="real training images")
    d.add_argument("--num-val", type=int, default=32, help="real validation images")
    d.add_argument("--height", type=int, default=128)
    d.add_argument("--width", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_make_demo_data)

    f = sub.add_parser("features", help="SP-Feat vectors of a dataset's label maps -> Parquet")
    f.add_argument("--dataset", required=True, help="dataset root, local or s3://")
    f.add_argument("--layout", required=True, choices=["cityscapes", "synscapes", "gta5", "folder"])
    f.add_argument("--split", default=None, help="cityscapes split (default train)")
    f.add_argument("--levels", default="1,2,4", help="pyramid levels: N = N x N grid, RxC = R rows x C cols")
    f.add_argument("--domain", choices=["syn", "real"], default=None, help="default: real for cityscapes, else syn")
    f.add_argument("--out", required=True, help="output folder or s3:// prefix")
    f.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="skip: record bad files in errors/ beside the output instead of failing")
    f.add_argument("--verify-images", action="store_true", help="decode every image whole, not just its header")
    f.add_argument("--force", action="store_true", help="recompute even if the output is up to date")
    f.set_defaults(fn=_features)

    k = sub.add_parser("kliep", help="KLIEP importance weights of both domains from their SP-Feat features")
    k.add_argument("--syn", required=True, help="synthetic features (output of `synreal features`)")
    k.add_argument("--real", required=True, help="real features (output of `synreal features`)")
    k.add_argument("--out", required=True)
    k.add_argument("--sigma", default="auto", help="kernel width, or auto (likelihood cross-validation)")
    k.add_argument("--centers", type=int, default=100, help="number of Gaussian basis centres")
    k.add_argument("--folds", type=int, default=5, help="cross-validation folds for --sigma auto")
    k.add_argument("--clip", type=float, default=None, help="largest weight after renormalising to mean 1")
    k.add_argument("--cv-samples", type=int, default=2000, help="samples per domain for choosing sigma")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    k.add_argument("--force", action="store_true")
    k.set_defaults(fn=_kliep)

    q = sub.add_parser("pairs", help="pair each synthetic image with its K nearest real images in SP-Feat space")
    q.add_argument("--syn", required=True, help="synthetic features (output of `synreal features`)")
    q.add_argument("--real", required=True, help="real features (output of `synreal features`)")
    q.add_argument("--weights", default=None, help="output of `synreal kliep` (default: all weights 1)")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--max-distance", type=float, default=None, help="drop pairs farther apart than this")
    q.add_argument("--index", choices=["flat", "ivf"], default="flat", help="flat = exact; ivf = approximate")
    q.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query")
    q.add_argument("--actors", type=int, default=1, help="KNN actors on CPU (with GPUs: one per GPU)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    q.add_argument("--preview", type=int, default=0, metavar="N", help="write a grid of N synthetic images and their pairs")
    q.add_argument("--out-png", default=None, help="where --preview writes its PNG")
    q.add_argument("--force", action="store_true")
    q.set_defaults(fn=_pairs)

    t = sub.add_parser("translate", help="translate a synthetic dataset with a trained generator (same layout, labels copied)")
    t.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a training run's --out (its latest checkpoint)")
    t.add_argument("--dataset", required=True, help="synthetic dataset root, local or s3://")
    t.add_argument("--layout", required=True, choices=["cityscapes", "synscapes", "gta5", "folder"])
    t.add_argument("--split", default=None, help="cityscapes split (default train)")
    t.add_argument("--out", required=True, help="output folder or s3:// prefix (gets the input's layout)")
    t.add_argument("--batch-size", type=int, default=8, help="images per generator batch")
    t.add_argument("--actors", type=int, default=None, help="generator actors (default: one per GPU, else CPUs / 2)")
    t.add_argument("--no-amp", action="store_true", help="full fp32 on GPU (default: fp16 autocast)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="actors on GPUs (auto: when present) or CPUs")
    t.add_argument("--force", action="store_true", help="translate everything again even if up to date")
    t.set_defaults(fn=_translate)

    z = sub.add_parser("fid", help="Frechet Inception Distance between two folders of images (pytorch-fid's numbers)")
    z.add_argument("--a", required=True, help="folder of images (searched recursively), local or s3://")
    z.add_argument("--b", required=True, help="folder of images (searched recursively), local or s3://")
    z.add_argument("--inception-weights", default=None, metavar="PATH|URI",
                   help="pytorch-fid's pt_inception-2015-12-05 weights file (default: $SYNREAL_INCEPTION_WEIGHTS)")
    z.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048], help="Inception feature size")
    z.add_argument("--size", default=None, metavar="HxW", help="resize images to HxW first (e.g. 256x512)")
    z.add_argument("--max-images", type=int, default=None, help="a seeded random subset of N images per set")
    z.add_argument("--cache", default=None, help="activation cache folder or s3:// prefix "
                                                 "(default: $SYNREAL_FID_CACHE or ~/.cache/synreal/fid)")
    z.add_argument("--batch-size", type=int, default=50)
    z.add_argument("--actors", type=int, default=None, help="Inception actors (default: one per GPU, else CPUs / 2)")
    z.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="actors on GPUs (auto: when present) or CPUs")
    z.set_defaults(fn=_fid)
    tr = sub.add_parser("train", help="train UNIT or CycleGAN with Ray Train on pairs and KLIEP weights")
    tr.add_argument("--config", default=None, help="YAML with a train: section (defaults apply without it)")
    tr.add_argument("--model", choices=["unit", "cyclegan"], default=None)
    tr.add_argument("--syn", default=None, help="synthetic dataset root")
    tr.add_argument("--syn-layout", default=None)
    tr.add_argument("--real", default=None, help="real dataset root")
    tr.add_argument("--real-layout", default=None)
    tr.add_argument("--pairs", default=None, help="output of `synreal pairs` (without it: random pairing, the baseline)")
    tr.add_argument("--weights", default=None, help="output of `synreal kliep`")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--image-size", default=None, help="HxW")
    tr.add_argument("--batch-size", type=int, default=None, help="global batch, split over the workers")
    tr.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP)")
    tr.add_argument("--checkpoint-every", type=int, default=None)
    tr.add_argument("--out", default=None)
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under --out")
    tr.add_argument("--force", action="store_true")
    tr.set_defaults(fn=_train)

    r = sub.add_parser("run", help="the whole pipeline: features, kliep, pairs, train, translate, FID, report")
    r.add_argument("--config", required=True, help="pipeline YAML (see configs/)")
    r.add_argument("--out", default=None, help="override the config's out")
    r.add_argument("--inception-weights", default=None, help="pytorch-fid Inception weights file (local or s3://)")
    r.add_argument("--force", action="store_true", help="recompute every stage")
    r.set_defaults(fn=_run)

    m = sub.add_parser("demo", help="make the procedural demo data and run the pipeline on it (configs/demo.yaml)")
    m.add_argument("--config", default=None, help="default: configs/demo.yaml")
    m.add_argument("--data", default="data/demo", help="where the demo datasets are written (kept if present)")
    m.add_argument("--out", default=None, help="default: the config's out (out/demo)")
    m.add_argument("--num-syn", type=int, default=96)
    m.add_argument("--num-real", type=int, default=64)
    m.add_argument("--num-val", type=int, default=32)
    m.add_argument("--inception-weights", default=None, help="pytorch-fid Inception weights file (local or s3://)")
    m.add_argument("--force", action="store_true")
    m.set_defaults(fn=_demo)

    t = sub.add_parser("tune", help="Ray Tune sweep over K, SP-Feat levels, KLIEP width, model and weighting against FID")
    t.add_argument("--config", required=True, help="pipeline YAML with a tune: section (see configs/sweep.yaml)")
    t.add_argument("--out", default=None, help="override the config's out")
    t.add_argument("--inception-weights", default=None, help="pytorch-fid Inception weights file (local or s3://)")
    t.set_defaults(fn=_tune)

    rp = sub.add_parser("report", help="FID table and before/after grid of a pipeline run")
    rp.add_argument("--run", required=True, help="the pipeline's out folder")
    rp.set_defaults(fn=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise  # a system error with no file named: the stack trace is the only clue
        # Bad input is the user's to fix: one clear line, not a stack trace.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
