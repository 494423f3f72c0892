"""Ray Tune sweep over the method's knobs, scored by FID.

The search space covers K (pairs), the SP-Feat levels (slice granularity), the KLIEP kernel width,
the model and the weighting mode. A trial runs pairs -> training -> translating a fixed validation
subset of the synthetic set -> FID against the real set, once per training milestone, and reports
the FID after each milestone, so an ASHA scheduler can stop weak trials early. The stages that
trials share are computed once on the driver before Tune starts: features per levels, KLIEP per
(levels, σ), the validation subset, the real set's Inception activations. Every stage skips work
that is already published, so a restored sweep (`Tuner.restore`) does not redo finished parts.

Output under the sweep's `out`:
  cache/                 shared features, kliep outputs, the validation subset
  trials/<trial id>/     each trial's pairs, training run and translations
  tune/                  Ray Tune's experiment folder (what `Tuner.restore` reads)
  results.csv, results.md (best first), best.yaml (a config `synreal run` accepts)
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

import yaml

from synreal_ray import storage
from synreal_ray.config import ConfigError, from_dict, to_dict
from synreal_ray.pipeline import PipelineConfig, RunSpec, _plain, fid_between, inception_weights

METRIC = "fid"


@dataclass(frozen=True)
class SearchSpace:
    k: tuple[int, ...] = (5,)
    levels: tuple[str, ...] = ("1,2,4",)
    sigma: tuple[float | None, ...] = (None,)  # None: chosen by KLIEP's cross-validation
    model: tuple[str, ...] = ("unit",)
    weighting: tuple[str, ...] = ("loss",)

    def __post_init__(self):
        for name in ("k", "levels", "sigma", "model", "weighting"):
            if not getattr(self, name):
                raise ConfigError("needs at least one value", name)
        if not set(self.model) <= {"unit", "cyclegan"}:
            raise ConfigError(f"{self.model}: models are unit and cyclegan", "model")
        if not set(self.weighting) <= {"loss", "sampling", "none"}:
            raise ConfigError(f"{self.weighting}: weightings are loss, sampling and none", "weighting")



@dataclass(frozen=True)
class TuneSection:
    space: SearchSpace = field(default_factory=SearchSpace)
    milestones: tuple[int, ...] = (100, 200)  # training steps after which a trial reports its FID
    val_images: int = 32  # the fixed synthetic subset every trial translates and scores
    scheduler: str = "asha"  # or "fifo"
    grace_period: int = 1  # milestones a trial always gets under ASHA
    max_concurrent_trials: int = 1  # on small machines, more trials than CPUs deadlock Ray Train
    trial_cpus: float = 1.0

    def __post_init__(self):
        if not self.milestones or list(self.milestones) != sorted(set(self.milestones)) or self.milestones[0] < 1:
            raise ConfigError(f"must be increasing step counts >= 1, got {self.milestones}", "milestones")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"{self.scheduler!r} is not asha or fifo", "scheduler")
        if self.val_images < 2 or self.max_concurrent_trials < 1 or self.grace_period < 1:
            raise ConfigError("val_images >= 2, max_concurrent_trials >= 1 and grace_period >= 1 are needed")


def load_sweep_config(uri: str, overrides: dict[str, Any] | None = None) -> tuple[PipelineConfig, TuneSection]:
    """A sweep file is a pipeline config plus a `tune:` section."""
    from synreal_ray.pipeline import pipeline_config_from_doc

    doc = dict(yaml.safe_load(storage.read_bytes(uri)) or {})
    try:
        tune_cfg = from_dict(TuneSection, doc.pop("tune", {}), "tune")
    except ConfigError as e:
        raise ConfigError(f"{uri}: {e}") from None
    return pipeline_config_from_doc(doc, overrides, uri), tune_cfg


# --- what trials share, computed once ---

def _sigma_key(sigma: float | None) -> str:
    return "auto" if sigma is None else f"{sigma:g}"


def _levels_key(levels: str) -> str:
    return levels.replace(",", "_")


def cache_paths(cfg: PipelineConfig, levels: str, sigma: float | None) -> dict[str, str]:
    c = lambda *p: storage.join(cfg.out, "cache", *p)  # noqa: E731
    return {"syn": c("features", _levels_key(levels), "syn"), "real": c("features", _levels_key(levels), "real"),
            "kliep": c("kliep", _levels_key(levels), _sigma_key(sigma)), "val": c("val-syn")}


def prepare_shared(cfg: PipelineConfig, tune_cfg: TuneSection) -> None:
    from synreal_ray.features import FeaturesConfig, run_features
    from synreal_ray.weighting import KliepConfig, run_kliep

    d, space = cfg.data, tune_cfg.space
    for levels in space.levels:
        cp = cache_paths(cfg, levels, None)
        run_features(FeaturesConfig(dataset=d.syn, layout=d.syn_layout, split=d.syn_split, out=cp["syn"],
                                    levels=levels, domain="syn", on_error=cfg.features.on_error))
        run_features(FeaturesConfig(dataset=d.real, layout=d.real_layout, split=d.real_split, out=cp["real"],
                                    levels=levels, domain="real", on_error=cfg.features.on_error))
        for sigma in space.sigma:
            cp = cache_paths(cfg, levels, sigma)
            kl = {**dataclasses.asdict(cfg.kliep), "sigma": sigma}
            run_kliep(KliepConfig(syn=cp["syn"], real=cp["real"], out=cp["kliep"], **kl))
    write_validation_subset(cfg, tune_cfg.val_images)


def write_validation_subset(cfg: PipelineConfig, n: int) -> str:
    """The first n synthetic samples (by id) copied into a small dataset of the same layout."""
    from synreal_ray.datasets.layouts import list_dataset
    from synreal_ray.stage import Stage

    d = cfg.data
    out = cache_paths(cfg, "1", None)["val"]
    stage = Stage("val-subset", out, {"n": n, "syn": d.syn, "layout": d.syn_layout, "split": d.syn_split})
    if stage.begin():
        samples, _ = list_dataset(d.syn, d.syn_layout, d.syn_split)
        for s in samples[:n]:
            for uri in (s.image_uri, s.label_uri):
                storage.write_bytes(storage.join(out, *storage.relpath(uri, d.syn).split("/")), storage.read_bytes(uri))
        stage.publish(images=min(n, len(samples)))
    return out


# --- one trial ---

def trial_config(cfg: PipelineConfig, params: dict[str, Any], trial_dir: str) -> PipelineConfig:
    """The pipeline config a trial's parameters stand for (also what best.yaml holds)."""
    return dataclasses.replace(
        cfg, out=trial_dir,
        features=dataclasses.replace(cfg.features, levels=params["levels"]),
        kliep=dataclasses.replace(cfg.kliep, sigma=params["sigma"]),
        pairs=dataclasses.replace(cfg.pairs, k=params["k"]),
        runs=(RunSpec(name=f"{params['model']}-{params['weighting']}", model=params["model"], pairing="spfeat",
                      weighting=params["weighting"]),))


