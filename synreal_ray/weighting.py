"""Stage `kliep`: SP-Feat features of both domains -> importance weights, on Ray.

For each direction (w = p_real/p_syn on synthetic samples, ψ = p_syn/p_real on real samples):

1. σ by honest likelihood CV and the basis centres, from a subsample of each domain that fits the
   driver (`fit_kliep`, the pure core in `kliep.py`);
2. the N × b kernel rows of every sample against the centres, computed by Ray Data `map_batches`
   (pairwise distances as a matrix product) and stored as Parquet (`id`, `kernel`);
3. α refitted at full scale by `solve_kliep`, streaming those rows in blocks, and the weights
   ŵ(x) = K(x) · α of every source sample.

Output under `out`:
  weights/part-*.parquet   id, domain, weight       (both domains)
  kernels/{w,psi}/{source,target}/part-*.parquet    the kernel rows, kept for inspection and reuse
  model.json               both fitted models (σ, centres, α), to weight new samples later
  report.json              σ and CV table per direction, weight statistics, ESS, normalisation
  histogram.png            the weight distribution per domain
  stage.json, _SUCCESS
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synreal_ray import storage
from synreal_ray.config import URI, ConfigError
from synreal_ray.features import check_compatible, feature_matrix, features_dataset, features_meta, fits_driver, sample_features
from synreal_ray.kliep import (
    KliepResult,
    clip_weights,
    effective_sample_size,
    fit_kliep,
    gaussian_kernel,
    kernel_column_mean,
    solve_kliep,
)
from synreal_ray.progress import bar as progress_bar
from synreal_ray.stage import Stage, read_info

log = logging.getLogger(__name__)

# Kernel rows smaller than this are read once and kept in memory; larger ones are streamed from
# Parquet on every solver pass so that N in the millions never sits on the driver.
IN_MEMORY_BYTES = 512 << 20

# direction -> (source domain, target domain): w is evaluated on synthetic samples, ψ on real ones
DIRECTIONS = {"w": ("syn", "real"), "psi": ("real", "syn")}


@dataclass(frozen=True)
class KliepConfig:
    syn: URI
    real: URI
    out: URI
    sigma: float | None = None  # None: chosen by likelihood cross-validation
    centers: int = 100
    folds: int = 5
    clip: float | None = None  # largest weight allowed after renormalising to mean 1
    cv_samples: int = 2000  # per domain, for σ selection and the warm start
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.sigma is not None and not 0 < self.sigma < math.inf:
            raise ConfigError(f"must be a finite number > 0 or null (cross-validated), got {self.sigma}", "sigma")
        if self.centers < 1:
            raise ConfigError(f"must be >= 1, got {self.centers}", "centers")
        if self.folds < 2:
            raise ConfigError(f"must be >= 2, got {self.folds}", "folds")
        if self.clip is not None and not self.clip > 1:
            raise ConfigError(f"must be > 1 (a weight of mean-1 weights) or null, got {self.clip}", "clip")
        if self.cv_samples < 10:
            raise ConfigError(f"must be >= 10, got {self.cv_samples}", "cv_samples")
        if self.seed < 0:
            raise ConfigError(f"must be >= 0, got {self.seed}", "seed")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"must be auto, cpu or cuda, got {self.device!r}", "device")


def _kernel_rows(batch: pa.Table, centers: np.ndarray, sigma: float, out: str) -> dict:
    """Ray Data batch function: kernel rows of a batch of features, written as one Parquet part."""
    x = feature_matrix(batch.column("feature"), centers.shape[1])
    k = gaussian_kernel(x, centers, sigma).astype(np.float32)
    ids = batch.column("id")
    table = pa.table({"id": ids, "kernel": pa.FixedSizeListArray.from_arrays(pa.array(k.reshape(-1)), k.shape[1])})
    storage.write_parquet(table, storage.join(out, storage.part_name(ids.to_pylist())))
    return {"rows": np.array([len(k)])}


def compute_kernel_rows(features: str, centers: np.ndarray, sigma: float, out: str) -> int:
    """K(x, centres) for every row of a features output, stored under `out`: by Ray Data, or on
    the driver for a small output (features.DRIVER_ROWS)."""
    if fits_driver(features):
        table = storage.read_table(storage.join(features, "features"), columns=["id", "feature"])
        return int(_kernel_rows(table, centers.astype(np.float32), sigma, out)["rows"].sum())
    ds = features_dataset(features, columns=("id", "feature"))
    summary = ds.map_batches(_kernel_rows, fn_kwargs={"centers": centers.astype(np.float32), "sigma": sigma, "out": out},
                             batch_format="pyarrow", batch_size=4096)
    summary.context.enable_progress_bars = False  # the bar below counts rows
    rows = 0
    with progress_bar(read_info(features)["rows"], "kernel rows", "row", log) as bar:
        for b in summary.iter_batches(batch_size=None, batch_format="numpy"):
            rows += int(b["rows"].sum())
            bar.update(int(b["rows"].sum()))
    return rows


class KernelRows:
    """The kernel rows under a prefix as blocks: `blocks()` is a fresh iterator each call, as the
    solver wants. Small matrices are read once; large ones stream from Parquet every time."""

    def __init__(self, uri: str, num_centers: int):
        self.uri, self.b = uri, num_centers
        self.parts = storage.data_files(uri)
        fs, _ = storage.resolve(uri)
        self.fs = fs
        size = sum(fs.get_file_info(storage.resolve(p)[1]).size for p in self.parts)
        self._cache = list(self._read()) if size < IN_MEMORY_BYTES else None

    def _read(self):
        for part in self.parts:
            with self.fs.open_input_file(storage.resolve(part)[1]) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=65536):
                    yield batch.column("id").to_numpy(zero_copy_only=False), feature_matrix(batch.column("kernel"), self.b)

    def with_ids(self):
        return iter(self._cache) if self._cache is not None else self._read()

    def blocks(self):
        return (k for _, k in self.with_ids())


def _stats(w: np.ndarray) -> dict:
    return {"n": int(len(w)), "min": float(w.min()), "mean": float(w.mean()), "max": float(w.max()),
            "ess": effective_sample_size(w), "ess_fraction": effective_sample_size(w) / len(w)}


def fit_direction(cfg: KliepConfig, name: str, features: dict[str, str], subsamples: dict[str, np.ndarray]):
    """One direction: σ and centres on subsamples, kernel rows on Ray, α at full scale, weights."""
    src, tgt = DIRECTIONS[name]
    sub = fit_kliep(subsamples[src], subsamples[tgt], sigma=cfg.sigma, num_centers=min(cfg.centers, len(subsamples[tgt])),
                    folds=cfg.folds, seed=cfg.seed, device=cfg.device)
    rows = {}
    for role, domain in (("source", src), ("target", tgt)):
        prefix = storage.join(cfg.out, "kernels", name, role)
        compute_kernel_rows(features[domain], sub.centers, sub.sigma, prefix)
        rows[role] = KernelRows(prefix, len(sub.centers))
    b = kernel_column_mean(rows["source"].blocks)
    sol = solve_kliep(rows["target"].blocks, b, alpha0=sub.alpha, device=cfg.device)
    model = sub.with_alpha(sol)
    ids, weights = [], []
    for i, k in rows["source"].with_ids():
        ids.append(i)
        weights.append(k.astype(np.float64) @ model.alpha)
    ids, w = np.concatenate(ids), np.concatenate(weights)
    target_mean = float(np.mean(np.concatenate([k.astype(np.float64) @ model.alpha for k in rows["target"].blocks()])))
    report = {
        "source": src, "target": tgt, "sigma": model.sigma, "sigma_chosen_by": "cv" if cfg.sigma is None else "given",
        "cv": [{"sigma": s, "score": v} for s, v in model.cv_scores], "centers": int(len(model.centers)),
        "iterations": sol.iterations, "converged": sol.converged, "stop_reason": sol.stop_reason,
        "objective": sol.objective,
        # KLIEP's constraint makes mean ŵ over the source 1; over the target it is > 1 when the
        # domains differ (the model puts mass where the target is).
        "normalisation": {"mean_over_source": float(w.mean()), "mean_over_target": target_mean},
        "raw": _stats(w),
    }
    if cfg.clip:
        w, n_clipped = clip_weights(w, cfg.clip)
        report["clipped"] = {"limit": cfg.clip, "count": n_clipped, **_stats(w)}
    return model, ids, w, report


def run_kliep(cfg: KliepConfig, force: bool = False) -> dict:
    from synreal_ray.cluster import init_ray
    from synreal_ray.viz import weight_histograms

    features = {"syn": cfg.syn, "real": cfg.real}
    metas = {d: features_meta(u) for d, u in features.items()}
    check_compatible(metas["syn"], metas["real"], cfg.syn, cfg.real)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("syn", "real", "out")}
    stage = Stage("kliep", cfg.out, settings, inputs=[cfg.syn, cfg.real])
    if not stage.begin(force):
        return {"skipped": True, **storage.read_json(storage.join(cfg.out, "stage.json"))}
    init_ray()
    subsamples = {d: sample_features(u, cfg.cv_samples, cfg.seed).astype(np.float64) for d, u in features.items()}
    models, report, tables, weights = {}, {}, [], {}
    for name, (src, _) in DIRECTIONS.items():
        model, ids, w, rep = fit_direction(cfg, name, features, subsamples)
        models[name], report[name], weights[src] = model.to_dict(), rep, w
        tables.append(pa.table({"id": pa.array(ids, pa.string()), "domain": pa.array([src] * len(ids), pa.string()),
                                "weight": pa.array(w, pa.float64())}))
        storage.write_parquet(tables[-1], storage.join(cfg.out, "weights", f"part-{src}.parquet"))
    storage.write_json(storage.join(cfg.out, "model.json"), models)
    storage.write_json(storage.join(cfg.out, "report.json"), report)
    storage.write_bytes(storage.join(cfg.out, "histogram.png"), weight_histograms(
        weights, {"syn": "w = p_real / p_syn on synthetic", "real": "ψ = p_syn / p_real on real"}))
    return stage.publish(rows={d: int(len(w)) for d, w in weights.items()},
                         sigma={n: r["sigma"] for n, r in report.items()},
                         ess_fraction={n: r["raw"]["ess_fraction"] for n, r in report.items()})


def load_weights(uri: str) -> dict[str, dict[str, float]]:
    """Published weights as {domain: {id: weight}}."""
    storage.require_complete(uri, "kliep output")
    table = storage.read_table(storage.join(uri, "weights"))
    out: dict[str, dict[str, float]] = {"syn": {}, "real": {}}
    for i, d, w in zip(*(table.column(c).to_pylist() for c in ("id", "domain", "weight"))):
        out[d][i] = w
    return out


def load_models(uri: str) -> dict[str, KliepResult]:
    storage.require_complete(uri, "kliep output")
    return {n: KliepResult.from_dict(d) for n, d in storage.read_json(storage.join(uri, "model.json")).items()}


def kliep_summary(rec: dict, out: str) -> str:
    """One line on a kliep stage record: the kernel widths and the effective sample sizes."""
    return (f"kliep: sigma w={rec['sigma']['w']:.4g} psi={rec['sigma']['psi']:.4g}; effective sample size "
            f"{rec['ess_fraction']['w']:.0%} of synthetic, {rec['ess_fraction']['psi']:.0%} of real "
            f"-> {out} (report.json, histogram.png){' (up to date, skipped)' if rec.get('skipped') else ''}")
