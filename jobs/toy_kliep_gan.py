"""The KLIEP paper's toy experiment (section IV.A, Table II): vanilla GAN vs KLIEP-weighted GAN.

    python jobs/toy_kliep_gan.py                 # 10,000 vectors of size 300, 40 epochs
    python jobs/toy_kliep_gan.py --quick         # 1,000 vectors of size 50, 5 epochs (seconds)
    python jobs/toy_kliep_gan.py --out results/  # also writes results.md, results.json and hist.png
    python jobs/toy_kliep_gan.py --json r.json   # the summary (distances per row, setup) as JSON

Source vectors are uniform in [0, 10), target vectors normal(7, 0.5). A generator G maps source
vectors to target-like ones; the discriminator D sees target vectors and G(source). The KLIEP GAN
is the same GAN, same initial weights and same batches, with each source sample's terms weighted
by ŵ(x^s) = p_target/p_source from fit_kliep(source, target) (the paper's eq. 13). Both generators
are then applied to fresh source vectors, and the flattened values are compared with fresh target
values: mean, std, Wasserstein and energy distance (scipy), as in Table II.

Choices the paper leaves open: G and D are two hidden layers of 256 units (G: linear + SELU,
D: linear + SELU, sigmoid output), the generator uses the usual non-saturating loss
-ŵ log D(G(x)) instead of ŵ log(1 - D(G(x))), batches run in a fixed order ("we intentionally
switch off random batches"), and inputs are not rescaled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import energy_distance, wasserstein_distance

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from synreal_ray.kliep import effective_sample_size, fit_kliep  # noqa: E402

PAPER = [  # Table II of the paper: mean, std, Wasserstein, energy distance to the target
    ("Target (Gauss)", 7.0, 0.5, None, None),
    ("Source (uniform)", 5.0, 2.9, 2.56, 1.39),
    ("Vanilla GAN", 7.7, 2.0, 1.32, 0.79),
    ("KLIEP GAN (paper's 'Ours')", 6.7, 1.8, 1.08, 0.67),
]


def make_data(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    source = rng.uniform(0.0, 10.0, (n, dim)).astype(np.float32)
    target = rng.normal(7.0, 0.5, (n, dim)).astype(np.float32)
    return source, target


def mlp(dim_in: int, dim_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.SELU(), nn.Linear(hidden, hidden), nn.SELU(),
                         nn.Linear(hidden, dim_out))


def train_gan(source: np.ndarray, target: np.ndarray, weights: np.ndarray, args: argparse.Namespace) -> nn.Module:
    """SGD GAN training; `weights` multiplies every source-sample term (all ones: vanilla GAN)."""
    torch.manual_seed(args.seed)  # same initial G and D for both GANs
    dim = source.shape[1]
    G, D = mlp(dim, dim, args.hidden), mlp(dim, 1, args.hidden)  # D's sigmoid lives in the loss
    opt_g = torch.optim.SGD(G.parameters(), lr=args.lr_g)
    opt_d = torch.optim.SGD(D.parameters(), lr=args.lr_d)
    xs_all, xt_all, w_all = map(torch.from_numpy, (source, target, weights.astype(np.float32)))
    for _ in range(args.epochs):
        for i in range(0, len(xs_all), args.batch):
            xs, xt, w = xs_all[i:i + args.batch], xt_all[i:i + args.batch], w_all[i:i + args.batch]
            # D: maximise E_t[log D(x^t)] + E_s[ŵ log(1 - D(G(x^s)))]
            d_real, d_fake = D(xt).squeeze(1), D(G(xs).detach()).squeeze(1)
            loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + (w * F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake), reduction="none")).mean())
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            # G: non-saturating form of minimising E_s[ŵ log(1 - D(G(x^s)))]
            d_fake = D(G(xs)).squeeze(1)
            loss_g = (w * F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake), reduction="none")).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
    return G


def stats(values: np.ndarray, target: np.ndarray | None) -> tuple[float, float, float | None, float | None]:
    v = values.ravel().astype(np.float64)
    if target is None:
        return float(v.mean()), float(v.std()), None, None
    t = target.ravel().astype(np.float64)
    return float(v.mean()), float(v.std()), float(wasserstein_distance(v, t)), float(energy_distance(v, t))


def markdown_table(rows: list[tuple]) -> str:
    def cell(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["| Distribution | mean | std | Wasserstein distance | Energy distance |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(cell(x) for x in vals) + " |" for name, *vals in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: 1000 vectors of size 50, 5 epochs")
    p.add_argument("--n", type=int, default=10_000, help="vectors per domain")
    p.add_argument("--dim", type=int, default=300, help="vector size")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr-g", type=float, default=8e-3)
    p.add_argument("--lr-d", type=float, default=4e-3)
    p.add_argument("--centers", type=int, default=100, help="KLIEP basis centres")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: min(4, cores))")
    p.add_argument("--out", help="directory for results.md, results.json and hist.png")
    p.add_argument("--json", help="also write the summary (Wasserstein/energy distances per row) here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.epochs, args.centers = 1000, 50, 5, 50
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads if args.threads > 0 else max(1, min(4, os.cpu_count() or 1)))
    rng = np.random.default_rng(args.seed)
    source, target = make_data(args.n, args.dim, rng)
    test_source, test_target = make_data(args.n, args.dim, rng)  # evaluation on fresh vectors

    t0 = time.time()
    kliep = fit_kliep(source, target, num_centers=args.centers, seed=args.seed, device="cpu")
    w = kliep.weights(source)
    t_kliep = time.time() - t0
    kliep_line = (f"KLIEP: sigma={kliep.sigma:.4g} (CV over {len(kliep.cv_scores)} widths), "
                  f"{kliep.iterations} solver passes, converged={kliep.converged}; weights on the "
                  f"{len(w)} source vectors: mean={w.mean():.4f} max={w.max():.4g} "
                  f"ESS={effective_sample_size(w):.1f} ({t_kliep:.1f}s)")
    print(kliep_line, flush=True)

    gens, t_gan = {}, {}
    for name, weights in (("Vanilla GAN", np.ones(len(source))), ("KLIEP GAN", w)):
        t0 = time.time()
        G = train_gan(source, target, weights, args)
        with torch.no_grad():
            gens[name] = G(torch.from_numpy(test_source)).numpy()
        t_gan[name] = time.time() - t0
        print(f"{name}: trained in {t_gan[name]:.1f}s", flush=True)

    rows = [("Target (Gauss)", *stats(test_target, None)), ("Source (uniform)", *stats(test_source, test_target))]
    rows += [(name, *stats(g, test_target)) for name, g in gens.items()]
    setup = (f"{args.n} vectors of size {args.dim} per domain, {args.epochs} epochs, batch {args.batch}, "
             f"SGD lr {args.lr_g:g} (G) / {args.lr_d:g} (D), {args.centers} KLIEP centres, seed {args.seed}")
    text = "\n".join([f"Setup: {setup}.", kliep_line, "", markdown_table(rows), "",
                      "Paper (Table II):", "", markdown_table(PAPER)])
    print("\n" + text)
    summary = {
        "setup": {k: getattr(args, k) for k in ("n", "dim", "epochs", "batch", "hidden", "lr_g", "lr_d",
                                                  "centers", "seed")},
        "table": {name: dict(zip(("mean", "std", "wasserstein", "energy"), vals)) for name, *vals in rows},
        "wasserstein": {name: vals[2] for name, *vals in rows[1:]},  # to the (fresh) target values
        "energy": {name: vals[3] for name, *vals in rows[1:]},
        "kliep": {"sigma": kliep.sigma, "converged": kliep.converged, "ess": effective_sample_size(w),
                  "max_weight": float(w.max())},
        "seconds": {"kliep": t_kliep, **t_gan},
    }
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text + "\n")
        write_json(os.path.join(args.out, "results.json"), summary)
        plot(os.path.join(args.out, "hist.png"), test_source, test_target, gens)
    if args.json:
        write_json(args.json, summary)
    return {**summary, "rows": rows, "sigma": kliep.sigma, "weights": w, "text": text}


def write_json(path: str, summary: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")


def plot(path: str, source: np.ndarray, target: np.ndarray, gens: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    series = [("source", source, "tab:blue"), ("target", target, "tab:red"),
              ("vanilla GAN", gens["Vanilla GAN"], "tab:orange"), ("KLIEP GAN", gens["KLIEP GAN"], "tab:green")]
    lo = min(float(v.min()) for _, v, _ in series)
    hi = max(float(v.max()) for _, v, _ in series)
    bins = np.linspace(lo, hi, 120)
    for label, v, color in series:
        ax.hist(v.ravel(), bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=color, label=label)
    ax.set_xlabel("value")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