def run_trial(params: dict[str, Any], cfg: PipelineConfig, tune_cfg: TuneSection) -> None:
    import ray.tune

    from synreal_ray.datasets.layouts import image_root
    from synreal_ray.pairing import PairsConfig, run_pairs
    from synreal_ray.pipeline import train_config
    from synreal_ray.train import run_train
    from synreal_ray.translate import TranslateConfig, run_translate

    trial_dir = storage.join(cfg.out, "trials", ray.tune.get_context().get_trial_id())
    tcfg = trial_config(cfg, params, trial_dir)
    cp = cache_paths(cfg, params["levels"], params["sigma"])
    pairs = storage.join(trial_dir, "pairs")
    run_pairs(PairsConfig(syn=cp["syn"], real=cp["real"], weights=cp["kliep"], out=pairs, k=params["k"],
                          max_distance=cfg.pairs.max_distance, index=cfg.pairs.index))
    weights, _ = inception_weights(cfg)
    real_img = image_root(cfg.data.real, cfg.data.real_layout, cfg.data.real_split)
    run = tcfg.runs[0]
    for step in tune_cfg.milestones:
        # Each milestone continues the same training run from its last checkpoint.
        train = dataclasses.replace(train_config(tcfg, run), pairs=pairs,
                                    weights=cp["kliep"] if run.weighting != "none" else None,
                                    steps=step, resume=True, checkpoint_every=step)
        run_train(train)
        out = storage.join(trial_dir, f"val-translated-{step}")
        run_translate(TranslateConfig(checkpoint=train.out, dataset=cp["val"], layout=cfg.data.syn_layout,
                                      split=cfg.data.syn_split, out=out, batch_size=cfg.translate.batch_size))
        fid = fid_between(cfg, image_root(out, cfg.data.syn_layout, cfg.data.syn_split), real_img, weights)
        ray.tune.report({METRIC: fid, "step": step})


