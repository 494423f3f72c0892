"""The whole job: features -> KLIEP -> pairs -> train -> translate -> segmenters -> FID/KID -> report.

Every stage is skipped when its output for the same inputs and settings is already published, so
re-running after a failure resumes at the failed stage. All paths may be local or s3://.

Layout under `out`:
  config.yaml                     the validated config this run used
  features/{syn,real,real_val}    kliep/    pairs/
  runs/<name>/train/              checkpoints, metrics.jsonl, loss curves, grids
  runs/<name>/translated/         the synthetic dataset translated, in its own layout
  segment/real/                   the judge: a segmenter trained on real train (val/: on real val, the ceiling)
  segment/synthetic/              downstream: a segmenter trained on the raw synthetic set (val/: on real val)
  consistency/synthetic/          seg-eval of the judge on the raw synthetic set (reference row)
  runs/<name>/consistency/        seg-eval of the judge on the run's translations, against the synthetic labels
  runs/<name>/segment/            downstream: a segmenter trained on the run's translations (val/: on real val)
  runs/<name>/consistency.png     translated image | synthetic labels | the judge's prediction on it
  fid-cache/                      Inception activations, computed once per image set
  report.md, report.json, before_after.png

Protocols (which split each number uses): FID and KID against the real `real_val_split` (falls
back to `real_split`, said in the table caption, when there is none), translated vs synthetic on
disjoint halves of the synthetic ids; consistency mIoU on every synthetic image with its synthetic
labels; downstream mIoU on the real val split (same fallback).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from PIL import Image

from synreal_ray import storage
from synreal_ray.ablation import runs_table
from synreal_ray.cluster import IN_PROCESS_MAX
from synreal_ray.config import URI, ConfigError, from_dict, parse_yaml, set_dotted, to_dict
from synreal_ray.datasets.images import decode_image
from synreal_ray.pairing import IN_PROCESS_QUERIES
from synreal_ray.progress import scope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    syn: URI = "data/demo/syn"
    syn_layout: Literal["cityscapes", "synscapes", "gta5", "folder"] = "synscapes"
    syn_split: str | None = None
    real: URI = "data/demo/real"
    real_layout: Literal["cityscapes", "synscapes", "gta5", "folder"] = "cityscapes"
    real_split: str | None = "train"
    real_val_split: str | None = "val"  # a second real split: the real-vs-real FID floor (null: skip)


@dataclass(frozen=True)
class FeaturesSection:
    levels: str = "1,2,4"
    on_error: Literal["raise", "skip"] = "raise"
    max_pixels: int | None = None  # None: datasets.images.MAX_PIXELS


@dataclass(frozen=True)
class KliepSection:
    sigma: float | None = None
    centers: int = 100
    folds: int = 5
    clip: float | None = None
    cv_samples: int = 2000


@dataclass(frozen=True)
class PairsSection:
    k: int = 5
    query: Literal["real", "syn"] = "real"
    max_uses: int | None = None
    max_distance: float | None = None
    index: Literal["flat", "ivf"] = "flat"
    in_process_max: int = IN_PROCESS_QUERIES  # query rows searched in the driver, no actor pool (0: always a pool)


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model and how its batches are paired and weighted."""

    name: str
    model: Literal["unit", "cyclegan"] = "unit"
    pairing: Literal["spfeat", "random"] = "spfeat"
    weighting: Literal["loss", "source", "sampling", "none"] = "loss"

    def __post_init__(self):
        # the name is a folder under out/runs/: one plain path part
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run name {self.name!r} must be non-empty, not '.' or '..', and contain no '/' or '\\'",
                              "name")


def _default_runs() -> tuple[RunSpec, ...]:
    return (RunSpec("unit-baseline", "unit", "random", "none"), RunSpec("unit-method", "unit", "spfeat", "loss"),
            RunSpec("cyclegan-baseline", "cyclegan", "random", "none"),
            RunSpec("cyclegan-method", "cyclegan", "spfeat", "loss"))


@dataclass(frozen=True)
class TranslateSection:
    batch_size: int = 8
    scale: Literal["train", "full"] = "train"
    in_process_max: int = IN_PROCESS_MAX  # images translated in the driver, no actor pool (0: always a pool)


@dataclass(frozen=True)
class FidSection:
    inception_weights: URI | None = None  # None: $SYNREAL_INCEPTION_WEIGHTS, else the random-weight fallback
    allow_random_inception: bool = True  # label the table when it had to fall back
    dims: Literal[64, 192, 768, 2048] = 2048
    size: str | None = None
    max_images: int | None = None


@dataclass(frozen=True)
class EvaluateSection:
    """What the pipeline measures beside FID/KID (both need the `segment:` segmenters)."""

    consistency: bool = True  # the judge (trained on real train) on each translation, against the synthetic labels
    downstream: bool = True  # a segmenter trained on each translation (and on raw synthetic), scored on real val
    ablation: bool = False  # also print the runs side by side and the KLIEP importance cohorts (see ablation.py)


# Keys of SegmentConfig the pipeline fills in itself (its data, out, val); `segment:` holds the rest.
SEGMENT_FILLED = ("train", "out", "val", "val_layout", "val_split")


