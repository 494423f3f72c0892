"""Ray Tune sweep over the method's knobs, scored by FID, KID, consistency mIoU or downstream mIoU.

The search space covers K (pairs), the SP-Feat levels (slice granularity), the KLIEP kernel width,
the model and the weighting mode. A trial runs pairs -> training -> its metric (`tune.metric`), once
per training milestone, and reports the metric after each milestone, so an ASHA scheduler can stop
weak trials early. A trial computes only what its metric needs:

  fid, kid           translate a fixed validation subset of the synthetic set; FID or KID against
                     the real val split (the real train split where there is none); lower is better
  consistency_miou   translate the validation subset; the judge (a segmenter trained on real
                     train once, before the trials) scores it against the synthetic labels
  downstream_miou    translate the whole synthetic set; train a segmenter on it (`segment:`) and
                     score it on the real val split; higher is better

The stages that trials share are computed once on the driver before Tune starts: features per
levels, KLIEP per (levels, σ), the validation subset, the judge. Every stage skips work that is
already published, so a restored sweep (`Tuner.restore`) does not redo finished parts.

Output under the sweep's `out`:
  cache/                 shared features, kliep outputs, the validation subset, the judge (segment/real)
  trials/<trial id>/     each trial's pairs, training run and translations
  tune/                  Ray Tune's experiment folder (what `Tuner.restore` reads)
  results.csv, results.md (best first), best.yaml (a config `synreal run` accepts)
  errors/<trial id>.txt  the full traceback of each failed trial (its row says type and message)

Paths in `cfg` are absolute (the config layer resolves them): each trial runs in a working
directory of its own, where a relative path would point elsewhere.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from synreal_ray import storage
from synreal_ray.config import ConfigError, from_dict, to_dict
from synreal_ray.pipeline import PipelineConfig, RunSpec, _plain, inception_weights

log = logging.getLogger(__name__)

METRICS = {"fid": "min", "kid": "min", "consistency_miou": "max", "downstream_miou": "max"}  # metric: Tune's mode
LABELS = {"fid": "FID", "kid": "KID", "consistency_miou": "consistency mIoU", "downstream_miou": "downstream mIoU"}
PARAMS = ("k", "levels", "sigma", "model", "weighting")


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
        if not set(self.weighting) <= {"loss", "source", "sampling", "none"}:
            raise ConfigError(f"{self.weighting}: weightings are loss, source, sampling and none", "weighting")



@dataclass(frozen=True)
class TuneSection:
    space: SearchSpace = field(default_factory=SearchSpace)
    metric: Literal["fid", "kid", "consistency_miou", "downstream_miou"] = "fid"  # what trials report and Tune ranks
    milestones: tuple[int, ...] = (100, 200)  # training steps after which a trial reports its metric
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
        for key, low in (("val_images", 2), ("grace_period", 1), ("max_concurrent_trials", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"must be >= {low}, got {getattr(self, key)}", key)
        if not self.trial_cpus > 0:
            raise ConfigError(f"must be > 0, got {self.trial_cpus}", "trial_cpus")
        if self.metric not in METRICS:
            raise ConfigError(f"{self.metric!r} is not one of {', '.join(METRICS)}", "metric")

    @property
    def mode(self) -> str:
        """Tune's mode for the metric: min for FID and KID, max for the mIoUs."""
        return METRICS[self.metric]


def check_space(cfg: PipelineConfig, space: SearchSpace) -> None:
    """Every searched value through the check of the stage that takes it (written once, in that
    stage's config), before any trial runs; an error names the value, e.g. `tune.space.k[1]`."""
    from synreal_ray.pipeline import features_config, kliep_config, pairs_config, train_config

    checks = {"k": lambda v: pairs_config(cfg, k=v), "levels": lambda v: features_config(cfg, "syn", levels=v),
              "sigma": lambda v: kliep_config(cfg, sigma=v)}
    for name, check in checks.items():
        for i, value in enumerate(getattr(space, name)):
            try:
                check(value)
            except ConfigError as e:
                raise ConfigError(e.message, f"tune.space.{name}[{i}]") from None
    for i, model in enumerate(space.model):  # the train section with each model: its options, the image size
        for weighting in space.weighting:
            try:
                train_config(cfg, RunSpec(f"{model}-{weighting}", model, "spfeat", weighting))
            except ConfigError as e:
                raise ConfigError(str(e), f"tune.space.model[{i}]") from None


