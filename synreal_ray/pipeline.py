"""The whole job: features -> KLIEP -> pairs -> train -> translate -> FID -> report.

Every stage is skipped when its output for the same inputs and settings is already published, so
re-running after a failure resumes at the failed stage. All paths may be local or s3://.

Layout under `out`:
  config.yaml                     the validated config this run used
  features/{syn,real,real_val}    kliep/    pairs/
  runs/<name>/train/              checkpoints, metrics.jsonl, loss curves, grids
  runs/<name>/translated/         the synthetic dataset translated, in its own layout
  fid-cache/                      Inception activations, computed once per image set
  report.md, report.json, before_after.png
"""

from __future__ import annotations

import copy
import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from PIL import Image

from synreal_ray import storage
from synreal_ray.config import URI, ConfigError, from_dict, parse_yaml, set_dotted, to_dict
from synreal_ray.datasets.images import decode_image


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


@dataclass(frozen=True)
class FidSection:
    inception_weights: URI | None = None  # None: $SYNREAL_INCEPTION_WEIGHTS, else the random-weight fallback
    allow_random_inception: bool = True  # label the table when it had to fall back
    dims: Literal[64, 192, 768, 2048] = 2048
    size: str | None = None
    max_images: int | None = None


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


def _stage_config(cls: type, values: dict[str, Any], section: str, renames: dict[str, str]):
    """`cls(**values)`: the stage's own checks run. An error names the key the user wrote:
    `section.key`, or `renames[key]` for a value the pipeline took from elsewhere (paths under
    `out`, the `data` section)."""
    try:
        return cls(**values)
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


def run_pipeline(cfg: PipelineConfig, force: bool = False) -> dict:
    """Run every stage (each skipped when already done) and write the report."""
    from synreal_ray.cluster import init_ray
    from synreal_ray.features import run_features
    from synreal_ray.pairing import run_pairs
    from synreal_ray.stage import check_output
    from synreal_ray.train import run_train
    from synreal_ray.translate import run_translate
    from synreal_ray.weighting import run_kliep

    # The pipeline's folder holds every stage's output: it may not be, hold or lie inside the data.
    check_output(cfg.out, [cfg.data.syn, cfg.data.real], "out")
    init_ray()
    storage.write_bytes(storage.join(cfg.out, "config.yaml"), yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False).encode())
    _log("features")
    run_features(features_config(cfg, "syn"), force)
    run_features(features_config(cfg, "real"), force)
    needs_weights = any(r.weighting != "none" for r in cfg.runs)
    needs_pairs = any(r.pairing == "spfeat" for r in cfg.runs)
    if needs_weights or needs_pairs:
        _log("kliep")
        run_kliep(kliep_config(cfg), force)
    if needs_pairs:
        _log("pairs")
        run_pairs(pairs_config(cfg), force)
    for run in cfg.runs:
        _log(f"train {run.name}")
        tc = train_config(cfg, run)
        run_train(tc, force=force)
        _log(f"translate {run.name}")
        run_translate(translate_config(cfg, run, tc.out), force)
    _log("fid + report")
    return write_report(cfg)


def translated_uri(cfg: PipelineConfig, run: RunSpec) -> str:
    return storage.join(cfg.out, "runs", run.name, "translated")


def _log(msg: str) -> None:
    print(f"[synreal] {msg}", flush=True)


def _plain(obj):
    """Tuples -> lists, so the saved YAML is plain and loads back through the config layer."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --- FID table (the seed's Table 4) and the before/after grid ---

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
    print("[synreal] no Inception weights file given (fid.inception_weights / SYNREAL_INCEPTION_WEIGHTS): "
          "scoring with a SEEDED RANDOM-WEIGHT Inception; the table is labelled as such", flush=True)
    return path, True


def fid_between(cfg: PipelineConfig, a: str, b: str, weights: str) -> float:
    from synreal_ray.fid import run_fid

    return run_fid(fid_config(cfg, a, b, weights))["fid"]


def cache_activations(cfg: PipelineConfig, roots: list[str], weights: str) -> None:
    """The Inception activations of every image set the report compares, computed by one actor
    pool (Inception loaded once per actor, not once per comparison); fid_between reads them back
    from the cache."""
    from synreal_ray.fid import set_activations

    fc = fid_config(cfg, roots[0], roots[-1], weights)
    set_activations(roots, fc, weights, storage.read_bytes(weights))


def write_report(cfg: PipelineConfig) -> dict:
    from synreal_ray.datasets.layouts import image_root

    d = cfg.data
    weights, random_inception = inception_weights(cfg)
    syn_img = image_root(d.syn, d.syn_layout, d.syn_split)
    real_img = image_root(d.real, d.real_layout, d.real_split)
    val_img = None
    if d.real_val_split and d.real_layout == "cityscapes":
        val_img = image_root(d.real, d.real_layout, d.real_val_split)
        val_img = val_img if storage.list_files(val_img) else None
    out_imgs = {run.name: image_root(translated_uri(cfg, run), d.syn_layout, d.syn_split) for run in cfg.runs}
    cache_activations(cfg, [syn_img, real_img, *([val_img] if val_img else []), *out_imgs.values()], weights)
    rows = [{"comparison": "synthetic vs real (no adaptation)", "fid": fid_between(cfg, syn_img, real_img, weights)}]
    if val_img:
        rows.append({"comparison": f"real {d.real_split} vs real {d.real_val_split} (floor)",
                     "fid": fid_between(cfg, real_img, val_img, weights)})
    for run in cfg.runs:
        out_img = out_imgs[run.name]
        rows.append({"comparison": f"{run.name}: translated vs real", "run": run.name,
                     "fid": fid_between(cfg, out_img, real_img, weights)})
        rows.append({"comparison": f"{run.name}: translated vs synthetic", "run": run.name,
                     "fid": fid_between(cfg, out_img, syn_img, weights)})
    label = "seeded random-weight Inception (not comparable to published FIDs)" if random_inception else "Inception (pytorch-fid weights)"
    report = {"rows": rows, "inception": label, "inception_weights": weights, "dims": cfg.fid.dims,
              "runs": [dataclasses.asdict(r) for r in cfg.runs]}
    md = [f"FID ({label}, {cfg.fid.dims} dims; lower is closer)\n", "| comparison | FID |", "|---|---|"]
    md += [f"| {r['comparison']} | {r['fid']:.2f} |" for r in rows]
    storage.write_json(storage.join(cfg.out, "report.json"), report)
    storage.write_bytes(storage.join(cfg.out, "report.md"), ("\n".join(md) + "\n").encode())
    storage.write_bytes(storage.join(cfg.out, "before_after.png"), before_after_grid(cfg))
    print("\n".join(md), flush=True)
    print(f"\nreport: {storage.join(cfg.out, 'report.md')}  grid: {storage.join(cfg.out, 'before_after.png')}", flush=True)
    return report


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

