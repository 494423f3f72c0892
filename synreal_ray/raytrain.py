"""The Ray Train shell shared by `synreal train` (GANs) and `synreal segment` (segmenters).

    images_per_s = fit("train", _train_worker, {"cfg": ..., "step_hook": ...}, cfg, streams, start)

`cfg` is the stage's config (workers, use_gpu, steps, batch_size, log_every, max_failures,
keep_checkpoints, out, model). One `TorchTrainer`: `cfg.workers` DDP workers, each holding the
CPUs the cluster can spare (torch's threads follow, cluster.use_assigned_cpus), GPUs when asked or
when the cluster has one per worker; checkpoints under `out/ray/<run name>` (a fixed name, so a
re-run finds them); Ray Train restarts the group from the newest checkpoint up to `max_failures`
times; each rank reads its own stream (`streams.for_rank(rank)`, rebuilt at every start of the
group) in step order; rank 0's steps are drawn on the console (progress.TrainingProgress).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from synreal_ray import storage

log = logging.getLogger(__name__)


def ray_storage(out: str) -> dict:
    """RunConfig's storage arguments for a stage output: Ray Train keeps its run under `out/ray`."""
    fs, path = storage.resolve(storage.join(out, "ray"))
    return {"storage_path": path, "storage_filesystem": fs}


def fit(run_name: str, worker: Callable, loop_config: dict, cfg: Any, streams: Any, start: int,
        keys: tuple[str, ...] | None = None) -> float | None:
    """Train from step `start` to cfg.steps (see the module doc); `loop_config` reaches every
    worker with "progress" (rank 0's board) added. Returns the images/s of the last report."""
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
    progress = TrainingProgress(run_name, total=cfg.steps, batch_size=cfg.batch_size, log_every=cfg.log_every,
                                logger=log, keys=keys)
    with progress as board:  # rank 0 posts its steps there; None when progress is not shown
        trainer = TorchTrainer(
            worker,
            train_loop_config={**loop_config, "progress": board},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker(cfg.workers)}),
            run_config=RunConfig(
                name=run_name, **ray_storage(cfg.out),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
            datasets={f"rank{r}": functools.partial(streams.for_rank, r) for r in range(cfg.workers)},
            dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        )
        result = trainer.fit()
    return (result.metrics or {}).get("images_per_s")
