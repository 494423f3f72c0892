"""`synreal` command line: a thin shell over the stage functions (jobs/ call the same ones).

Every setting, flag or config file, goes through the config layer (synreal_ray.config): types are
checked there and local paths made absolute against this process's working directory, before
anything reaches Ray. `--set KEY=VALUE` (run, demo, tune) sets any config key. A flag's default is
read from its stage's config dataclass (`default_of`), so each default is written once, and
`--help` shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
import typing
from typing import Any

# By name, not __name__: run as `python -m synreal_ray.cli` this module is __main__.
log = logging.getLogger("synreal_ray.cli")


def _config(cls: type, **values: Any) -> Any:
    """A stage's config dataclass from command-line values, through the config layer."""
    from synreal_ray.config import from_dict

    return from_dict(cls, values)


def _features(a: argparse.Namespace) -> None:
    from synreal_ray.features import FeaturesConfig, run_features

    cfg = _config(FeaturesConfig, dataset=a.dataset, layout=a.layout, out=a.out, split=a.split, levels=a.levels,
                  domain=a.domain, on_error=a.on_error, verify_images=a.verify_images, max_pixels=a.max_pixels)
    rec = run_features(cfg, force=a.force)
    state = "already up to date, skipped" if rec.get("skipped") else f"{rec['seconds']:.1f} s"
    print(f"features: {rec['rows']} samples ({rec['errors']} skipped for errors), dim {rec['dim']}, "
          f"levels {rec['levels']} -> {cfg.out} ({state})")


def _kliep(a: argparse.Namespace) -> None:
    from synreal_ray.weighting import KliepConfig, kliep_summary, run_kliep

    sigma = None if a.sigma == "auto" else _positive_float(a.sigma, "--sigma")
    cfg = _config(KliepConfig, syn=a.syn, real=a.real, out=a.out, sigma=sigma, centers=a.centers, folds=a.folds,
                  clip=a.clip, cv_samples=a.cv_samples, seed=a.seed, device=a.device)
    print(kliep_summary(run_kliep(cfg, force=a.force), cfg.out))


def _pairs(a: argparse.Namespace) -> None:
    from synreal_ray import storage
    from synreal_ray.pairing import PairsConfig, preview_grid, quality_markdown, run_pairs

    if a.preview and not a.out_png:
        raise ValueError("--preview N needs --out-png FILE")
    cfg = _config(PairsConfig, syn=a.syn, real=a.real, out=a.out, weights=a.weights, k=a.k,
                  max_distance=a.max_distance, index=a.index, nprobe=a.nprobe, actors=a.actors, seed=a.seed,
                  max_uses=a.max_uses, query=a.query, in_process_max=a.in_process_max)
    rec = run_pairs(cfg, force=a.force)
    report = storage.read_json(storage.join(cfg.out, "report.json"))
    print(quality_markdown(report))
    if cfg.max_distance is not None:
        print(f"--max-distance {cfg.max_distance}: dropped {report['dropped_by_max_distance']} pairs; "
              f"{report['syn_without_pairs']} synthetic images are in no list")
    if "ivf_recall_at_k" in report:
        print(f"IVF recall@{cfg.k} against exact search: {report['ivf_recall_at_k']:.3f}")
    if a.preview:
        from synreal_ray.config import absolute_uri

        png = absolute_uri(a.out_png, "--out-png")
        storage.write_bytes(png, preview_grid(cfg.out, a.preview))
        print(f"preview grid: {png}")
    print(f"pairs: {rec['pairs']} pairs (K={cfg.k}) -> {cfg.out}{' (up to date, skipped)' if rec.get('skipped') else ''}")