# --- the sweep ---

def run_sweep(cfg: PipelineConfig, tune_cfg: TuneSection) -> list[dict[str, Any]]:
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from synreal_ray.cluster import init_ray

    init_ray()
    prepare_shared(cfg, tune_cfg)
    inception_weights(cfg)  # the random-weight fallback is written once, before trials race for it
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, cfg=cfg, tune_cfg=tune_cfg), {"cpu": tune_cfg.trial_cpus})
    storage_path = storage.join(cfg.out, "tune")
    if not storage.is_s3(storage_path):
        import os

        storage_path = os.path.abspath(storage_path)
    exp = storage.join(storage_path, "sweep")
    if ray.tune.Tuner.can_restore(exp):
        print(f"[synreal] resuming the interrupted sweep in {exp}", flush=True)
        tuner = ray.tune.Tuner.restore(exp, trainable=trainable, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(tune_cfg.milestones),
                                   grace_period=tune_cfg.grace_period)
                     if tune_cfg.scheduler == "asha" else FIFOScheduler())
        tuner = ray.tune.Tuner(
            trainable,
            param_space=_space(tune_cfg.space),
            tune_config=ray.tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler,
                                            max_concurrent_trials=tune_cfg.max_concurrent_trials),
            run_config=ray.tune.RunConfig(name="sweep", storage_path=storage_path, verbose=1))
    results = tuner.fit()
    rows = []
    for r in results:
        if r.metrics and METRIC in r.metrics:
            rows.append({**{k: r.config[k] for k in ("k", "levels", "sigma", "model", "weighting")},
                         METRIC: r.metrics[METRIC], "step": r.metrics.get("step"),
                         "trial": r.metrics.get("trial_id"), "error": None})
        else:
            rows.append({**{k: r.config.get(k) for k in ("k", "levels", "sigma", "model", "weighting")},
                         METRIC: None, "step": None, "trial": None, "error": str(r.error)[:200] if r.error else "no result"})
    rows.sort(key=lambda r: (r[METRIC] is None, r[METRIC] if r[METRIC] is not None else 0))
    write_results(cfg, rows)
    return rows


def _space(space: SearchSpace) -> dict[str, Any]:
    import ray.tune

    return {k: ray.tune.grid_search(list(getattr(space, k))) for k in ("k", "levels", "sigma", "model", "weighting")}


def write_results(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> None:
    cols = ("k", "levels", "sigma", "model", "weighting", METRIC, "step", "trial", "error")
    csv = io.StringIO()
    csv.write(",".join(cols) + "\n")
    for r in rows:
        csv.write(",".join("" if r[c] is None else f'"{r[c]}"' if isinstance(r[c], str) else str(r[c]) for c in cols) + "\n")
    md = ["| rank | K | levels | sigma | model | weighting | FID | steps |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        fid = f"{r[METRIC]:.2f}" if r[METRIC] is not None else f"failed: {r['error']}"
        md.append(f"| {i} | {r['k']} | {r['levels']} | {_sigma_key(r['sigma'])} | {r['model']} | {r['weighting']} "
                  f"| {fid} | {r['step']} |")
    storage.write_bytes(storage.join(cfg.out, "results.csv"), csv.getvalue().encode())
    storage.write_bytes(storage.join(cfg.out, "results.md"), ("\n".join(md) + "\n").encode())
    print("\n".join(md), flush=True)
    best = next((r for r in rows if r[METRIC] is not None), None)
    if best is None:
        raise RuntimeError(f"every trial failed; see {storage.join(cfg.out, 'results.md')}")
    best_cfg = trial_config(cfg, best, storage.join(cfg.out, "best-run"))
    storage.write_bytes(storage.join(cfg.out, "best.yaml"),
                        yaml.safe_dump(_plain(to_dict(best_cfg)), sort_keys=False).encode())
    print(f"\nbest config: {storage.join(cfg.out, 'best.yaml')} (synreal run --config it)", flush=True)