def load_sweep_config(uri: str, overrides: dict[str, Any] | None = None,
                      assignments: dict[str, Any] | None = None) -> tuple[PipelineConfig, TuneSection]:
    """A sweep file is a pipeline config plus a `tune:` section. `assignments` (`--set`) may
    set keys of either (`tune.milestones`, `train.steps`); `overrides` are CLI flags (None: not
    given)."""
    from synreal_ray.config import set_dotted
    from synreal_ray.pipeline import pipeline_config_from_doc, read_config_doc

    doc = read_config_doc(uri)
    pipeline_sets = {}
    tune_doc = doc.pop("tune", None) or {}
    try:
        if not isinstance(tune_doc, dict):
            raise ConfigError(f"expected a mapping of tune keys, got {tune_doc!r}", "tune")
        for key, value in (assignments or {}).items():
            if key.startswith("tune."):
                set_dotted(tune_doc, key[len("tune."):], value)
            else:
                pipeline_sets[key] = value
        tune_cfg = from_dict(TuneSection, tune_doc, "tune")
    except ConfigError as e:
        raise ConfigError(f"{uri}: {e}") from None
    cfg = pipeline_config_from_doc(doc, overrides, uri, pipeline_sets)
    try:
        check_space(cfg, tune_cfg.space)
    except ConfigError as e:
        raise ConfigError(f"{uri}: {e}") from None
    return cfg, tune_cfg


# --- what trials share, computed once ---

def _sigma_key(sigma: float | None) -> str:
    return "auto" if sigma is None else f"{sigma:g}"


def _levels_key(levels: str) -> str:
    return levels.replace(",", "_")


def cache_paths(cfg: PipelineConfig, levels: str, sigma: float | None) -> dict[str, str]:
    c = lambda *p: storage.join(cfg.out, "cache", *p)  # noqa: E731
    return {"syn": c("features", _levels_key(levels), "syn"), "real": c("features", _levels_key(levels), "real"),
            "kliep": c("kliep", _levels_key(levels), _sigma_key(sigma)), "val": c("val-syn"),
            "judge": c("segment", "real")}


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
    if tune_cfg.metric == "consistency_miou":
        from synreal_ray.pipeline import judge_config
        from synreal_ray.segment import run_segment

        log.info("training the judge (a segmenter on real train) that scores every trial's consistency")
        run_segment(judge_config(cfg, cache_paths(cfg, "1", None)["judge"]))
    elif tune_cfg.metric in ("fid", "kid"):
        inception_weights(cfg)  # the random-weight fallback is written once, before trials race for it


def write_validation_subset(cfg: PipelineConfig, n: int) -> str:
    """The first n synthetic samples (by id) copied into a small dataset of the same layout."""
    from synreal_ray.datasets.layouts import list_dataset
    from synreal_ray.stage import Stage

    d = cfg.data
    out = cache_paths(cfg, "1", None)["val"]
    stage = Stage("val-subset", out, {"n": n, "layout": d.syn_layout, "split": d.syn_split}, inputs=[d.syn])
    if stage.begin():
        samples, _ = list_dataset(d.syn, d.syn_layout, d.syn_split)
        for s in samples[:n]:
            for uri in (s.image_uri, s.label_uri):
                storage.write_bytes(storage.safe_join(out, storage.relpath(uri, d.syn)), storage.read_bytes(uri))
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