@dataclass(frozen=True)
class PipelineConfig:
    out: URI = "out/demo"
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    kliep: KliepSection = field(default_factory=KliepSection)
    pairs: PairsSection = field(default_factory=PairsSection)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys, checked at load time
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model: build_model kwargs
    runs: tuple[RunSpec, ...] = field(default_factory=_default_runs)
    translate: TranslateSection = field(default_factory=TranslateSection)
    fid: FidSection = field(default_factory=FidSection)
    segment: dict[str, Any] = field(default_factory=dict)  # SegmentConfig keys, checked at load time
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    grid_images: int = 4

    def __post_init__(self):
        if not self.runs:
            raise ConfigError("at least one run is needed", "runs")
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"run names must be unique, got {names}", "runs")
        for name in self.models:
            if name not in ("unit", "cyclegan"):
                raise ConfigError(f"unknown model {name!r}; models are unit and cyclegan", "models")
        if self.grid_images < 1:
            raise ConfigError(f"must be >= 1, got {self.grid_images}", "grid_images")
        # Validation at the door: every stage's config is built here from its section, so the
        # stage's own checks (its __post_init__, written once there) run before any stage does.
        features_config(self, "syn")
        features_config(self, "real")
        kliep_config(self)
        pairs_config(self)
        from synreal_ray.train import check_model_config

        for name, options in self.models.items():  # also the options of a model no run uses
            try:
                check_model_config(name, options)
            except ConfigError as e:
                raise ConfigError(e.message, f"models.{name}.{e.key}") from None
        for run in self.runs:  # the train section per run (with its model: image size, options)
            translate_config(self, run, train_config(self, run).out)
        fid_config(self, self.data.syn, self.data.real, self.fid.inception_weights)
        for key in SEGMENT_FILLED:
            if key in self.segment:
                raise ConfigError("set by the pipeline (the data section and out); leave it out", f"segment.{key}")
        segment_config(self, "judge", [(self.data.real, self.data.real_layout, self.data.real_split)],
                       storage.join(self.out, "segment", "real"), self.data.real_split)


def read_config_doc(uri: str) -> dict:
    """A config file (local or s3://) as a mapping; bad YAML is a ConfigError naming the file."""
    doc = parse_yaml(storage.read_bytes(uri), uri)  # a syntax error: one line, with line and column
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"{uri}: expected a mapping of config keys, got {type(doc).__name__}")
    return dict(doc or {})


def load_pipeline_config(uri: str | None, overrides: dict[str, Any] | None = None,
                         assignments: dict[str, Any] | None = None) -> PipelineConfig:
    """The config file `uri` (None: all defaults) with `assignments` (`--set KEY=VALUE`) and then
    `overrides` (flags such as --out) applied; local paths come back absolute (config.URI)."""
    return pipeline_config_from_doc(read_config_doc(uri) if uri else {}, overrides, uri, assignments)


def pipeline_config_from_doc(doc: dict, overrides: dict[str, Any] | None = None, uri: str | None = None,
                             assignments: dict[str, Any] | None = None) -> PipelineConfig:
    """Validate a config mapping. `assignments` are dotted keys set as given (`--set`, where
    null means null); `overrides` are dotted keys of CLI flags, None = flag not given. Errors
    name the config key, prefixed with the file."""
    doc = copy.deepcopy(doc)
    try:
        for key, value in (assignments or {}).items():
            set_dotted(doc, key, value)
        for key, value in (overrides or {}).items():
            if value is not None:
                set_dotted(doc, key, value)
        return from_dict(PipelineConfig, doc)
    except ConfigError as e:
        raise ConfigError(f"{uri}: {e}" if uri else str(e)) from None


# --- stage settings derived from the pipeline config ---

def find_config(name: str) -> str:
    """A config shipped in configs/: looked up in the working directory, then beside the package
    (an editable install or a checkout)."""
    from pathlib import Path

    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / "configs" / name).exists():
            return str(base / "configs" / name)
    raise FileNotFoundError(f"configs/{name} not found in {Path.cwd()} or beside the package; pass --config")


def paths(cfg: PipelineConfig) -> dict[str, str]:
    j = lambda *p: storage.join(cfg.out, *p)  # noqa: E731
    return {"syn_features": j("features", "syn"), "real_features": j("features", "real"),
            "val_features": j("features", "real_val"), "kliep": j("kliep"), "pairs": j("pairs"),
            "fid_cache": j("fid-cache")}


def train_config(cfg: PipelineConfig, run: RunSpec):
    from synreal_ray.train import TrainConfig

    p = paths(cfg)
    spfeat = run.pairing == "spfeat"
    # resume: a re-run after a failure continues from the run's checkpoints instead of restarting
    model_config = {**cfg.train.get("model_config", {}), **cfg.models.get(run.model, {})}
    doc = {"resume": True, **cfg.train, "model": run.model, "model_config": model_config, "pairing": run.pairing, "weighting": run.weighting,
           "syn": cfg.data.syn, "syn_layout": cfg.data.syn_layout, "syn_split": cfg.data.syn_split,
           "real": cfg.data.real, "real_layout": cfg.data.real_layout, "real_split": cfg.data.real_split,
           "pairs": p["pairs"] if spfeat else None,
           "weights": p["kliep"] if run.weighting != "none" else None,
           "out": storage.join(cfg.out, "runs", run.name, "train")}
    return from_dict(TrainConfig, doc, f"train (run {run.name})")


