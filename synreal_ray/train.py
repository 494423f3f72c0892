"""Stage `train`: UNIT or CycleGAN on Ray Train (DDP over N workers), fed by Ray Data.

    cfg = TrainConfig(pairs="out/pairs", out="out/train", steps=2000, workers=2)
    record = run_train(cfg)                # or: synreal train --config configs/train_demo.yaml
    gen, meta = load_generator(latest_checkpoint("out/train"), "cuda")

The flow:
  driver      lists both datasets (ids -> image URIs), reads the pairs table and weights, checks
              them by building the sampler, and starts a `TorchTrainer`.
  controller  at every start of the worker group (first start, restart after a worker died, a
              `--resume`d job) the datasets are rebuilt (the trainer's datasets are callables):
              the newest complete checkpoint gives the step S to start from and the sampler state
              at S (meta.json), and the sampler is expanded into the ids of steps S..steps-1
              (cheap: indices, no image). Rank r gets its own dataset: slots [r*b, (r+1)*b) of
              every global batch, so which worker trains on which pair is fixed, and a resumed
              run continues exactly the sequence the uninterrupted run would have drawn.
  Ray Data    `range(steps - S)` -> `map_batches` reads, decodes and resizes the images of a few
              steps per task (uint8), streamed in order into `get_dataset_shard(f"rank{r}")`.
              A small run (raytrain.IN_WORKER_MAX samples) skips the stream: each worker reads
              the same steps with the same loader itself, one load ahead (raytrain.load_here).
  workers     load checkpoint S (model, optimisers, schedulers, scaler, sampler) from storage,
              wrap the model with `prepare_model` (DDP), and for every batch: train_step,
              scheduler step, sampler step. Rank 0 reports checkpoints every `checkpoint_every`
              steps (and at the end), keeps `metrics.jsonl`, `loss_curves.png` and the grids.

Resume: Ray Train restarts the worker group after a worker dies (`max_failures`), and a job
started again with `resume: true` / `--resume` reuses the same `RunConfig(name, storage_path)`;
both land in the same code path above, losing at most `checkpoint_every` steps. The step S
comes from the checkpoints in storage rather than from `ray.train.get_checkpoint()` because the
controller, which builds the data stream, has no `get_checkpoint()`: the workers and the data
must agree on S. The two differ only if a worker died between writing a checkpoint and Ray
registering it; the newer complete checkpoint is then the right one. A checkpoint is complete
when `meta.json` exists and `state.pt` has the size it records (a partial upload never does).

Output under `out`:
  ray/train/checkpoint_XXXXXXXX/   state.pt + meta.json (the checkpoint contract, below)
  metrics.jsonl                    one JSON object per logged step: step, every loss, lr
  loss_curves.png                  generator and discriminator loss (the SP-Feat paper's Fig. 7)
  grids/step_XXXXXX.png            fixed synthetic images | translated | their paired real image
  stage.json, _SUCCESS             written last

Checkpoint contract (translate.py reads it; `load_generator` below is the same for notebooks):
  state.pt   torch.save({"model_name", "model_config" (build_model kwargs), "model" (state_dict),
             "optimizers", "schedulers", "sampler" (SmartBatchSampler.state_dict()), "step",
             "scaler" (GradScaler state or None), "checkpoint_version" (the model class's)})
  meta.json  {"step", "model_name", "model_config", "image_size": [H, W], "batch_size", "seed",
             "sampler" (the same sampler state), "state_bytes" (size of state.pt), "checkpoint_version"}
  A checkpoint without "checkpoint_version" is version 1; one of another version than the model
  class's (UNIT 2: LayerNorm in the decoder, issue 12) is refused with one line, never half-loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import posixpath
import re
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from synreal_ray import storage
from synreal_ray.checkpoints import (  # noqa: F401  (checkpoint_name: re-exported for callers of train)
    META,
    STATE,
    checkpoint_name,
    is_complete,
    list_checkpoints,
    read_meta,
    read_state,
    resume_point,
)
from synreal_ray.config import URI, ConfigError, convert, from_dict, to_dict
from synreal_ray.datasets.layouts import LAYOUTS, list_dataset
from synreal_ray.progress import StepPoster
from synreal_ray.raytrain import Streams, fit, report_checkpoint, worker_batches
from synreal_ray.sampler import SmartBatchSampler
from synreal_ray.stage import Stage, read_info

if typing.TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUN_NAME = "train"  # Ray Train run name under <out>/ray: fixed, so that a re-run finds its checkpoints
PAIRS_COLUMNS = ("syn_id", "real_id", "rank", "distance", "w_syn", "w_real", "syn_image_uri", "real_image_uri")
FLUSH_SECONDS = 10.0  # metrics.jsonl is rewritten whole (S3 has no append): at most this often
# torch (and the models) are imported where they are used: the Ray Data tasks that load images
# import this module, and a new worker process would spend seconds and ~300 MB on torch for nothing.


# ------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the train stage (the `train:` section of a config file)."""

    # data: dataset roots (local or s3://) in a layout of datasets/layouts.py
    syn: URI = "data/demo/syn"
    syn_layout: str = "synscapes"
    syn_split: str | None = None
    real: URI = "data/demo/real"
    real_layout: str = "cityscapes"
    real_split: str | None = None
    pairs: URI | None = None  # output of the pairs stage; None: random pairing (the baseline)
    weights: URI | None = None  # output of the kliep stage; overrides the pairs' w_syn, w_real
    out: URI = "out/train"
    # sampler (see sampler.py); pairing None: "spfeat" with pairs, else "random"
    pairing: Literal["spfeat", "random"] | None = None
    weighting: Literal["loss", "source", "sampling", "none"] = "loss"
    real_random_share: float = 0.1
    seed: int = 0
    # model and optimisation
    model: Literal["unit", "cyclegan"] = "unit"
    model_config: dict[str, Any] = field(default_factory=dict)  # build_model kwargs, e.g. base_channels
    image_size: str = "128x256"  # HxW: images are resized to cover it, then centre-cropped
    batch_size: int = 4  # global: each of the `workers` workers trains on batch_size / workers pairs
    steps: int = 2000
    lr: float | None = None  # None: the model's default (UNIT 1e-4, CycleGAN 2e-4)
    # UNIT's lr schedule (official `lr_policy: step`): lr * lr_gamma every lr_step_size steps.
    # CycleGAN ignores both: constant lr, then linear decay to 0 over the second half (its paper's).
    lr_step_size: int = 100_000
    lr_gamma: float = 0.5
    amp: bool = True  # mixed precision (fp16 autocast + GradScaler) where the worker has a GPU
    # scale and fault tolerance
    workers: int = 1
    use_gpu: bool | None = None  # None: GPUs when the cluster has one per worker
    max_failures: int = 2  # worker-group restarts from the latest checkpoint (-1: unlimited)
    # outputs
    checkpoint_every: int = 500
    keep_checkpoints: int | None = None  # None: keep all
    log_every: int = 10
    grid_every: int = 500
    grid_images: int = 4
    resume: bool = False  # continue from the newest checkpoint under `out` instead of starting over

    def __post_init__(self):
        for key in ("syn_layout", "real_layout"):
            if getattr(self, key) not in LAYOUTS:
                raise ConfigError(f"{getattr(self, key)!r} is not one of {', '.join(LAYOUTS)}", key)
        if self.pairing == "spfeat" and self.pairs is None:
            raise ConfigError("'spfeat' pairing needs the pairs stage's output (pairs: URI)", "pairing")
        positive = ("batch_size", "steps", "workers", "checkpoint_every", "log_every", "grid_every", "grid_images",
                    "lr_step_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key)
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"must be >= 1 or null (keep all), got {self.keep_checkpoints}", "keep_checkpoints")
        if self.max_failures < -1:
            raise ConfigError(f"must be >= -1 (-1: unlimited), got {self.max_failures}", "max_failures")
        if self.batch_size % self.workers:
            raise ConfigError(f"{self.batch_size} does not split evenly over {self.workers} workers", "batch_size")
        if not 0.0 <= self.real_random_share <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.real_random_share}", "real_random_share")
        if self.seed < 0:
            raise ConfigError(f"must be >= 0, got {self.seed}", "seed")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"must be > 0 or null (the model's default), got {self.lr}", "lr")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.lr_gamma}", "lr_gamma")
        from synreal_ray.models import image_size_rule

        try:
            checked = check_model_config(self.model, self.model_config)
        except ConfigError as e:
            raise ConfigError(e.message, f"model_config.{e.key}") from None
        object.__setattr__(self, "model_config", checked)
        # the model must accept the crops: checked here, not found out inside a Ray Train worker
        h, w = parse_size(self.image_size)
        step, minimum, why = image_size_rule(self.model, **checked)
        if h % step or w % step:
            raise ConfigError(f"{h}x{w}: both sides must be multiples of {step} (2**n_downsample)", "image_size")
        if min(h, w) < minimum:
            raise ConfigError(f"{h}x{w} is too small for {self.model}: each side must be at least {minimum} "
                              f"and a multiple of {step} ({why})", "image_size")
        object.__setattr__(self, "image_size", f"{h}x{w}")

    @property
    def size(self) -> tuple[int, int]:
        return parse_size(self.image_size)

    def full_model_config(self) -> dict[str, Any]:
        """build_model kwargs with the defaults filled in: what a checkpoint records."""
        from synreal_ray.models import default_config

        return {**default_config(self.model), **self.model_config}