def trial_metric(cfg: PipelineConfig, tcfg: PipelineConfig, metric: str, checkpoint: str, step: int) -> float:
    """The trial's metric after `step` training steps (checkpoint: the training run's out)."""
    from synreal_ray.datasets.layouts import image_root
    from synreal_ray.pipeline import downstream_config, fid_kid_between, real_val_split, run_consistency
    from synreal_ray.translate import TranslateConfig, run_translate

    d = cfg.data
    whole = metric == "downstream_miou"  # a training set: the whole synthetic set
    out = storage.join(tcfg.out, f"{'translated' if whole else 'val-translated'}-{step}")
    run_translate(TranslateConfig(checkpoint=checkpoint, dataset=d.syn if whole else cache_paths(cfg, "1", None)["val"],
                                  layout=d.syn_layout, split=d.syn_split, out=out, batch_size=cfg.translate.batch_size,
                                  scale=cfg.translate.scale, in_process_max=cfg.translate.in_process_max))
    if metric in ("fid", "kid"):
        weights, _ = inception_weights(cfg)
        ref = image_root(d.real, d.real_layout, real_val_split(cfg) or d.real_split)
        return fid_kid_between(cfg, image_root(out, d.syn_layout, d.syn_split), ref, weights)[metric]
    if metric == "consistency_miou":
        record = run_consistency(cfg, cache_paths(cfg, "1", None)["judge"], out,
                                 storage.join(tcfg.out, f"consistency-{step}"))
    else:
        from synreal_ray.segment import run_segment

        seg = storage.join(tcfg.out, f"segment-{step}")
        run_segment(downstream_config(cfg, out, seg))
        record = storage.read_json(storage.join(seg, "val", "eval.json"))
    if record["miou"] is None:
        raise ValueError(f"{metric}: no class could be scored (no labelled pixels)")
    return record["miou"]


def run_trial(params: dict[str, Any], cfg: PipelineConfig, tune_cfg: TuneSection) -> None:
    import ray.tune

    from synreal_ray.pairing import PairsConfig, run_pairs
    from synreal_ray.pipeline import train_config
    from synreal_ray.train import run_train

    trial_dir = storage.join(cfg.out, "trials", ray.tune.get_context().get_trial_id())
    tcfg = trial_config(cfg, params, trial_dir)
    cp = cache_paths(cfg, params["levels"], params["sigma"])
    pairs = storage.join(trial_dir, "pairs")
    run_pairs(PairsConfig(syn=cp["syn"], real=cp["real"], weights=cp["kliep"], out=pairs, k=params["k"],
                          max_distance=cfg.pairs.max_distance, index=cfg.pairs.index, query=cfg.pairs.query,
                          max_uses=cfg.pairs.max_uses, in_process_max=cfg.pairs.in_process_max))
    run = tcfg.runs[0]
    for step in tune_cfg.milestones:
        # Each milestone continues the same training run from its last checkpoint.
        train = dataclasses.replace(train_config(tcfg, run), pairs=pairs,
                                    weights=cp["kliep"] if run.weighting != "none" else None,
                                    steps=step, resume=True, checkpoint_every=step)
        run_train(train)
        value = trial_metric(cfg, tcfg, tune_cfg.metric, train.out, step)
        ray.tune.report({tune_cfg.metric: value, "step": step})


# --- the sweep ---

class SweepFailedError(RuntimeError):
    """No trial produced its metric; results.md names each trial's error and traceback file."""


def num_trials(space: SearchSpace) -> int:
    return math.prod(len(getattr(space, k)) for k in PARAMS)


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s" if m else f"{sec} s"