def _stage_config(cls: type, values: dict[str, Any], section: str, renames: dict[str, str], checked: bool = True):
    """`cls(**values)`: the stage's own checks run. An error names the key the user wrote:
    `section.key`, or `renames[key]` for a value the pipeline took from elsewhere (paths under
    `out`, the `data` section). `checked=False`: `values` come from a free-form section (a
    dict of the stage's keys) and go through `from_dict` (unknown keys, types) first."""
    try:
        return cls(**values) if checked else from_dict(cls, values)
    except ConfigError as e:
        head, dot, rest = (e.key or "").partition(".")
        key = (renames.get(head) or f"{section}.{head}") + dot + rest if head else section
        raise ConfigError(e.message, key) from None
    except ValueError as e:
        raise ConfigError(str(e), section) from None


def _data_renames(domain: str) -> dict[str, str]:
    return {"dataset": f"data.{domain}", "layout": f"data.{domain}_layout", "split": f"data.{domain}_split"}


def features_config(cfg: PipelineConfig, domain: str, **section: Any):
    """The features stage of `domain` ("syn" or "real"); `section` replaces keys of the
    `features:` section (a sweep's levels)."""
    from synreal_ray.features import FeaturesConfig

    d = cfg.data
    values = {"dataset": getattr(d, domain), "layout": getattr(d, f"{domain}_layout"),
              "split": getattr(d, f"{domain}_split"), "out": paths(cfg)[f"{domain}_features"], "domain": domain,
              **dataclasses.asdict(cfg.features), **section}
    return _stage_config(FeaturesConfig, values, "features", {**_data_renames(domain), "out": "out"})


def kliep_config(cfg: PipelineConfig, **section: Any):
    """The kliep stage; `section` replaces keys of the `kliep:` section (a sweep's sigma)."""
    from synreal_ray.weighting import KliepConfig

    p = paths(cfg)
    values = {"syn": p["syn_features"], "real": p["real_features"], "out": p["kliep"],
              **dataclasses.asdict(cfg.kliep), **section}
    return _stage_config(KliepConfig, values, "kliep", {"syn": "out", "real": "out", "out": "out"})


def pairs_config(cfg: PipelineConfig, **section: Any):
    """The pairs stage; `section` replaces keys of the `pairs:` section (a sweep's k)."""
    from synreal_ray.pairing import PairsConfig

    p = paths(cfg)
    values = {"syn": p["syn_features"], "real": p["real_features"], "weights": p["kliep"], "out": p["pairs"],
              **dataclasses.asdict(cfg.pairs), **section}
    return _stage_config(PairsConfig, values, "pairs", {"syn": "out", "real": "out", "weights": "out", "out": "out"})


def translate_config(cfg: PipelineConfig, run: RunSpec, checkpoint: str):
    from synreal_ray.translate import TranslateConfig

    d = cfg.data
    values = {"checkpoint": checkpoint, "dataset": d.syn, "layout": d.syn_layout, "split": d.syn_split,
              "out": translated_uri(cfg, run), **dataclasses.asdict(cfg.translate)}
    return _stage_config(TranslateConfig, values, "translate", {**_data_renames("syn"), "checkpoint": "out", "out": "out"})


def fid_config(cfg: PipelineConfig, a: str, b: str, weights: str | None):
    from synreal_ray.fid import FidConfig

    f = cfg.fid
    values = {"a": a, "b": b, "weights": weights, "dims": f.dims, "size": f.size, "max_images": f.max_images,
              "cache": paths(cfg)["fid_cache"]}
    return _stage_config(FidConfig, values, "fid", {"a": "data", "b": "data", "weights": "fid.inception_weights",
                                                    "cache": "out"})


def real_val_split(cfg: PipelineConfig) -> str | None:
    """The real split the report scores against (FID/KID reference, downstream mIoU): the
    `real_val_split` when the real dataset has it (Cityscapes layout), else None (then the
    `real_split` is used and the report says so)."""
    from synreal_ray.datasets.layouts import image_root

    d = cfg.data
    if not d.real_val_split or d.real_layout != "cityscapes":
        return None
    root = image_root(d.real, d.real_layout, d.real_val_split)
    return d.real_val_split if storage.exists(root) and storage.list_files(root) else None


def segment_config(cfg: PipelineConfig, name: str, train: list[tuple[str, str, str | None]], out: str,
                   val_split: str | None):
    """A segment stage of the pipeline: the `segment:` section's settings (SegmentConfig's own
    defaults for the rest), trained on `train` [(uri, layout, split)], scored at the end on the
    real dataset's `val_split`; errors name the `segment.` key."""
    from synreal_ray.segment import SegmentConfig

    d = cfg.data
    values = {"resume": True, **cfg.segment, "train": [{"uri": u, "layout": lay, "split": sp} for u, lay, sp in train],
              "out": out, "val": d.real, "val_layout": d.real_layout, "val_split": val_split}
    renames = {"train": f"data ({name})", "train[0]": f"data ({name})", "out": "out", "val": "data.real",
               "val_layout": "data.real_layout", "val_split": "data.real_val_split"}
    return _stage_config(SegmentConfig, values, "segment", renames, checked=False)


