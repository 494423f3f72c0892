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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input is the user's to fix: one clear line, not a stack trace.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
