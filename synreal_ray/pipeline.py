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

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from PIL import Image

from synreal_ray import storage
from synreal_ray.config import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class DataConfig:
    syn: str = "data/demo/syn"
    syn_layout: Literal["cityscapes", "synscapes", "gta5", "folder"] = "synscapes"
    syn_split: str | None = None
    real: str = "data/demo/real"
    real_layout: Literal["cityscapes", "synscapes", "gta5", "folder"] = "cityscapes"
    real_split: str | None = "train"
    real_val_split: str | None = "val"  # a second real split: the real-vs-real FID floor (null: skip)


@dataclass(frozen=True)
class FeaturesSection:
    levels: str = "1,2,4"
    on_error: Literal["raise", "skip"] = "raise"


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
    max_distance: float | None = None
    index: Literal["flat", "ivf"] = "flat"


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model and how its batches are paired and weighted."""

    name: str
    model: Literal["unit", "cyclegan"] = "unit"
    pairing: Literal["spfeat", "random"] = "spfeat"
    weighting: Literal["loss", "sampling", "none"] = "loss"

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"run name {self.name!r} must be non-empty and contain no '/'", "name")


def _default_runs() -> tuple[RunSpec, ...]:
    return (RunSpec("unit-baseline", "unit", "random", "none"), RunSpec("unit-method", "unit", "spfeat", "loss"),
            RunSpec("cyclegan-baseline", "cyclegan", "random", "none"),
            RunSpec("cyclegan-method", "cyclegan", "spfeat", "loss"))


@dataclass(frozen=True)
class TranslateSection:
    batch_size: int = 8


@dataclass(frozen=True)
class FidSection:
    inception_weights: str | None = None  # None: $SYNREAL_INCEPTION_WEIGHTS, else the random-weight fallback
    allow_random_inception: bool = True  # label the table when it had to fall back
    dims: Literal[64, 192, 768, 2048] = 2048
    size: str | None = None
    max_images: int | None = None


@dataclass(frozen=True)
class PipelineConfig:
    out: str = "out/demo"
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
        for run in self.runs:  # the train section is validated at the door, per run
            train_config(self, run)


def load_pipeline_config(uri: str | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    doc = yaml.safe_load(storage.read_bytes(uri)) if uri else {}
    return pipeline_config_from_doc(dict(doc or {}), overrides, uri)


def pipeline_config_from_doc(doc: dict, overrides: dict[str, Any] | None = None, uri: str | None = None) -> PipelineConfig:
    """Validate a config mapping; `overrides` are dotted keys (CLI flags; None = not given)."""
    for key, value in (overrides or {}).items():
        if value is not None:
            node = doc
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    try:
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


def run_pipeline(cfg: PipelineConfig, force: bool = False) -> dict:
    """Run every stage (each skipped when already done) and write the report."""
    from synreal_ray.cluster import init_ray
    from synreal_ray.features import FeaturesConfig, run_features
    from synreal_ray.pairing import PairsConfig, run_pairs
    from synreal_ray.train import run_train
    from synreal_ray.translate import TranslateConfig, run_translate
    from synreal_ray.weighting import KliepConfig, run_kliep

    init_ray()
    storage.write_bytes(storage.join(cfg.out, "config.yaml"), yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False).encode())
    p, d = paths(cfg), cfg.data
    feats = dict(levels=cfg.features.levels, on_error=cfg.features.on_error)
    _log("features")
    run_features(FeaturesConfig(dataset=d.syn, layout=d.syn_layout, split=d.syn_split, out=p["syn_features"],
                                domain="syn", **feats), force)
    run_features(FeaturesConfig(dataset=d.real, layout=d.real_layout, split=d.real_split, out=p["real_features"],
                                domain="real", **feats), force)
    needs_weights = any(r.weighting != "none" for r in cfg.runs)
    needs_pairs = any(r.pairing == "spfeat" for r in cfg.runs)
    if needs_weights or needs_pairs:
        _log("kliep")
        run_kliep(KliepConfig(syn=p["syn_features"], real=p["real_features"], out=p["kliep"],
                              **dataclasses.asdict(cfg.kliep)), force)
    if needs_pairs:
        _log("pairs")
        run_pairs(PairsConfig(syn=p["syn_features"], real=p["real_features"], weights=p["kliep"], out=p["pairs"],
                              **dataclasses.asdict(cfg.pairs)), force)
    for run in cfg.runs:
        _log(f"train {run.name}")
        tc = train_config(cfg, run)
        run_train(tc, force=force)
        _log(f"translate {run.name}")
        run_translate(TranslateConfig(checkpoint=tc.out, dataset=d.syn, layout=d.syn_layout, split=d.syn_split,
                                      out=translated_uri(cfg, run), batch_size=cfg.translate.batch_size), force)
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
    from synreal_ray.fid import FidConfig, run_fid

    f = cfg.fid
    return run_fid(FidConfig(a=a, b=b, weights=weights, dims=f.dims, size=f.size, max_images=f.max_images,
                             cache=paths(cfg)["fid_cache"]))["fid"]


def write_report(cfg: PipelineConfig) -> dict:
    from synreal_ray.datasets.layouts import image_root

    d = cfg.data
    weights, random_inception = inception_weights(cfg)
    syn_img = image_root(d.syn, d.syn_layout, d.syn_split)
    real_img = image_root(d.real, d.real_layout, d.real_split)
    rows = [{"comparison": "synthetic vs real (no adaptation)", "fid": fid_between(cfg, syn_img, real_img, weights)}]
    if d.real_val_split and d.real_layout == "cityscapes":
        val_img = image_root(d.real, d.real_layout, d.real_val_split)
        if storage.list_files(val_img):
            rows.append({"comparison": f"real {d.real_split} vs real {d.real_val_split} (floor)",
                         "fid": fid_between(cfg, real_img, val_img, weights)})
    for run in cfg.runs:
        out_img = image_root(translated_uri(cfg, run), d.syn_layout, d.syn_split)
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
        return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB").resize((tw, th), Image.BILINEAR)

    for row, s in enumerate(chosen):
        y = header + row * (th + 4)
        canvas.paste(tile_of(s.image_uri), (0, y))
        rel = storage.relpath(s.image_uri, d.syn)
        for col, run in enumerate(cfg.runs, start=1):
            canvas.paste(tile_of(storage.join(translated_uri(cfg, run), *rel.split("/"))), (col * (tw + 4), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()