def segment_paths(cfg: PipelineConfig) -> dict[str, str]:
    """Output folders of the segmentation stages that do not belong to one run."""
    j = lambda *p: storage.join(cfg.out, *p)  # noqa: E731
    return {"judge": j("segment", "real"), "syn_segment": j("segment", "synthetic"),
            "syn_consistency": j("consistency", "synthetic")}


def run_paths(cfg: PipelineConfig, run: RunSpec) -> dict[str, str]:
    j = lambda *p: storage.join(cfg.out, "runs", run.name, *p)  # noqa: E731
    return {"segment": j("segment"), "consistency": j("consistency"), "picture": j("consistency.png")}


def judge_config(cfg: PipelineConfig, out: str | None = None):
    """The judge: a segmenter trained on real train, scored on real val (the ceiling row)."""
    d = cfg.data
    return segment_config(cfg, "judge", [(d.real, d.real_layout, d.real_split)], out or segment_paths(cfg)["judge"],
                          real_val_split(cfg) or d.real_split)


def downstream_config(cfg: PipelineConfig, dataset: str, out: str):
    """A segmenter trained on `dataset` (the raw synthetic set or a translation of it, in the
    synthetic layout), scored on real val."""
    d = cfg.data
    return segment_config(cfg, "downstream", [(dataset, d.syn_layout, d.syn_split)], out,
                          real_val_split(cfg) or d.real_split)


def consistency_config(cfg: PipelineConfig, judge: str, dataset: str, out: str):
    """seg-eval of the judge (a segment output) on `dataset` (the raw synthetic set or a
    translation of it, whose labels are the synthetic ones), saving its predictions."""
    from synreal_ray.segment import SegEvalConfig

    d = cfg.data
    seg = segment_config(cfg, "judge", [(d.real, d.real_layout, d.real_split)], judge, d.real_split)
    return SegEvalConfig(model=judge, dataset=dataset, layout=d.syn_layout, split=d.syn_split, out=out,
                         save_predictions=True, batch_size=seg.eval_batch_size, in_process_max=seg.eval_in_process_max)


def run_consistency(cfg: PipelineConfig, judge: str, dataset: str, out: str, force: bool = False) -> dict:
    """Semantic consistency of a (translated) synthetic dataset: the judge's scores on it against
    the synthetic labels (translate copies them beside the images). eval.json's record."""
    from synreal_ray.segment import run_seg_eval

    return run_seg_eval(consistency_config(cfg, judge, dataset, out), force)


def run_segmentation(cfg: PipelineConfig, force: bool = False) -> None:
    """The judge, the consistency evaluations and the downstream segmenters that `evaluate:`
    asks for; each a stage of its own (skipped when published)."""
    from synreal_ray.segment import run_segment

    ev, sp = cfg.evaluate, segment_paths(cfg)
    if not (ev.consistency or ev.downstream):
        return
    with scope("judge (real train)"):
        run_segment(judge_config(cfg), force)
    if ev.consistency:
        with scope("consistency raw synthetic"):
            run_consistency(cfg, sp["judge"], cfg.data.syn, sp["syn_consistency"], force)
        for run in cfg.runs:
            with scope(f"consistency {run.name}"):
                run_consistency(cfg, sp["judge"], translated_uri(cfg, run), run_paths(cfg, run)["consistency"], force)
    if ev.downstream:
        with scope("downstream raw synthetic"):
            run_segment(downstream_config(cfg, cfg.data.syn, sp["syn_segment"]), force)
        for run in cfg.runs:
            with scope(f"downstream {run.name}"):
                run_segment(downstream_config(cfg, translated_uri(cfg, run), run_paths(cfg, run)["segment"]), force)


def run_pipeline(cfg: PipelineConfig, force: bool = False) -> dict:
    """Run every stage (each skipped when already done) and write the report."""
    from synreal_ray.cluster import init_ray
    from synreal_ray.features import run_features
    from synreal_ray.pairing import run_pairs
    from synreal_ray.stage import check_output
    from synreal_ray.train import run_train
    from synreal_ray.translate import run_translate
    from synreal_ray.weighting import kliep_summary, run_kliep

    # The pipeline's folder holds every stage's output: it may not be, hold or lie inside the data.
    check_output(cfg.out, [cfg.data.syn, cfg.data.real], "out")
    init_ray()
    storage.write_bytes(storage.join(cfg.out, "config.yaml"), yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False).encode())
    # Each stage draws its own bar (or logs its own lines), named after the scope it runs in.
    for domain in ("syn", "real"):
        with scope(domain):
            run_features(features_config(cfg, domain), force)
    needs_weights = any(r.weighting != "none" for r in cfg.runs)
    needs_pairs = any(r.pairing == "spfeat" for r in cfg.runs)
    if needs_weights or needs_pairs:
        kc = kliep_config(cfg)
        log.info(kliep_summary(run_kliep(kc, force), kc.out))
    if needs_pairs:
        run_pairs(pairs_config(cfg), force)
    for run in cfg.runs:
        with scope(run.name):
            tc = train_config(cfg, run)
            run_train(tc, force=force)
            run_translate(translate_config(cfg, run, tc.out), force)
    run_segmentation(cfg, force)
    return write_report(cfg)


def translated_uri(cfg: PipelineConfig, run: RunSpec) -> str:
    return storage.join(cfg.out, "runs", run.name, "translated")