def _eta_callback(total: int, concurrent: int):
    """A Tune callback (on the driver) that logs, from the first finished trial on, how long the
    sweep will take: trials finished so far against the wall time they took."""
    import ray.tune

    class EtaCallback(ray.tune.Callback):
        def __init__(self):
            self.start, self.done = None, 0

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.start is None:
                self.start = time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finished(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finished(trial)

        def _finished(self, trial):
            self.done += 1
            elapsed = time.time() - (self.start or time.time())
            left = max(total - self.done, 0)
            if self.done == 1:
                whole = elapsed * math.ceil(total / concurrent) if concurrent > 1 else elapsed * total
                log.info("first trial finished in %s: the sweep's %s should take about %s in all "
                         "(less where ASHA stops trials early)", _duration(elapsed), _trials(total), _duration(whole))
            elif left:
                log.info("%d of %d trials finished after %s; about %s left", self.done, total,
                         _duration(elapsed), _duration(elapsed / self.done * left))

    return EtaCallback()


SWEEP_JSON = "_synreal_sweep.json"  # the settings of the sweep that the tune/ folder belongs to


def same_sweep(cfg: PipelineConfig, tune_cfg: TuneSection, can_restore: bool, force: bool = False) -> bool:
    """Whether to restore the interrupted sweep under `cfg.out`: only one with the same settings.
    Another sweep's remains are refused unless `force`, which clears them (trials and Tune's
    folder; the shared cache stays: its stages check their own fingerprints)."""
    from synreal_ray.stage import OutputError, check_output, fingerprint

    check_output(cfg.out, [cfg.data.syn, cfg.data.real], "out")
    settings = {"pipeline": to_dict(cfg), "tune": to_dict(tune_cfg)}
    marker = storage.join(cfg.out, "tune", SWEEP_JSON)
    fp = fingerprint(settings)
    old = storage.read_json(marker) if storage.exists(marker) else None
    if can_restore and not force:
        if old is None or old.get("fingerprint") != fp:
            changed = sorted(f"{part}.{k}" for part in settings for k in settings[part]
                             if old is None or (old.get("settings") or {}).get(part, {}).get(k) != settings[part][k])
            raise OutputError(f"{cfg.out}: holds an interrupted sweep with other settings "
                              f"({', '.join(changed[:5]) or 'unknown'} differ); use another out, or --force to "
                              "delete its trials and start over")
        return True
    if can_restore or old is not None:  # forced: another sweep's trials go
        for folder in ("tune", "trials", "errors"):
            storage.delete_dir(storage.join(cfg.out, folder))
    storage.write_json(marker, {"fingerprint": fp, "settings": settings})
    return False


def run_sweep(cfg: PipelineConfig, tune_cfg: TuneSection, force: bool = False) -> list[dict[str, Any]]:
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from synreal_ray.cluster import init_ray

    storage_path = storage.join(cfg.out, "tune")  # absolute: cfg.out went through the config layer
    exp = storage.join(storage_path, "sweep")
    total = num_trials(tune_cfg.space)
    grid = " x ".join(f"{len(getattr(tune_cfg.space, k))} {k}" for k in PARAMS)
    restoring = same_sweep(cfg, tune_cfg, ray.tune.Tuner.can_restore(exp), force)
    if restoring:
        log.info("resuming the interrupted sweep in %s (%s in all: %s)", exp, _trials(total), grid)
    else:
        stop = (f"; ASHA stops weak trials after {tune_cfg.grace_period} milestone(s)"
                if tune_cfg.scheduler == "asha" and len(tune_cfg.milestones) > tune_cfg.grace_period else "")
        log.info("sweep of %s (%s), %d at a time, %s after %s steps%s; results in %s", _trials(total), grid,
                 tune_cfg.max_concurrent_trials, LABELS[tune_cfg.metric], ", ".join(map(str, tune_cfg.milestones)), stop, cfg.out)
    init_ray()
    log.info("computing what the trials share (features, KLIEP, the validation subset%s)",
             ", the judge" if tune_cfg.metric == "consistency_miou" else "")
    prepare_shared(cfg, tune_cfg)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, cfg=cfg, tune_cfg=tune_cfg), {"cpu": tune_cfg.trial_cpus})
    callbacks = [_eta_callback(total, tune_cfg.max_concurrent_trials)]
    if restoring:
        tuner = ray.tune.Tuner.restore(exp, trainable=trainable, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(tune_cfg.milestones),
                                   grace_period=tune_cfg.grace_period)
                     if tune_cfg.scheduler == "asha" else FIFOScheduler())
        tuner = ray.tune.Tuner(
            trainable,
            param_space=_space(tune_cfg.space),
            tune_config=ray.tune.TuneConfig(metric=tune_cfg.metric, mode=tune_cfg.mode, scheduler=scheduler,
                                            max_concurrent_trials=tune_cfg.max_concurrent_trials),
            run_config=ray.tune.RunConfig(name="sweep", storage_path=storage_path, verbose=1, callbacks=callbacks))
    results = tuner.fit()
    rows = result_rows(results, cfg.out, tune_cfg.metric)
    write_results(cfg, rows, results, tune_cfg.metric)
    return rows


def _space(space: SearchSpace) -> dict[str, Any]:
    import ray.tune

    return {k: ray.tune.grid_search(list(getattr(space, k))) for k in PARAMS}


