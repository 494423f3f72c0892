"""The Ray Train shell shared by `synreal train` (GANs) and `synreal segment` (segmenters).

    images_per_s = fit("train", _train_worker, {"cfg": ..., "step_hook": ...}, cfg, streams, start)

`cfg` is the stage's config (workers, use_gpu, steps, batch_size, log_every, max_failures,
keep_checkpoints, out, model). One `TorchTrainer`: `cfg.workers` DDP workers, each holding the
CPUs the cluster can spare (torch's threads follow, cluster.use_assigned_cpus), GPUs when asked or
when the cluster has one per worker; checkpoints under `out/ray/<run name>` (a fixed name, so a
re-run finds them); Ray Train restarts the group from the newest checkpoint up to `max_failures`
times; rank 0's steps are drawn on the console (progress.TrainingProgress).

Data: `streams` (a `Streams`) plans each rank's steps from the newest complete checkpoint at every
start of the group, and each worker reads them in step order with `worker_batches`: from a Ray Data
stream of its own (`stream`: tasks load a few steps each, ahead of the worker), or, for runs of at
most IN_WORKER_MAX samples, loaded by the worker itself in a background thread. The batches are the
same either way (the same loader on the same plan); a small run just skips the stream's start-up.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from synreal_ray import storage
from synreal_ray.checkpoints import checkpoint_name

log = logging.getLogger(__name__)

STEPS_PER_TASK = 4  # steps of images one Ray Data task (or one background load) reads: small, so loads run ahead
LOAD_CPUS = 0.5  # per loading task; fractional so that small machines keep CPUs for the workers
# Runs of at most this many samples (steps x global batch size) are loaded inside each worker: a
# Ray Data stream's start-up (~8 s on 2 cores: its tasks' processes and imports) outweighs reading
# a few hundred small images there. 0: always a stream.
IN_WORKER_MAX = 1000


class Streams:
    """Each rank's steps from the newest complete checkpoint to the end. Subclasses give `plan`."""

    def plan(self, rank: int) -> tuple[int, Callable[[dict], dict]]:
        """(steps left, a loader: {"id": local step numbers} -> that rank's rows of those steps, in
        step order, one row per sample, with a "step" column)."""
        raise NotImplementedError

    def for_rank(self, rank: int):
        """The rank's Ray Data stream (Ray Train's controller calls this at every start of the group)."""
        return stream(*self.plan(rank))


def stream(n: int, load: Callable[[dict], dict]):
    """A Ray Data dataset of `n` steps loaded by `load`, STEPS_PER_TASK steps per task."""
    import ray.data

    ds = (ray.data.range(n, override_num_blocks=max(1, math.ceil(n / STEPS_PER_TASK)))
          .map_batches(load, batch_size=STEPS_PER_TASK, batch_format="numpy", num_cpus=LOAD_CPUS))
    # No progress bars in the workers' logs: metrics.jsonl and the training bar show progress.
    ds.context.enable_progress_bars = False
    ds.context.execution_options.preserve_order = True  # the worker checks that steps come in order
    return ds


def worker_batches(config: dict, rank: int, batch_size: int) -> Iterator[dict]:
    """Inside a worker: this rank's batches (dicts of tensors, one step each) in step order."""
    streams: Streams | None = config.get("streams")
    if streams is None:
        import ray.train

        return ray.train.get_dataset_shard(f"rank{rank}").iter_torch_batches(batch_size=batch_size, prefetch_batches=2)
    return load_here(*streams.plan(rank), batch_size)


def report_checkpoint(metrics: dict, step: int, write: Callable[[str], None] | None = None) -> None:
    """Inside a worker, at a checkpoint step: rank 0 passes `write`, which fills a folder with the
    checkpoint, uploaded with its report; the other ranks report the metrics alone. Reports to Ray
    Train (about a second each on a small machine) come with checkpoints only: the steps between
    go to metrics.jsonl alone."""
    import ray.train

    if write is None:
        ray.train.report(metrics, checkpoint_dir_name=checkpoint_name(step))
        return
    with tempfile.TemporaryDirectory() as d:
        write(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=checkpoint_name(step))


def load_here(n: int, load: Callable[[dict], dict], batch_size: int) -> Iterator[dict]:
    """`n` steps read by `load`, STEPS_PER_TASK at a time, one load ahead in a background thread
    (decoding releases the GIL, so it overlaps the training step)."""
    import torch

    chunks = [np.arange(k, min(k + STEPS_PER_TASK, n)) for k in range(0, n, STEPS_PER_TASK)]
    with ThreadPoolExecutor(1, thread_name_prefix="synreal-load") as pool:
        ahead = pool.submit(load, {"id": chunks[0]}) if chunks else None
        for i in range(len(chunks)):
            rows = ahead.result()
            if i + 1 < len(chunks):
                ahead = pool.submit(load, {"id": chunks[i + 1]})
            for k in range(0, len(rows["step"]), batch_size):
                yield {name: torch.from_numpy(np.ascontiguousarray(col[k:k + batch_size])) for name, col in rows.items()}


def ray_storage(out: str) -> dict:
    """RunConfig's storage arguments for a stage output: Ray Train keeps its run under `out/ray`."""
    fs, path = storage.resolve(storage.join(out, "ray"))
    return {"storage_path": path, "storage_filesystem": fs}


def fit(run_name: str, worker: Callable, loop_config: dict, cfg: Any, streams: Streams, start: int,
        keys: tuple[str, ...] | None = None) -> float | None:
    """Train from step `start` to cfg.steps (see the module doc); `loop_config` reaches every
    worker with "progress" (rank 0's board) and "streams" (for `worker_batches`) added. Returns the
    images/s of the last report."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from synreal_ray.cluster import cpus_per_worker, init_ray
    from synreal_ray.progress import TrainingProgress, bar_drawn, described

    init_ray()
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.workers
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # batches must reach a worker in step order
    # On a terminal the bar shows the steps: this line then only says what the bar does not (a
    # resumed run, several workers, GPUs).
    plain = start == 0 and cfg.workers == 1 and not use_gpu and bar_drawn(log)
    log.log(logging.DEBUG if plain else logging.INFO, "%s: %s, steps %d..%d on %d worker(s)%s", described(run_name),
            cfg.model, start, cfg.steps, cfg.workers, " (GPU)" if use_gpu else "")
    in_worker = cfg.steps * cfg.batch_size <= IN_WORKER_MAX
    log.debug("%s: data %s", run_name, "loaded in the workers" if in_worker else "streamed by Ray Data")
    progress = TrainingProgress(run_name, total=cfg.steps, batch_size=cfg.batch_size, log_every=cfg.log_every,
                                logger=log, keys=keys)
    with progress as board:  # rank 0 posts its steps there; None when progress is not shown
        trainer = TorchTrainer(
            worker,
            train_loop_config={**loop_config, "progress": board, "streams": streams if in_worker else None},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker(cfg.workers)}),
            run_config=RunConfig(
                name=run_name, **ray_storage(cfg.out),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
            datasets=None if in_worker else {f"rank{r}": functools.partial(streams.for_rank, r)
                                             for r in range(cfg.workers)},
            dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        )
        result = trainer.fit()
    return (result.metrics or {}).get("images_per_s")