def _plain(obj):
    """Tuples -> lists, so the saved YAML is plain and loads back through the config layer."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --- the report: consistency, downstream, FID and KID tables, pictures ---

def inception_weights(cfg: PipelineConfig) -> tuple[str, bool]:
    """(weights file, is_random). Falls back to a seeded random-weight Inception only when allowed,
    and says so: its FIDs rank sets against each other but are not comparable to published FIDs."""
    from synreal_ray.fid import find_weights, make_random_inception_weights

    try:
        return find_weights(cfg.fid.inception_weights), False
    except FileNotFoundError:
        if cfg.fid.inception_weights or not cfg.fid.allow_random_inception:
            raise
    path = storage.join(paths(cfg)["fid_cache"], "random-inception-seed0.pth")
    if not storage.exists(path):
        make_random_inception_weights(path, seed=0)
    log.warning("no Inception weights file given (fid.inception_weights / SYNREAL_INCEPTION_WEIGHTS): "
                "scoring with a SEEDED RANDOM-WEIGHT Inception; the table is labelled as such")
    return path, True


def fid_kid_between(cfg: PipelineConfig, a: str, b: str, weights: str) -> dict:
    """run_fid's record (fid, kid, kid_std) between image folders a and b."""
    from synreal_ray.fid import run_fid

    return run_fid(fid_config(cfg, a, b, weights))


def set_acts(cfg: PipelineConfig, roots: list[str], weights: str) -> dict[str, tuple[list[str], Any]]:
    """{root: (relative image names, their Inception activations)} of every image set the report
    compares, computed by one actor pool (Inception loaded once per actor) or read from the cache."""
    from synreal_ray.fid import set_activations

    fc = fid_config(cfg, roots[0], roots[-1], weights)
    sets = set_activations(roots, fc, weights, storage.read_bytes(weights))
    return {s["root"]: (s["rels"], s["acts"]) for s in sets}


def distance(acts_a, acts_b) -> dict[str, float]:
    """FID and KID (mean, std over subsets) between two activation matrices."""
    from synreal_ray.fid import fid_of, kid

    k, k_std = kid(acts_a, acts_b)
    return {"fid": fid_of(acts_a, acts_b), "kid": float(k), "kid_std": float(k_std)}


def halves(rels: list[str]) -> tuple[list[int], list[int]]:
    """Disjoint halves of a sorted listing: (even positions, odd positions)."""
    return list(range(0, len(rels), 2)), list(range(1, len(rels), 2))


def distance_rows(cfg: PipelineConfig, weights: str) -> tuple[list[dict], str, dict]:
    """FID/KID rows and the caption saying which sets they compare: every set against the real
    val split (the real train split, with a note, where there is none); the real train vs val
    floor; each run's translations vs the synthetic originals on disjoint halves. Third: the
    activations, {"ref": reference acts, "runs": {run name: (image names, acts)}}."""
    import numpy as np

    from synreal_ray.datasets.layouts import image_root

    d = cfg.data
    val = real_val_split(cfg)
    ref_split = val or d.real_split or "train"
    syn_img = image_root(d.syn, d.syn_layout, d.syn_split)
    real_img = image_root(d.real, d.real_layout, d.real_split)
    ref_img = image_root(d.real, d.real_layout, val) if val else real_img
    out_imgs = {run.name: image_root(translated_uri(cfg, run), d.syn_layout, d.syn_split) for run in cfg.runs}
    acts = set_acts(cfg, list(dict.fromkeys([syn_img, real_img, ref_img, *out_imgs.values()])), weights)
    rows = [{"comparison": f"synthetic vs real {ref_split} (no adaptation)", "kind": "raw synthetic",
             **distance(acts[syn_img][1], acts[ref_img][1])}]
    if val:
        rows.append({"comparison": f"real {d.real_split} vs real {val} (floor)", "kind": "ceiling",
                     **distance(acts[real_img][1], acts[ref_img][1])})
    syn_rels, syn_acts = acts[syn_img]
    even, odd = halves(syn_rels)
    for run in cfg.runs:
        rels, out_acts = acts[out_imgs[run.name]]
        rows.append({"comparison": f"{run.name}: translated vs real {ref_split}", "run": run.name, "kind": "run",
                     **distance(out_acts, acts[ref_img][1])})
        row_of = {r: i for i, r in enumerate(rels)}
        mine = [row_of[syn_rels[i]] for i in even if syn_rels[i] in row_of]
        rows.append({"comparison": f"{run.name}: translated vs synthetic (disjoint halves)", "run": run.name,
                     "kind": "run vs synthetic", **distance(out_acts[np.asarray(mine, int)], syn_acts[odd])})
    caption = (f"every set against the real {ref_split} split ({len(acts[ref_img][0])} images, never seen in training)"
               if val else f"every set against the real {ref_split} split: there is no real val split "
               f"(data.real_val_split), so the reference is the set the GANs trained on and there is no floor row")
    caption += (f"; translated vs synthetic compares the translations of the even-numbered synthetic images "
                f"(by sorted path, {len(even)}) with the odd-numbered synthetic originals ({len(odd)}), "
                "so no image meets its own translation")
    return rows, caption, {"ref": acts[ref_img][1], "runs": {name: acts[root] for name, root in out_imgs.items()}}