def check_model_config(model: str, options: dict[str, Any]) -> dict[str, Any]:
    """build_model options of `model` checked before anything is built: known names, the
    constructor's annotated types, the model's own ranges (`check_options`). A ConfigError's key
    is the option's name; the caller prefixes where the options came from."""
    from synreal_ray.models import MODELS, OptionError, check_options, default_config

    hints = typing.get_type_hints(MODELS[model].__init__)
    allowed = default_config(model)
    checked = {}
    for key, value in options.items():
        if key not in allowed:
            raise ConfigError(f"unknown {model} option; allowed: {', '.join(sorted(allowed))}", key)
        checked[key] = convert(hints.get(key, Any), value, key)
    try:
        check_options(model, **checked)
    except OptionError as e:
        raise ConfigError(e.message, e.option) from None
    return checked


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ConfigError(f"{text!r} is not HxW, e.g. 256x512", "image_size")
    return int(m[1]), int(m[2])


# ------------------------------------------------------------------------------ images (pure)


def read_training_image(uri: str, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: the image scaled to cover `size` and centre-cropped (keeps the aspect)."""
    from synreal_ray.datasets.images import ImageError, decode_image

    h, w = size
    try:
        with decode_image(storage.read_bytes(uri), uri) as im:  # the pixel limit applies
            im = ImageOps.fit(im.convert("RGB"), (w, h), method=Image.Resampling.BICUBIC)
    except ImageError:  # unreadable or too large: its message names the file already
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"{uri}: cannot read image: {e}") from None
    return np.asarray(im, dtype=np.uint8)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]. Done on the device: uint8 is a
    quarter of the bytes to move."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 numpy."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------- inputs (pure)


def read_pairs(uri: str) -> pa.Table:
    """The pairs stage's table (`{uri}/pairs/part-*.parquet`), published with `_SUCCESS`."""
    storage.require_complete(uri, "pairs output")
    table = storage.read_table(storage.join(uri, "pairs"))
    missing = [c for c in PAIRS_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{uri}: pairs table lacks column(s) {missing}; it has {table.column_names}")
    return table.select(list(PAIRS_COLUMNS) + [c for c in ("w_use",) if c in table.column_names])  # w_use: query real


@dataclass
class TrainData:
    """Everything the sampler and the image loaders need: ids -> URIs of both datasets (all of
    them: random real slots draw from every real image), the pairs table and the weights."""

    syn_ids: list[str]
    syn_uris: list[str]
    real_ids: list[str]
    real_uris: list[str]
    pairs: pa.Table | None = None  # syn_id, real_id, rank, w_syn, w_real
    syn_weights: dict[str, float] | None = None
    real_weights: dict[str, float] | None = None

    def sampler(self, cfg: TrainConfig) -> SmartBatchSampler:
        pairing = cfg.pairing or ("spfeat" if self.pairs is not None else "random")
        return SmartBatchSampler(
            self.pairs, syn_ids=self.syn_ids, real_ids=self.real_ids, syn_weights=self.syn_weights,
            real_weights=self.real_weights, batch_size=cfg.batch_size, pairing=pairing, weighting=cfg.weighting,
            real_random_share=cfg.real_random_share, seed=cfg.seed)

    def index(self, domain: str) -> dict[str, int]:
        ids = self.syn_ids if domain == "syn" else self.real_ids
        return {i: n for n, i in enumerate(ids)}

    def grid_pairs(self, cfg: TrainConfig) -> list[tuple[str, str]]:
        """cfg.grid_images fixed (synthetic, real) URI pairs for the grids, drawn as training draws
        them: the first pairs of a fresh sampler (seeded: the same pairs in every run of these
        settings and after a resume), each synthetic image once. With query-real pairs that is a
        real image and one of its synthetic neighbours drawn by w_use; random pairing gives a
        random real image, as in training. At most one epoch is drawn (fewer pairs if it holds
        fewer distinct synthetic images)."""
        sampler, n = self.sampler(cfg), min(cfg.grid_images, len(self.syn_ids))
        drawn: dict[str, str] = {}
        for _ in range(max(1, sampler.steps_per_epoch)):
            batch = sampler.next_batch()
            for s, r in zip(batch.syn_ids, batch.real_ids):
                drawn.setdefault(s, r)
            if len(drawn) >= n:
                break
        syn, real = self.index("syn"), self.index("real")
        return [(self.syn_uris[syn[s]], self.real_uris[real[r]]) for s, r in list(drawn.items())[:n]]


def prepare_data(cfg: TrainConfig) -> TrainData:
    """List both datasets, read the pairs and weights, and check them by building the sampler."""
    syn, _ = list_dataset(cfg.syn, cfg.syn_layout, cfg.syn_split)
    real, _ = list_dataset(cfg.real, cfg.real_layout, cfg.real_split)
    data = TrainData([s.id for s in syn], [s.image_uri for s in syn], [s.id for s in real], [s.image_uri for s in real])
    if cfg.pairs is not None:
        pairs = read_pairs(cfg.pairs)
        data.pairs = pairs.select([c for c in ("syn_id", "real_id", "rank", "w_syn", "w_real", "w_use")
                                   if c in pairs.column_names])
    if cfg.weights is not None:
        from synreal_ray.weighting import load_weights

        w = load_weights(cfg.weights)
        data.syn_weights, data.real_weights = w["syn"], w["real"]
    data.sampler(cfg)  # raises ValueError naming the problem (ids not in the datasets, bad weights)
    return data


def step_rows(sampler: SmartBatchSampler, data: TrainData, steps: int, workers: int) -> list[dict[str, np.ndarray]]:
    """Expand the sampler from its current step to `steps` into one table per worker: step (n,),
    syn / real (n, b) indices into data.*_uris, w_syn / w_real (n, b); worker r takes slots
    [r*b, (r+1)*b) of every global batch."""
    start, n, bs = sampler.steps, steps - sampler.steps, sampler.batch_size
    syn_index, real_index = data.index("syn"), data.index("real")
    syn, real = np.empty((n, bs), np.int64), np.empty((n, bs), np.int64)
    w_syn, w_real = np.empty((n, bs), np.float32), np.empty((n, bs), np.float32)
    for i in range(n):
        b = sampler.next_batch()
        syn[i] = [syn_index[s] for s in b.syn_ids]
        real[i] = [real_index[r] for r in b.real_ids]
        w_syn[i], w_real[i] = b.w_syn, b.w_real
    per = bs // workers
    part = lambda a, r: np.ascontiguousarray(a[:, r * per:(r + 1) * per])  # noqa: E731
    return [{"step": np.arange(start, steps, dtype=np.int64), "syn": part(syn, r), "real": part(real, r),
             "w_syn": part(w_syn, r), "w_real": part(w_real, r)} for r in range(workers)]


def load_steps(batch: dict[str, np.ndarray], *, rows: dict[str, np.ndarray], syn_uris: list[str],
               real_uris: list[str], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray Data UDF: a batch of local step numbers ("id" of ray.data.range) -> the images and
    weights of those steps for one worker, one row per image pair, in step order."""
    local = np.asarray(batch["id"], dtype=np.int64)
    per = rows["syn"].shape[1]
    return {
        "step": np.repeat(rows["step"][local], per),
        "syn": np.stack([read_training_image(syn_uris[i], size) for i in rows["syn"][local].ravel()]),
        "real": np.stack([read_training_image(real_uris[i], size) for i in rows["real"][local].ravel()]),
        "w_syn": rows["w_syn"][local].ravel(),
        "w_real": rows["w_real"][local].ravel(),
    }


# -------------------------------------------------------------------------------- checkpoints


def run_folder(out: str) -> str:
    """Where Ray Train keeps the run (and its checkpoints) for a training output folder."""
    return storage.join(out, "ray", RUN_NAME)


def latest_checkpoint(uri: str) -> str:
    """The newest complete checkpoint folder of a training run: `uri` is the run's `out` folder,
    its Ray run folder (out/ray/train) or a checkpoint folder itself. Local or s3://."""
    uri = str(uri).rstrip("/")
    if storage.exists(storage.join(uri, META)):
        if not is_complete(uri):
            raise FileNotFoundError(f"{uri}: incomplete checkpoint ({STATE} missing or partly written)")
        return uri
    for run in (run_folder(uri), uri):
        found = list_checkpoints(run)
        if found:
            return found[-1][1]
    raise FileNotFoundError(f"{uri}: no complete checkpoint (looked for {run_folder(uri)}/checkpoint_*/{STATE})")


def load_generator(uri: str, device: Any = "cpu") -> tuple[torch.nn.Module, dict]:
    """The synthetic -> real generator of a checkpoint (or of the newest checkpoint of a run's
    `out` folder), in eval mode on `device`, and the checkpoint's meta.json. Input: (B, 3, H, W)
    float in [-1, 1] at meta["image_size"] (other sizes work if divisible by 2**n_downsample)."""
    from synreal_ray.models import build_model, check_checkpoint_version

    checkpoint = latest_checkpoint(uri)
    meta = read_meta(checkpoint)
    check_checkpoint_version(meta["model_name"], meta.get("checkpoint_version"), checkpoint)
    state = read_state(checkpoint)
    model = build_model(meta["model_name"], **meta["model_config"])
    model.load_state_dict(state["model"])
    return model.generator_s2r().to(device).eval(), meta


def save_checkpoint(folder: str, *, cfg: TrainConfig, step: int, model, opts, scheds, sampler, scaler) -> None:
    """Write state.pt, then meta.json recording its size, into a local folder."""
    import torch

    state = {
        "model_name": cfg.model, "model_config": cfg.full_model_config(), "model": model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in opts.items()},
        "schedulers": {k: s.state_dict() for k, s in scheds.items()},
        "sampler": sampler.state_dict(), "step": step, "scaler": scaler.state_dict() if scaler else None,
        "checkpoint_version": model.checkpoint_version,
    }
    path = os.path.join(folder, STATE)
    torch.save(state, path)
    meta = {"step": step, "model_name": cfg.model, "model_config": cfg.full_model_config(),
            "image_size": list(cfg.size), "batch_size": cfg.batch_size, "seed": cfg.seed,
            "sampler": state["sampler"], "state_bytes": os.path.getsize(path),
            "checkpoint_version": model.checkpoint_version}
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def check_resumable(cfg: TrainConfig, checkpoint: str, data: TrainData) -> dict:
    """meta.json of the checkpoint to resume from, after checking it fits this config (model,
    image size, sampler inputs): a clear error here instead of one inside every restarted worker."""
    from synreal_ray.models import check_checkpoint_version

    meta = read_meta(checkpoint)
    check_checkpoint_version(meta["model_name"], meta.get("checkpoint_version"), f"{checkpoint}: cannot resume")
    want = {"model_name": cfg.model, "model_config": cfg.full_model_config(), "image_size": list(cfg.size)}
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(f"{checkpoint}: cannot resume: it has {key} {meta.get(key)!r}, this config {value!r} "
                             f"(start over without resume, or use another out)")
    if meta["step"] > cfg.steps:
        raise ValueError(f"{checkpoint}: cannot resume: it is at step {meta['step']}, past steps={cfg.steps}")
    try:
        data.sampler(cfg).load_state_dict(meta["sampler"])
    except ValueError as e:
        raise ValueError(f"{checkpoint}: cannot resume: {e}") from None
    return meta


# ------------------------------------------------------------------------------------ metrics


class MetricsLog:
    """metrics.jsonl: records in memory, the file rewritten whole (S3 has no append). A resumed
    run keeps the records up to its checkpoint's step and drops the later ones (those steps are
    trained and logged again), so no step appears twice."""

    def __init__(self, uri: str, keep_until: int):
        self.uri = uri
        self.records: list[dict] = []
        if keep_until > 0 and storage.exists(uri):
            lines = storage.read_bytes(uri).decode().splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= keep_until]
        self._flushed = 0.0
        self.flush(force=True)

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.flush()

    def flush(self, force: bool = False) -> None:
        if force or time.monotonic() - self._flushed > FLUSH_SECONDS:
            storage.write_bytes(self.uri, "".join(json.dumps(r) + "\n" for r in self.records).encode())
            self._flushed = time.monotonic()


def report_at_checkpoint(rank: int, metrics: dict, step: int, log: MetricsLog | None, curves_uri: str,
                         plot: Callable[[list[dict]], bytes], write: Callable[[str], None]) -> None:
    """A checkpoint step in a training loop (train's and segment's): rank 0 writes the metrics up
    to this step (`log`) and their plot (`plot` of the records, PNG bytes, to `curves_uri`) before
    the checkpoint exists, then reports it with `write` (raytrain.report_checkpoint); the other
    ranks, whose `log` is None, report the metrics alone."""
    if rank != 0:
        report_checkpoint(metrics, step)
        return
    log.flush(force=True)
    storage.write_bytes(curves_uri, plot(log.records))
    report_checkpoint(metrics, step, write)


def read_metrics(out: str) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    lines = storage.read_bytes(storage.join(out, "metrics.jsonl")).decode().splitlines()
    return [json.loads(line) for line in lines if line]


# ------------------------------------------------------------------------------- worker loop


def _step_seed(seed: int, step: int, rank: int) -> int:
    # The model's noise depends on (seed, step, rank) only: a resumed run draws what the
    # uninterrupted one would have drawn.
    return ((seed * 1_000_003 + step) * 4096 + rank) % (2**63)


def _mean_over_workers(losses: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return losses
    t = torch.tensor(list(losses.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(losses, (t / dist.get_world_size()).tolist()))


def _train_worker(config: dict) -> None:
    """The training function of every Ray Train worker (see the module doc)."""
    import ray.train
    import ray.train.torch
    import torch

    from synreal_ray import viz
    from synreal_ray.cluster import use_assigned_cpus
    from synreal_ray.models import build_model

    use_assigned_cpus()
    cfg: TrainConfig = from_dict(TrainConfig, config["cfg"])
    data: TrainData = config["data"]
    hook: Callable | None = config.get("step_hook")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run = run_folder(cfg.out)

    start, checkpoint = resume_point(run)
    ray_ckpt = ray.train.get_checkpoint()
    if rank == 0 and ray_ckpt is not None and posixpath.basename(ray_ckpt.path.rstrip("/")) != checkpoint_name(start):
        log.warning("train: Ray's latest registered checkpoint is %s; starting from the newest complete one in "
                    "storage instead: %s", ray_ckpt.path, checkpoint or "none, step 0")

    sampler = data.sampler(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker and every run
    model = build_model(cfg.model, **cfg.model_config).to(device)
    opts = model.make_optimizers(lr=cfg.lr)
    scheds = model.make_schedulers(opts, cfg.steps, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if checkpoint is not None:
        state = read_state(checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        for k, o in opts.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in scheds.items():
            s.load_state_dict(state["schedulers"][k])
        sampler.load_state_dict(state["sampler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        del state
    model.wrap(ray.train.torch.prepare_model)

    post = StepPoster(config.get("progress") if rank == 0 else None, cfg.steps)
    metrics_log = MetricsLog(storage.join(cfg.out, "metrics.jsonl"), keep_until=start) if rank == 0 else None
    if rank == 0:
        grid_pairs = data.grid_pairs(cfg)
        grid_syn = np.stack([read_training_image(s, cfg.size) for s, _ in grid_pairs])
        grid_real = np.stack([read_training_image(r, cfg.size) for _, r in grid_pairs])

    step, t_first = start, None
    for batch in worker_batches(config, rank, cfg.batch_size // world):
        if not bool((batch["step"] == step).all()):
            raise RuntimeError(f"data stream out of order: expected step {step}, got {batch['step'].tolist()}")
        torch.manual_seed(_step_seed(cfg.seed, step, rank))
        losses = model.train_step(to_model_input(batch["syn"]), to_model_input(batch["real"]),
                                  batch["w_syn"], batch["w_real"], opts, scaler=scaler, amp=use_amp)
        for s in scheds.values():
            s.step()
        sampler.next_batch()  # ids only: kept in step with the stream for the checkpoint's state
        step += 1
        if t_first is None:
            t_first = time.perf_counter()  # throughput leaves out the first (warm-up) step
        post(step, losses)

        last = step == cfg.steps
        if rank == 0 and (step % cfg.grid_every == 0 or last):
            fake = to_uint8(model.translate(to_model_input(torch.from_numpy(grid_syn).to(device))))
            storage.write_bytes(storage.join(cfg.out, "grids", f"step_{step:06d}.png"),
                                viz.image_grid([grid_syn, fake, grid_real]))
        save = step % cfg.checkpoint_every == 0 or last
        if save or step % cfg.log_every == 0:  # every worker averages at the same steps
            metrics = {"step": step, **_mean_over_workers(losses, device), "lr": scheds["gen"].get_last_lr()[0]}
            if last and step - start > 1:
                metrics["images_per_s"] = (step - start - 1) * cfg.batch_size / (time.perf_counter() - t_first)
            if rank == 0:
                metrics_log.add(metrics)
        if save:
            report_at_checkpoint(
                rank, metrics, step, metrics_log,
                storage.join(cfg.out, "loss_curves.png"), lambda records: viz.loss_curves({cfg.model: records}),
                functools.partial(save_checkpoint, cfg=cfg, step=step, model=model, opts=opts, scheds=scheds,
                                  sampler=sampler, scaler=scaler))
        if hook is not None:
            hook(step=step, rank=rank, model=model)
    if step != cfg.steps:
        raise RuntimeError(f"data stream ended at step {step}, expected {cfg.steps}")


# ------------------------------------------------------------------------------------ driver


class _Streams(Streams):
    """Each rank's steps (raytrain.Streams), drawn by the sampler restored from the newest complete
    checkpoint."""

    def __init__(self, cfg: TrainConfig, data: TrainData):
        self.cfg, self.data = cfg, data
        self._rows: tuple[int, list] | None = None

    def plan(self, rank: int):
        start, checkpoint = resume_point(run_folder(self.cfg.out))
        if self._rows is None or self._rows[0] != start:  # once per start, not once per rank
            sampler = self.data.sampler(self.cfg)
            if checkpoint is not None:
                sampler.load_state_dict(read_meta(checkpoint)["sampler"])
            self._rows = (start, step_rows(sampler, self.data, self.cfg.steps, self.cfg.workers))
        return self.cfg.steps - start, functools.partial(
            load_steps, rows=self._rows[1][rank], syn_uris=self.data.syn_uris, real_uris=self.data.real_uris,
            size=self.cfg.size)


# Settings that may change between a run and its continuation: more steps extend the same run.
CONTINUABLE = ("steps", "checkpoint_every", "keep_checkpoints", "max_failures", "log_every", "grid_every")


def _absolute(uri: str | None) -> str | None:
    return uri if uri is None or storage.is_s3(uri) else os.path.abspath(uri)


def run_train(cfg: TrainConfig, force: bool = False, step_hook: Callable | None = None) -> dict:
    """Train, checkpoint, and publish the stage; returns the stage record (stage.json), with
    "skipped": True when an identical published run exists. Raises ValueError /
    FileNotFoundError for bad inputs, ray.train's TrainingFailedError when training failed
    more than max_failures times (the output then stays unpublished; resume it).

    step_hook(step=, rank=, model=) runs on every worker after every step (tests use it to kill a
    worker); it must be picklable."""
    # Ray Train workers run in a folder of their own: relative local paths would land there.
    cfg = dataclasses.replace(cfg, **{k: _absolute(getattr(cfg, k)) for k in ("syn", "real", "pairs", "weights", "out")})
    data = prepare_data(cfg)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "resume")}
    inputs = [cfg.syn, cfg.real] + [u for u in (cfg.pairs, cfg.weights) if u]
    run_settings = {k: v for k, v in settings.items() if k not in CONTINUABLE}
    # Checkpoints are expensive: another run's are only deleted with force (see stage.Stage).
    stage = Stage("train", cfg.out, settings, inputs, run_settings=run_settings, precious=True)
    if not stage.begin(force, resume=cfg.resume):
        return {**read_info(cfg.out), "skipped": True}
    run = run_folder(cfg.out)
    start, checkpoint = resume_point(run)
    if checkpoint is not None:
        check_resumable(cfg, checkpoint, data)

    images_per_s = None
    if start < cfg.steps:
        images_per_s = fit(RUN_NAME, _train_worker, {"cfg": to_dict(cfg), "data": data, "step_hook": step_hook}, cfg,
                           _Streams(cfg, data), start, keys=("gen_total", "dis_total"))

    final = latest_checkpoint(run)
    records = read_metrics(cfg.out)
    outputs = {"checkpoint": final, "metrics": storage.join(cfg.out, "metrics.jsonl"),
               "loss_curves": storage.join(cfg.out, "loss_curves.png"), "grids": storage.join(cfg.out, "grids")}
    return stage.publish(steps=cfg.steps, resumed_from=start, images_per_s=images_per_s,
                         final=records[-1] if records else None, outputs=outputs)