def _root_cause(err: Any) -> Any:
    """The exception a trial raised, out of Ray's wrappers (RayTaskError.cause, __cause__)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None)
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err


def one_line_error(err: Any, limit: int = 300) -> str:
    """`Type: message` of a trial's error on one line (a text traceback: its last line)."""
    cause = _root_cause(err)
    if isinstance(cause, str):  # Tune's error.txt when the exception could not be unpickled
        lines = [line.strip() for line in cause.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else "unknown error"
    else:
        name = type(cause).__name__
        message = str(cause)
        if name.startswith("RayTaskError") or name == "TuneError":  # their str() is a whole traceback
            lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
            message = lines[-1] if lines else ""
        text = f"{name}: {message}" if message else name
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def full_traceback(err: Any) -> str:
    """A trial's error as text: for a Ray task error, the trial's own (remote) traceback."""
    if isinstance(err, str):
        text = err
    else:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        if str(err) not in text:
            text = f"{text}\n{err}"
    return _ANSI.sub("", text)


def result_rows(results, out: str, metric: str = "fid") -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid, best `metric` first (lowest FID/KID, highest
    mIoU), failed trials last. A failed
    trial's traceback is written to `errors/<trial id>.txt` under `out` and named in its row."""
    rows = []
    for r in results:
        config, metrics = r.config or {}, r.metrics or {}
        trial = metrics.get("trial_id")
        row = {**{k: config.get(k) for k in PARAMS}, metric: metrics.get(metric), "step": metrics.get("step"),
               "trial": trial, "error": None, "traceback": None}
        if r.error is not None:
            rel = f"errors/{trial or len(rows)}.txt"
            storage.write_bytes(storage.join(out, *rel.split("/")), full_traceback(r.error).encode())
            row.update(error=one_line_error(r.error), traceback=rel)
        rows.append(row)
    sign = 1 if METRICS[metric] == "min" else -1
    rows.sort(key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0))
    return rows


def _cell(value: Any) -> str:
    """A value as one Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _value(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric.endswith("miou") else f"{value:.4f}" if metric == "kid" else f"{value:.2f}"


def write_results(cfg: PipelineConfig, rows: list[dict[str, Any]], results=None, metric: str = "fid") -> None:
    """results.csv, results.md (best first) and best.yaml: the best trial's setting as a pipeline
    config, trained for the steps at which it scored (`synreal run --config best.yaml`)."""
    cols = (*PARAMS, metric, "step", "trial", "error", "traceback")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: "" if r[c] is None else r[c] for c in cols} for r in rows)
    md = [f"| rank | K | levels | sigma | model | weighting | {LABELS[metric]} | steps | trial |",
          "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        value = _value(metric, r[metric]) if r[metric] is not None else "–"
        if r["error"]:
            value += f" (failed: {r['error']}; traceback: {r['traceback']})"
        md.append("| " + " | ".join(_cell(v) for v in (i, r["k"], r["levels"], _sigma_key(r["sigma"]), r["model"],
                                                       r["weighting"], value, r["step"] or "–", r["trial"] or "–")) + " |")
    storage.write_bytes(storage.join(cfg.out, "results.csv"), buf.getvalue().encode())
    storage.write_bytes(storage.join(cfg.out, "results.md"), ("\n".join(md) + "\n").encode())
    log.info("results (%s):\n%s", storage.join(cfg.out, "results.md"), "\n".join(md))
    scored = [r for r in rows if r[metric] is not None]
    if not scored:
        raise SweepFailedError(f"every trial failed; see {storage.join(cfg.out, 'results.md')} and the tracebacks "
                           f"in {storage.join(cfg.out, 'errors')}")
    best = scored[0]
    if results is not None and len(scored) > 1:
        r = results.get_best_result(metric=metric, mode=METRICS[metric], scope="last")
        best = next((row for row in scored if row["trial"] == (r.metrics or {}).get("trial_id")), best)
    best_cfg = trial_config(cfg, best, storage.join(cfg.out, "best-run"))
    best_cfg = dataclasses.replace(best_cfg, train={**best_cfg.train, "steps": best["step"]})
    storage.write_bytes(storage.join(cfg.out, "best.yaml"),
                        yaml.safe_dump(_plain(to_dict(best_cfg)), sort_keys=False).encode())
    log.info("best: %s %s (K %s, levels %s, sigma %s, %s, weighting %s, %s steps); its config: %s "
             "(synreal run --config it)", LABELS[metric], _value(metric, best[metric]), best["k"], best["levels"], _sigma_key(best["sigma"]),
             best["model"], best["weighting"], best["step"], storage.join(cfg.out, "best.yaml"))