def _train(a: argparse.Namespace) -> None:
    from synreal_ray.config import apply_overrides, load_config
    from synreal_ray.train import TrainConfig, run_train

    cfg = load_config(a.config, TrainConfig, section="train") if a.config else TrainConfig()
    cfg = apply_overrides(cfg, {
        "model": a.model, "syn": a.syn, "syn_layout": a.syn_layout, "real": a.real, "real_layout": a.real_layout,
        "pairs": a.pairs, "weights": a.weights, "steps": a.steps, "image_size": a.image_size,
        "batch_size": a.batch_size, "workers": a.workers, "checkpoint_every": a.checkpoint_every, "out": a.out,
        "lr_step_size": a.lr_step_size, "lr_gamma": a.lr_gamma,
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


def _assignments(a: argparse.Namespace) -> dict:
    from synreal_ray.config import parse_assignments

    return parse_assignments(a.set)


def _run(a: argparse.Namespace) -> None:
    from synreal_ray.pipeline import load_pipeline_config, run_pipeline

    _print_report(run_pipeline(load_pipeline_config(a.config, _pipeline_overrides(a), _assignments(a)), force=a.force))


def _print_report(report: dict) -> None:
    """The four result tables a pipeline command exists to show, on stdout; captions, per-class IoU
    and confusions are in report.md and report.html, which the log (stderr) names."""
    print(report["summary"], flush=True)


def _demo(a: argparse.Namespace) -> None:
    from synreal_ray import storage
    from synreal_ray.config import absolute_uri
    from synreal_ray.datasets.demo import make_demo_data
    from synreal_ray.pipeline import find_config, load_pipeline_config, run_pipeline

    data = absolute_uri(a.data, "--data")
    cfg = load_pipeline_config(a.config or find_config("demo.yaml"),
                               {**_pipeline_overrides(a), "data.syn": storage.join(data, "syn"),
                                "data.real": storage.join(data, "real")}, _assignments(a))
    if not storage.exists(storage.join(data, "syn")):
        make_demo_data(data, num_syn=a.num_syn, num_real=a.num_real, num_val=a.num_val)
    _print_report(run_pipeline(cfg, force=a.force))


def _tune(a: argparse.Namespace) -> None:
    from synreal_ray.tune import load_sweep_config, run_sweep

    run_sweep(*load_sweep_config(a.config, _pipeline_overrides(a), _assignments(a)), force=a.force)


def _report(a: argparse.Namespace) -> None:
    from synreal_ray import storage
    from synreal_ray.pipeline import load_pipeline_config, write_report

    _print_report(write_report(load_pipeline_config(storage.join(a.run, "config.yaml"), {"out": a.run})))


def _positive_float(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a number (or 'auto')") from None
    if not value > 0:
        raise ValueError(f"{flag}: must be > 0, got {text}")
    return value


def _make_demo_data(a: argparse.Namespace) -> None:
    from synreal_ray.config import absolute_uri
    from synreal_ray.datasets.demo import make_demo_data

    info = make_demo_data(absolute_uri(a.out, "--out"), num_syn=a.num_syn, num_real=a.num_real, num_val=a.num_val,
                          height=a.height, width=a.width, seed=a.seed)
    print(f"demo data: {info['num_syn']} synthetic images in {info['syn']} (synscapes layout), "
          f"{info['num_real']} train + {info['num_val']} val real images in {info['real']} (cityscapes layout)")


def _translate(a: argparse.Namespace) -> None:
    from synreal_ray.translate import TranslateConfig, run_translate

    cfg = _config(TranslateConfig, checkpoint=a.checkpoint, dataset=a.dataset, layout=a.layout, out=a.out,
                  split=a.split, batch_size=a.batch_size, actors=a.actors, amp=not a.no_amp, device=a.device,
                  scale=a.scale, in_process_max=a.in_process_max)
    rec = run_translate(cfg, force=a.force)
    if rec.get("skipped"):
        print(f"translate: {rec['images']} images already translated in {cfg.out} (up to date, skipped)")
        return
    resumed = f", {rec['resumed_from']} kept from an interrupted run" if rec["resumed_from"] else ""
    where = f"on {rec['actors']} {rec['device']} actor(s)" if rec["actors"] else f"in this process, {rec['device']}"
    rate = f", {rec['images_per_s']} images/s {where}" if rec["images_per_s"] else ""
    if rec.get("steady_images_per_s"):
        rate += f" ({rec['steady_images_per_s']} once started)"
    print(f"translate: {rec['translated']} of {rec['images']} images with {rec['checkpoint']} (step {rec['step']})"
          f"{resumed}{rate} -> {cfg.out}")


def _fid(a: argparse.Namespace) -> None:
    import warnings

    from synreal_ray.fid import FidConfig, run_fid

    cfg = _config(FidConfig, a=a.a, b=a.b, weights=a.inception_weights, dims=a.dims, size=a.size,
                  max_images=a.max_images, cache=a.cache, batch_size=a.batch_size, actors=a.actors, device=a.device,
                  in_process_max=a.in_process_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # logged below as one line each
        rec = run_fid(cfg)
    for w in rec["warnings"]:
        log.warning("warning: %s", w)
    for name in ("a", "b"):
        s = rec[name]
        how = f"computed {s['computed']}" if s["computed"] else "all cached"
        print(f"{name}: {s['images']} images in {s['root']} ({how}; cache {s['entry']})")
    print(f"inception weights: {rec['weights']}, dims {rec['dims']}" + (f", resized to {rec['size']}" if rec["size"] else ""))
    print(f"KID: {rec['kid']:.6f} ± {rec['kid_std']:.6f}")
    print(f"FID: {rec['fid']:.6f}")  # the last line: scripts read it


def _segment(a: argparse.Namespace) -> None:
    from synreal_ray.config import apply_overrides, from_dict, load_config
    from synreal_ray.segment import SegmentConfig, run_segment

    if (a.train_layout or a.train_split) and not a.train:
        raise ValueError("--train-layout and --train-split describe --train: give --train URI too")
    values: dict = {"val": a.val, "val_layout": a.val_layout, "val_split": a.val_split, "out": a.out, "model": a.model,
                    "image_size": a.image_size, "steps": a.steps, "batch_size": a.batch_size, "workers": a.workers,
                    "backbone_weights": a.backbone_weights, "resume": True if a.resume else None}
    if a.train:
        if not a.train_layout:
            raise ValueError("--train needs --train-layout (cityscapes, synscapes, gta5 or folder)")
        values["train"] = [{"uri": a.train, "layout": a.train_layout, "split": a.train_split, "share": 1.0}]
    if a.config:
        cfg = apply_overrides(load_config(a.config, SegmentConfig, section="segment"), values)
    else:
        if not a.train:
            raise ValueError("give --train URI --train-layout L (or --config FILE with a segment: section)")
        cfg = from_dict(SegmentConfig, {k: v for k, v in values.items() if v is not None})
    rec = run_segment(cfg, force=a.force)
    if rec.get("skipped"):
        print(f"segment: {cfg.out} is up to date (skipped)")
    outs = rec["outputs"]
    start = f"resumed from step {rec['resumed_from']}" if rec.get("resumed_from") else "from scratch"
    print(f"segment: {rec['steps']} steps of {cfg.model} ({start})\n  checkpoint: {outs['checkpoint']}"
          f"\n  metrics:    {outs['metrics']}\n  loss curve: {outs['loss_curve']}")
    if rec.get("val"):
        v = rec["val"]
        miou = "n/a" if v["miou"] is None else f"{v['miou']:.4f}"
        print(f"  val:        mIoU {miou} on {v['num_images']} images ({outs['val']}/eval.md)")


def _seg_eval(a: argparse.Namespace) -> None:
    from synreal_ray.segment import SegEvalConfig, run_seg_eval

    cfg = _config(SegEvalConfig, model=a.model, dataset=a.dataset, layout=a.layout, split=a.split, out=a.out,
                  save_predictions=a.save_predictions, batch_size=a.batch_size, actors=a.actors, device=a.device,
                  in_process_max=a.in_process_max)
    rec = run_seg_eval(cfg, force=a.force)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for line in rec["top_confusions"][:3]:
        print(f"  {line}")
    print(f"seg-eval: mIoU {fmt(rec['miou'])}, pixel accuracy {fmt(rec['pixel_accuracy'])} on {rec['num_images']} "
          f"images (step {rec['step']}) -> {cfg.out} (eval.json, eval.md, confusion.png)"
          f"{' (up to date, skipped)' if rec.get('skipped') else ''}")


SET_HELP = "set any config key (repeatable): a dotted key and a YAML value, e.g. --set train.steps=20"


def default_of(owner: Any, name: str) -> Any:
    """The default of field `name` of a stage's config dataclass (or of parameter `name` of a
    function): every default is written once, where the stage defines it, and the flags read it."""
    if dataclasses.is_dataclass(owner):
        for f in dataclasses.fields(owner):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
        raise KeyError(f"{owner.__name__} has no field {name!r} with a plain default")
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise KeyError(f"{owner.__name__}() has no default for {name!r}")
    return default


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where its help already says it (it mentions
    "default": typically what None means there), for required options and for on/off switches."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.required or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _override(p: argparse.ArgumentParser, cls: type, flag: str, help: str = "", **kw: Any) -> argparse.Action:
    """A flag that overrides a --config file's value, so None (not given) by default; its help
    shows the stage's own default, used when neither the flag nor the file sets it."""
    if "default" not in help:
        help = f"{help} (default: {default_of(cls, flag[2:].replace('-', '_'))}, or the --config file's)".lstrip()
    return p.add_argument(flag, default=None, help=help, **kw)


def _args_make_demo_data(d: argparse.ArgumentParser) -> None:
    from synreal_ray.datasets.demo import make_demo_data

    d.add_argument("--out", required=True, help="folder or s3:// prefix")
    d.add_argument("--num-syn", type=int, default=default_of(make_demo_data, "num_syn"), help="synthetic images")
    d.add_argument("--num-real", type=int, default=default_of(make_demo_data, "num_real"), help="real training images")
    d.add_argument("--num-val", type=int, default=default_of(make_demo_data, "num_val"), help="real validation images")
    d.add_argument("--height", type=int, default=default_of(make_demo_data, "height"), help="image height in pixels")
    d.add_argument("--width", type=int, default=default_of(make_demo_data, "width"), help="image width in pixels")
    d.add_argument("--seed", type=int, default=default_of(make_demo_data, "seed"), help="random seed")


def _args_features(f: argparse.ArgumentParser) -> None:
    from synreal_ray.datasets.images import MAX_PIXELS
    from synreal_ray.features import FeaturesConfig

    f.add_argument("--dataset", required=True, help="dataset root, local or s3://")
    f.add_argument("--layout", required=True, choices=["cityscapes", "synscapes", "gta5", "folder"])
    f.add_argument("--split", default=default_of(FeaturesConfig, "split"), help="cityscapes split (default train)")
    f.add_argument("--levels", default=default_of(FeaturesConfig, "levels"),
                   help="pyramid levels: N = N x N grid, RxC = R rows x C cols")
    f.add_argument("--domain", choices=["syn", "real"], default=default_of(FeaturesConfig, "domain"),
                   help="default: real for cityscapes, else syn")
    f.add_argument("--out", required=True, help="output folder or s3:// prefix")
    f.add_argument("--on-error", choices=["raise", "skip"], default=default_of(FeaturesConfig, "on_error"),
                   help="skip: record bad files in errors/ beside the output instead of failing")
    f.add_argument("--verify-images", action="store_true", default=default_of(FeaturesConfig, "verify_images"),
                   help="decode every image whole, not just its header")
    f.add_argument("--max-pixels", type=int, default=default_of(FeaturesConfig, "max_pixels"),
                   help=f"refuse, as a bad sample, any image or label map of more pixels "
                        f"(default: None, {MAX_PIXELS:,})")
    f.add_argument("--force", action="store_true", help="recompute even if the output is up to date")


def _args_kliep(k: argparse.ArgumentParser) -> None:
    from synreal_ray.weighting import KliepConfig

    k.add_argument("--syn", required=True, help="synthetic features (output of `synreal features`)")
    k.add_argument("--real", required=True, help="real features (output of `synreal features`)")
    k.add_argument("--out", required=True)
    k.add_argument("--sigma", default=default_of(KliepConfig, "sigma") or "auto",  # None, cross-validated, is "auto"
                   help="kernel width, or auto (likelihood cross-validation)")
    k.add_argument("--centers", type=int, default=default_of(KliepConfig, "centers"),
                   help="number of Gaussian basis centres")
    k.add_argument("--folds", type=int, default=default_of(KliepConfig, "folds"),
                   help="cross-validation folds for --sigma auto")
    k.add_argument("--clip", type=float, default=default_of(KliepConfig, "clip"),
                   help="largest weight after renormalising to mean 1 (default: None, no clipping)")
    k.add_argument("--cv-samples", type=int, default=default_of(KliepConfig, "cv_samples"),
                   help="samples per domain for choosing sigma")
    k.add_argument("--seed", type=int, default=default_of(KliepConfig, "seed"), help="random seed")
    k.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default_of(KliepConfig, "device"),
                   help="where the fit runs (auto: a GPU when present)")
    k.add_argument("--force", action="store_true")


def _args_pairs(q: argparse.ArgumentParser) -> None:
    from synreal_ray.pairing import PairsConfig

    q.add_argument("--syn", required=True, help="synthetic features (output of `synreal features`)")
    q.add_argument("--real", required=True, help="real features (output of `synreal features`)")
    q.add_argument("--weights", default=default_of(PairsConfig, "weights"),
                   help="output of `synreal kliep` (default: all weights 1)")
    q.add_argument("--k", type=int, default=default_of(PairsConfig, "k"), help="neighbours per query image")
    q.add_argument("--query", choices=["real", "syn"], default=default_of(PairsConfig, "query"),
                   help="real: each real image's K nearest synthetic images, as in the paper; syn: the reverse")
    q.add_argument("--max-uses", type=int, default=default_of(PairsConfig, "max_uses"), metavar="N",
                   help="query real: a synthetic image is in at most N real images' lists (default: no cap)")
    q.add_argument("--max-distance", type=float, default=default_of(PairsConfig, "max_distance"),
                   help="drop pairs farther apart than this (default: None, keep all)")
    q.add_argument("--index", choices=["flat", "ivf"], default=default_of(PairsConfig, "index"),
                   help="flat = exact; ivf = approximate")
    q.add_argument("--nprobe", type=int, default=default_of(PairsConfig, "nprobe"),
                   help="IVF lists searched per query (default: None, about 1/8 of the IVF lists)")
    q.add_argument("--actors", type=int, default=default_of(PairsConfig, "actors"),
                   help="KNN actors on CPU (with GPUs: one per GPU)")
    q.add_argument("--in-process-max", type=int, default=default_of(PairsConfig, "in_process_max"),
                   help="at most this many query images (feature rows): searched in this process, more by an "
                        "actor pool (0: always a pool)")
    q.add_argument("--seed", type=int, default=default_of(PairsConfig, "seed"), help="random seed")
    q.add_argument("--out", required=True)
    q.add_argument("--preview", type=int, default=0, metavar="N",
                   help="write a grid of N synthetic images and their pairs (0: none)")
    q.add_argument("--out-png", default=None, help="where --preview writes its PNG")
    q.add_argument("--force", action="store_true")


def _args_translate(t: argparse.ArgumentParser) -> None:
    from synreal_ray.translate import TranslateConfig

    t.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a training run's --out (its latest checkpoint)")
    t.add_argument("--dataset", required=True, help="synthetic dataset root, local or s3://")
    t.add_argument("--layout", required=True, choices=["cityscapes", "synscapes", "gta5", "folder"])
    t.add_argument("--split", default=default_of(TranslateConfig, "split"), help="cityscapes split (default train)")
    t.add_argument("--out", required=True, help="output folder or s3:// prefix (gets the input's layout)")
    t.add_argument("--batch-size", type=int, default=default_of(TranslateConfig, "batch_size"),
                   help="images per generator batch")
    t.add_argument("--actors", type=int, default=default_of(TranslateConfig, "actors"),
                   help="generator actors (default: one per GPU, else CPUs / 2)")
    t.add_argument("--no-amp", action="store_true", help="full fp32 on GPU (default: fp16 autocast)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default_of(TranslateConfig, "device"),
                   help="actors on GPUs (auto: when present) or CPUs")
    t.add_argument("--scale", choices=["train", "full"], default=default_of(TranslateConfig, "scale"),
                   help="train: resize each image by the factor training did, translate, resize back; "
                        "full: translate at full resolution")
    t.add_argument("--in-process-max", type=int, default=default_of(TranslateConfig, "in_process_max"),
                   help="at most this many images to translate: in this process, more by an actor pool "
                        "(0: always a pool)")
    t.add_argument("--force", action="store_true", help="translate everything again even if up to date")


def _args_fid(z: argparse.ArgumentParser) -> None:
    from synreal_ray.fid import FidConfig

    z.add_argument("--a", required=True, help="folder of images (searched recursively), local or s3://")
    z.add_argument("--b", required=True, help="folder of images (searched recursively), local or s3://")
    z.add_argument("--inception-weights", default=default_of(FidConfig, "weights"), metavar="PATH|URI",
                   help="pytorch-fid's pt_inception-2015-12-05 weights file (default: $SYNREAL_INCEPTION_WEIGHTS)")
    z.add_argument("--dims", type=int, default=default_of(FidConfig, "dims"), choices=[64, 192, 768, 2048],
                   help="Inception feature size")
    z.add_argument("--size", default=default_of(FidConfig, "size"), metavar="HxW",
                   help="resize images to HxW first, e.g. 256x512 (default: None, as they are)")
    z.add_argument("--max-images", type=int, default=default_of(FidConfig, "max_images"),
                   help="a seeded random subset of N images per set (default: None, all images)")
    z.add_argument("--cache", default=default_of(FidConfig, "cache"),
                   help="activation cache folder or s3:// prefix (default: $SYNREAL_FID_CACHE or ~/.cache/synreal/fid)")
    z.add_argument("--batch-size", type=int, default=default_of(FidConfig, "batch_size"),
                   help="images per Inception batch")
    z.add_argument("--actors", type=int, default=default_of(FidConfig, "actors"),
                   help="Inception actors (default: one per GPU, else CPUs / 2)")
    z.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default_of(FidConfig, "device"),
                   help="actors on GPUs (auto: when present) or CPUs")
    z.add_argument("--in-process-max", type=int, default=default_of(FidConfig, "in_process_max"),
                   help="at most this many images to compute: in this process, larger sets by an actor pool "
                        "(0: always a pool)")


def _args_train(tr: argparse.ArgumentParser) -> None:
    from synreal_ray.train import TrainConfig

    tr.add_argument("--config", default=None, help="YAML with a train: section (without it: the defaults below)")
    _override(tr, TrainConfig, "--model", "translation model", choices=["unit", "cyclegan"])
    _override(tr, TrainConfig, "--syn", "synthetic dataset root")
    _override(tr, TrainConfig, "--syn-layout", "layout of --syn")
    _override(tr, TrainConfig, "--real", "real dataset root")
    _override(tr, TrainConfig, "--real-layout", "layout of --real")
    _override(tr, TrainConfig, "--pairs", "output of `synreal pairs` (default: none, random pairing: the baseline)")
    _override(tr, TrainConfig, "--weights", "output of `synreal kliep` (default: none, the pairs' weights)")
    _override(tr, TrainConfig, "--steps", "training steps", type=int)
    _override(tr, TrainConfig, "--image-size", "HxW")
    _override(tr, TrainConfig, "--batch-size", "global batch, split over the workers", type=int)
    _override(tr, TrainConfig, "--workers", "Ray Train workers (DDP)", type=int)
    _override(tr, TrainConfig, "--lr-step-size", "UNIT: the lr is multiplied by --lr-gamma every this many steps "
              "(official lr_policy: step; CycleGAN decays linearly to 0 over the second half)", type=int)
    _override(tr, TrainConfig, "--lr-gamma", "UNIT: the lr's factor every --lr-step-size steps", type=float)
    _override(tr, TrainConfig, "--checkpoint-every", "steps between checkpoints", type=int)
    _override(tr, TrainConfig, "--out", "output folder or s3:// prefix")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under --out")
    tr.add_argument("--force", action="store_true")


def _pipeline_flags(p: argparse.ArgumentParser, out_help: str, force_help: str, set_help: str = SET_HELP) -> None:
    """The flags that `run`, `demo` and `tune` share: --out, --inception-weights and --set override
    the pipeline config, --force recomputes."""
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--inception-weights", default=None,
                   help="pytorch-fid Inception weights file, local or s3:// (default: None, the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--force", action="store_true", help=force_help)


def _args_run(r: argparse.ArgumentParser) -> None:
    r.add_argument("--config", required=True, help="pipeline YAML (see configs/)")
    _pipeline_flags(r, "override the config's out (default: None, the config's)", "recompute every stage")


def _args_demo(m: argparse.ArgumentParser) -> None:
    from synreal_ray.datasets.demo import make_demo_data

    m.add_argument("--config", default=None, help="default: configs/demo.yaml")
    m.add_argument("--data", default="data/demo", help="where the demo datasets are written (kept if present)")
    m.add_argument("--num-syn", type=int, default=default_of(make_demo_data, "num_syn"), help="synthetic images")
    m.add_argument("--num-real", type=int, default=default_of(make_demo_data, "num_real"), help="real training images")
    m.add_argument("--num-val", type=int, default=default_of(make_demo_data, "num_val"), help="real validation images")
    _pipeline_flags(m, "default: the config's out (out/demo)", "recompute every stage (the data is kept)")


def _args_tune(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", required=True, help="pipeline YAML with a tune: section (see configs/sweep.yaml)")
    _pipeline_flags(t, "override the config's out (default: None, the config's)",
                    "start over when OUT holds an interrupted sweep with other settings (deletes its trials)",
                    set_help="set any config key (repeatable), tune: section included, e.g. --set tune.milestones=[20]")


def _args_report(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("--run", required=True, help="the pipeline's out folder")


def _args_segment(sg: argparse.ArgumentParser) -> None:
    from synreal_ray.segment import SegmentConfig, SegmenterName

    sg.add_argument("--config", default=None, help="YAML with a segment: section (e.g. a mixture of datasets)")
    sg.add_argument("--train", default=None, metavar="URI",
                    help="training dataset root (replaces the config's list; needed without --config)")
    sg.add_argument("--train-layout", default=None, help="cityscapes, synscapes, gta5 or folder (needed with --train)")
    sg.add_argument("--train-split", default=None, help="cityscapes split (default train)")
    _override(sg, SegmentConfig, "--val", "dataset scored with the final checkpoint into out/val "
              "(default: None, no scoring)", metavar="URI")
    _override(sg, SegmentConfig, "--val-layout", "layout of --val")
    _override(sg, SegmentConfig, "--val-split", "default: val for the cityscapes layout")
    _override(sg, SegmentConfig, "--out", "output folder or s3:// prefix")
    _override(sg, SegmentConfig, "--model", f"one of {', '.join(typing.get_args(SegmenterName))}")
    _override(sg, SegmentConfig, "--image-size", "training crop", metavar="HxW")
    _override(sg, SegmentConfig, "--steps", "training steps", type=int)
    _override(sg, SegmentConfig, "--batch-size", "global batch, split over the workers", type=int)
    _override(sg, SegmentConfig, "--workers", "Ray Train workers (DDP)", type=int)
    _override(sg, SegmentConfig, "--backbone-weights", "backbone state dict, e.g. torchvision's ImageNet file; "
              "imagenet: torchvision's ImageNet backbone of --model from torch's hub cache, downloaded when missing "
              "(default: None, trained from scratch: nothing is read or downloaded)", metavar="FILE|s3://|imagenet")
    sg.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under --out")
    sg.add_argument("--force", action="store_true")


def _args_seg_eval(se: argparse.ArgumentParser) -> None:
    from synreal_ray.segment import SegEvalConfig

    se.add_argument("--model", required=True, help="output of `synreal segment` (its latest checkpoint), or a checkpoint")
    se.add_argument("--dataset", required=True, help="dataset root, local or s3://")
    se.add_argument("--layout", required=True, help="cityscapes, synscapes, gta5 or folder")
    se.add_argument("--split", default=default_of(SegEvalConfig, "split"), help="cityscapes split (default train)")
    se.add_argument("--out", required=True)
    se.add_argument("--save-predictions", action="store_true", default=default_of(SegEvalConfig, "save_predictions"),
                    help="write predictions/<sample id>.png (label IDs)")
    se.add_argument("--batch-size", type=int, default=default_of(SegEvalConfig, "batch_size"),
                    help="images per actor batch")
    se.add_argument("--actors", type=int, default=default_of(SegEvalConfig, "actors"),
                    help="default: one per GPU, else CPUs / 2")
    se.add_argument("--device", default=default_of(SegEvalConfig, "device"),
                    help="auto (GPU when present), cpu or cuda")
    se.add_argument("--in-process-max", type=int, default=default_of(SegEvalConfig, "in_process_max"),
                    help="sets of at most this many images are scored in this process, larger ones by an actor "
                         "pool (0: always a pool)")
    se.add_argument("--force", action="store_true")


# The commands: name, help, the function that runs it, the function that adds its arguments.
COMMANDS = [
    ("make-demo-data", "write the procedural demo datasets (synscapes + cityscapes layouts)",
     _make_demo_data, _args_make_demo_data),
    ("features", "SP-Feat vectors of a dataset's label maps -> Parquet",
     _features, _args_features),
    ("kliep", "KLIEP importance weights of both domains from their SP-Feat features",
     _kliep, _args_kliep),
    ("pairs", "K nearest neighbours in SP-Feat space (default: each real image's synthetic neighbours)",
     _pairs, _args_pairs),
    ("translate", "translate a synthetic dataset with a trained generator (same layout, labels copied)",
     _translate, _args_translate),
    ("fid", "Frechet Inception Distance between two folders of images (pytorch-fid's numbers)",
     _fid, _args_fid),
    ("train", "train UNIT or CycleGAN with Ray Train on pairs and KLIEP weights",
     _train, _args_train),
    ("run", "the whole pipeline: features, kliep, pairs, train, translate, segmenters, FID/KID, report",
     _run, _args_run),
    ("demo", "make the procedural demo data and run the pipeline on it (configs/demo.yaml)",
     _demo, _args_demo),
    ("tune", "Ray Tune sweep over K, SP-Feat levels, KLIEP width, model and weighting (FID, KID or mIoU)",
     _tune, _args_tune),
    ("report", "the report of a pipeline run (tables, pictures, report.html), written again",
     _report, _args_report),
    ("segment", "train a torchvision segmenter (19 Cityscapes classes) with Ray Train",
     _segment, _args_segment),
    ("seg-eval", "mIoU of a segment output on a dataset at full resolution (Ray Data actors)",
     _seg_eval, _args_seg_eval),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synreal", description="Synthetic-to-real translation of driving datasets on Ray.",
                                formatter_class=HelpFormatter)
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="also debug messages and Ray's own logs (worker output included)")
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no progress)")
    sub = p.add_subparsers(dest="command", required=True)

    for name, help, fn, add_arguments in COMMANDS:
        command = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        command.set_defaults(fn=fn)
        add_arguments(command)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each message, not as it was at set-up (tests replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbosity: int = 0) -> None:
    """The library logs under `synreal_ray.*`; the command line shows them on stderr: INFO and up
    (progress included), DEBUG with -v (verbosity 1), WARNING and up with -q (verbosity -1). Ray's
    own logs go to its log files unless -v (see cluster.set_ray_console)."""
    from synreal_ray.cluster import set_ray_console

    log = logging.getLogger("synreal_ray")
    if not log.handlers:
        handler = _StderrHandler()  # stderr: stdout holds the results a command prints
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO)
    set_ray_console(verbose=verbosity > 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    from synreal_ray.tune import SweepFailedError

    try:
        args.fn(args)
    except SweepFailedError as e:  # every trial's error is in the results table and its files
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise  # a system error with no file named: the stack trace is the only clue
        # Bad input is the user's to fix: one clear line, not a stack trace.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