def cohort_rows(cfg: PipelineConfig, run_acts: dict) -> dict | None:
    """ablation.cohort_table for every run, or None without KLIEP weights."""
    from synreal_ray.ablation import cohort_table
    from synreal_ray.datasets.layouts import image_root, list_dataset
    from synreal_ray.weighting import load_weights

    kliep = paths(cfg)["kliep"]
    if not storage.is_complete(kliep):
        return None
    d, runs = cfg.data, []
    for run in cfg.runs:
        uri = translated_uri(cfg, run)
        samples, _ = list_dataset(uri, d.syn_layout, d.syn_split)
        root = image_root(uri, d.syn_layout, d.syn_split)
        evaluation = run_paths(cfg, run)["consistency"]
        rels, acts = run_acts["runs"][run.name]
        runs.append({"name": run.name, "samples": samples, "rels": rels, "acts": acts,
                     "rel_of": {s.id: storage.relpath(s.image_uri, root) for s in samples},
                     "predictions": storage.join(evaluation, "predictions") if storage.is_complete(evaluation) else None})
    return cohort_table(runs, load_weights(kliep)["syn"], run_acts["ref"], distance)


def _eval(uri: str, stage: str | None = None) -> dict | None:
    """eval.json under `uri` when the stage that wrote it (`stage`, default `uri` itself: a
    seg-eval output; a segment output for its val/) is published, else None."""
    return storage.read_json(storage.join(uri, "eval.json")) if storage.is_complete(stage or uri) else None


def _val_eval(segment_out: str) -> dict | None:
    """The real-val scores of a published segment output."""
    return _eval(storage.join(segment_out, "val"), segment_out)


def _seg_row(name: str, kind: str, record: dict | None, run: str | None = None) -> dict:
    row = {"comparison": name, "kind": kind, "miou": None, "pixel_accuracy": None, "num_images": None}
    if run:
        row["run"] = run
    if record is not None:
        row.update({k: record.get(k) for k in ("miou", "pixel_accuracy", "num_images")})
        row["iou"], row["top_confusions"] = record.get("iou"), record.get("top_confusions", [])
    return row


def segmentation_tables(cfg: PipelineConfig) -> dict[str, dict]:
    """The consistency and downstream tables, from the published evaluations (a missing one is
    a row without numbers)."""
    d, sp = cfg.data, segment_paths(cfg)
    val = real_val_split(cfg)
    ref_split = val or d.real_split or "train"
    note = "" if val else f" (no real val split: scored on real {ref_split}, the judge's own training set)"
    ceiling = _val_eval(sp["judge"])
    judge = f"the judge (a segmenter trained on real {d.real_split})"
    tables = {}
    if cfg.evaluate.consistency:
        rows = [_seg_row("raw synthetic (no translation)", "raw synthetic", _eval(sp["syn_consistency"]))]
        rows += [_seg_row(f"{r.name}: translated", "run", _eval(run_paths(cfg, r)["consistency"]), r.name) for r in cfg.runs]
        rows.append(_seg_row(f"ceiling: the judge on real {ref_split}{note}", "ceiling", ceiling))
        tables["consistency_miou"] = {
            "title": "Semantic consistency (mIoU, %; higher: the translation kept what the image shows)",
            "caption": f"{judge} on every synthetic image and its translations, against the synthetic labels; "
                       f"ceiling: the judge on real {ref_split} with its true labels", "rows": rows}
    if cfg.evaluate.downstream:
        rows = [_seg_row("trained on raw synthetic", "raw synthetic", _val_eval(sp["syn_segment"]))]
        rows += [_seg_row(f"{r.name}: trained on its translations", "run",
                          _val_eval(run_paths(cfg, r)["segment"]), r.name) for r in cfg.runs]
        rows.append(_seg_row(f"ceiling: trained on real {d.real_split}", "ceiling", ceiling))
        tables["downstream_miou"] = {
            "title": "Downstream segmentation (mIoU, %, on real val; higher is better)",
            "caption": f"a segmenter trained on each set (the same `segment:` settings), scored on real {ref_split}{note}",
            "rows": rows}
    return tables


def _stage_seconds(name: str, uri: str) -> dict | None:
    """A time-table row from a published stage's stage.json: its wall seconds (when it ran), and
    for training the share spent in the steps (steps run x batch size / the steady images/s; the
    rest is start-up, the first step, checkpoints and the final scoring)."""
    if not storage.is_complete(uri):
        return None
    rec = storage.read_json(storage.join(uri, "stage.json"))
    steps = None
    if rec.get("images_per_s") and "steps" in rec:  # train, segment
        done = rec["steps"] - (rec.get("resumed_from") or 0)
        steps = round(done * rec["settings"]["batch_size"] / rec["images_per_s"], 1)
    return {"stage": name, "seconds": round(rec.get("seconds", 0.0), 1), "work": steps}


def time_rows(cfg: PipelineConfig, report_seconds: float) -> list[dict]:
    """Where the pipeline's time went: one row per published stage output (seconds as recorded
    when it ran: a stage skipped in this invocation keeps its earlier time), then this report
    (FID/KID activations and the tables, measured now)."""
    p, sp = paths(cfg), segment_paths(cfg)
    named = [("features syn", p["syn_features"]), ("features real", p["real_features"]), ("kliep", p["kliep"]),
             ("pairs", p["pairs"])]
    for run in cfg.runs:
        named += [(f"train {run.name}", train_config(cfg, run).out), (f"translate {run.name}", translated_uri(cfg, run))]
    named += [("segment judge (real train)", sp["judge"]), ("segment raw synthetic", sp["syn_segment"]),
              ("seg-eval consistency raw synthetic", sp["syn_consistency"])]
    for run in cfg.runs:
        rp = run_paths(cfg, run)
        named += [(f"seg-eval consistency {run.name}", rp["consistency"]), (f"segment downstream {run.name}", rp["segment"])]
    rows = [r for r in (_stage_seconds(n, u) for n, u in named) if r is not None]
    return rows + [{"stage": "report: FID/KID activations, tables, pictures", "seconds": round(report_seconds, 1), "work": None}]


def time_markdown(rows: list[dict]) -> list[str]:
    lines = ["### Time (wall seconds per stage)", "",
             "*as recorded when each stage ran; training: the steps' share (steps × batch / steady images/s), the "
             "rest being start-up, the first step, checkpoints and the final scoring*", "",
             "| stage | seconds | of which training steps |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {'–' if r['work'] is None else format(r['work'], '.1f')} |")
    return lines + [f"| **total** | **{sum(r['seconds'] for r in rows):.1f}** | |", ""]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _kid(row: dict) -> str:
    return "–" if row.get("kid") is None else f"{1000 * row['kid']:.2f} ± {1000 * row['kid_std']:.2f}"


def table_markdown(table: dict, columns: list[tuple[str, Any]], caption: bool = True) -> list[str]:
    """A table as Markdown lines: its title, its caption in italics (unless `caption` is False),
    a header and one line per row."""
    lines = [f"### {table['title']}", "", *([f"*{table['caption']}*", ""] if caption else []),
             "| " + " | ".join(["set", *[c for c, _ in columns]]) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([r["comparison"], *[f(r) for _, f in columns]]) + " |" for r in table["rows"]]
    return lines + [""]


def per_class_markdown(table: dict) -> list[str]:
    """Per-class IoU (%) of the consistency rows: one line per class, one column per set."""
    from synreal_ray.datasets.labels import TRAIN_NAMES

    rows = [r for r in table["rows"] if r.get("iou")]
    if not rows:
        return []
    lines = ["### Consistency per class (IoU, %)", "", "| class | " + " | ".join(r["comparison"] for r in rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(_pct(r["iou"].get(c)) for r in rows) + " |" for c in TRAIN_NAMES]
    return lines + [""]


def consistency_picture(cfg: PipelineConfig, dataset: str, evaluation: str, tile: tuple[int, int] = (96, 192)) -> bytes:
    """Rows: the first `grid_images` samples of `dataset` (a translation in the synthetic
    layout); columns: the image | its synthetic labels | the judge's prediction on it (both
    colourised), from the seg-eval output's saved predictions."""
    import numpy as np

    from synreal_ray import viz
    from synreal_ray.datasets.labels import colorize, to_train_ids
    from synreal_ray.datasets.layouts import list_dataset

    d = cfg.data
    samples, _ = list_dataset(dataset, d.syn_layout, d.syn_split)
    th, tw = tile
    cols: list[list] = [[], [], []]

    def labels(uri: str):
        ids = np.asarray(decode_image(storage.read_bytes(uri), uri))
        return Image.fromarray(colorize(to_train_ids(ids))).resize((tw, th), Image.NEAREST)

    for s in samples[: cfg.grid_images]:
        image = decode_image(storage.read_bytes(s.image_uri), s.image_uri).convert("RGB")
        cols[0].append(np.asarray(image.resize((tw, th), Image.BILINEAR)))
        cols[1].append(np.asarray(labels(s.label_uri)))
        cols[2].append(np.asarray(labels(storage.safe_join(storage.join(evaluation, "predictions"), s.id + ".png"))))
    return viz.image_grid([np.stack(c) for c in cols])


def write_report(cfg: PipelineConfig) -> dict:
    """report.md / report.json (one table per metric: consistency mIoU, downstream mIoU, FID, KID,
    each with its raw-synthetic and ceiling rows), the judge's largest confusions per run, the
    consistency pictures, before_after.png and report.html (report_html: all of it on one page).
    The returned record carries report.md's text ("markdown") and the four tables alone, without
    captions ("summary"), which the command line prints (the rest is in report.md / report.html)."""
    started = time.perf_counter()
    weights, random_inception = inception_weights(cfg)
    rows, caption, acts = distance_rows(cfg, weights)
    label = "seeded random-weight Inception (not comparable to published FIDs)" if random_inception else "Inception (pytorch-fid weights)"
    tables = segmentation_tables(cfg)
    tables["fid"] = {"title": f"FID ({label}, {cfg.fid.dims} dims; lower is closer)", "caption": caption, "rows": rows}
    tables["kid"] = {"title": f"KID ×1000 ({label}, {cfg.fid.dims} dims; mean ± std over subsets; lower is closer; "
                              "unbiased for small sets)", "caption": caption, "rows": rows}
    pictures, confusions = {}, {}
    if cfg.evaluate.consistency:
        syn_eval = _eval(segment_paths(cfg)["syn_consistency"])
        confusions["raw synthetic"] = (syn_eval or {}).get("top_confusions", [])
        for run in cfg.runs:
            rp = run_paths(cfg, run)
            confusions[run.name] = (_eval(rp["consistency"]) or {}).get("top_confusions", [])
            if storage.exists(storage.join(rp["consistency"], "predictions")):
                storage.write_bytes(rp["picture"], consistency_picture(cfg, translated_uri(cfg, run), rp["consistency"]))
                pictures[run.name] = rp["picture"]
    report = {"tables": tables, "rows": rows, "fid_caption": caption, "inception": label, "inception_weights": weights,
              "dims": cfg.fid.dims, "confusions": confusions, "pictures": pictures,
              "real_val_split": real_val_split(cfg), "runs": [dataclasses.asdict(r) for r in cfg.runs]}
    seg_cols = [("mIoU (%)", lambda r: _pct(r["miou"])), ("pixel accuracy (%)", lambda r: _pct(r["pixel_accuracy"])),
                ("images", lambda r: str(r["num_images"] or "–"))]
    columns = {"consistency_miou": seg_cols, "downstream_miou": seg_cols, "fid": [("FID", lambda r: _num(r["fid"]))],
               "kid": [("KID ×1000", _kid)]}
    md, summary = [], []
    for key in ("consistency_miou", "downstream_miou", "fid", "kid"):
        if key in tables:
            md += table_markdown(tables[key], columns[key])
            summary += table_markdown(tables[key], columns[key], caption=False)
    if len(cfg.runs) > 1:  # the ablation view: one row per run, every metric
        report["runs_table"] = runs_table(list(cfg.runs), tables)
        run_cols = [("model", lambda r: r["model"]), ("pairing", lambda r: r["pairing"]),
                    ("weighting", lambda r: r["weighting"]),
                    *[(n, lambda r, k=k: _pct(r[k])) for n, k in (("consistency mIoU", "consistency_miou"),
                                                                   ("downstream mIoU", "downstream_miou"))
                      if k in tables],
                    ("FID", lambda r: _num(r["fid"])), ("KID ×1000", lambda r: _kid(r))]
        md += table_markdown(report["runs_table"], run_cols)
        if cfg.evaluate.ablation:
            summary += table_markdown(report["runs_table"], run_cols, caption=False)
    cohort = cohort_rows(cfg, acts) if cfg.evaluate.ablation else None
    if cohort is not None:
        report["cohort_table"] = cohort
        cohort_cols = [("ω range", lambda r: f"{r['w_min']:.3g}–{r['w_max']:.3g}"),
                       ("images", lambda r: str(r["num_images"])), ("consistency mIoU (%)", lambda r: _pct(r["miou"])),
                       ("FID", lambda r: _num(r.get("fid"))), ("KID ×1000", lambda r: _kid(r))]
        md += table_markdown(cohort, cohort_cols)
        summary += table_markdown(cohort, cohort_cols, caption=False)
    if confusions:
        md += ["### The judge's largest confusions (ground truth → prediction)", ""]
        md += [f"- **{name}**: " + ("; ".join(c) if c else "none recorded") for name, c in confusions.items()] + [""]
        md += per_class_markdown(tables["consistency_miou"])
        md += ["Pictures (translated | synthetic labels | the judge's prediction): "
               + ", ".join(f"[{n}]({storage.relpath(p, cfg.out)})" for n, p in pictures.items()), ""]
    storage.write_bytes(storage.join(cfg.out, "before_after.png"), before_after_grid(cfg))
    report["time"] = time_rows(cfg, time.perf_counter() - started)
    md += time_markdown(report["time"])
    storage.write_json(storage.join(cfg.out, "report.json"), report)
    storage.write_bytes(storage.join(cfg.out, "report.md"), ("\n".join(md) + "\n").encode())
    from synreal_ray.report_html import write_html

    page = write_html(cfg.out)
    log.info("report: %s (tables), %s (everything, one page), grid: %s", storage.join(cfg.out, "report.md"), page,
             storage.join(cfg.out, "before_after.png"))
    return {**report, "markdown": "\n".join(md), "summary": "\n".join(summary), "html": page}


def before_after_grid(cfg: PipelineConfig, tile: tuple[int, int] = (96, 192)) -> bytes:
    """Rows: synthetic images; columns: the synthetic image, then each run's translation of it."""
    from PIL import ImageDraw

    from synreal_ray.datasets.layouts import list_dataset

    d = cfg.data
    samples, _ = list_dataset(d.syn, d.syn_layout, d.syn_split)
    chosen = samples[: cfg.grid_images]
    th, tw = tile
    header = 14
    canvas = Image.new("RGB", ((len(cfg.runs) + 1) * (tw + 4), header + len(chosen) * (th + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(["synthetic"] + [r.name for r in cfg.runs]):
        draw.text((col * (tw + 4) + 2, 1), title, fill="black")

    def tile_of(uri):
        return decode_image(storage.read_bytes(uri), uri).convert("RGB").resize((tw, th), Image.BILINEAR)

    for row, s in enumerate(chosen):
        y = header + row * (th + 4)
        canvas.paste(tile_of(s.image_uri), (0, y))
        rel = storage.relpath(s.image_uri, d.syn)
        for col, run in enumerate(cfg.runs, start=1):
            canvas.paste(tile_of(storage.join(translated_uri(cfg, run), *rel.split("/"))), (col * (tw + 4), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()

