"""Connecting to Ray: an existing cluster when there is one (RAY_ADDRESS, `ray job submit`),
otherwise a local one sized so that small machines do not deadlock; and the CPUs a worker holds."""

from __future__ import annotations

import logging
import os
import warnings

# Ray's own console output (set by the command line: `synreal -v` shows it all). None: Ray's defaults.
_ray_console: bool | None = None

# Settings of the local Ray this module starts (a cluster's are its operator's): Ray Train
# features a local machine without a dashboard has no use for, each costing CPU in every fit
# (an actor process to start and keep; callbacks). A user's own environment wins (setdefault).
# README, Performance: the whole `synreal train` took 0.966x the time with them.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # an actor watching for node preemption
    "RAY_TRAIN_METRICS_ENABLED": "0",  # metrics for the dashboard, which a local Ray here does not start
}


def set_local_ray_env(environ) -> None:
    """LOCAL_RAY_ENV into `environ` (os.environ), where the user has not set the key."""
    for key, value in LOCAL_RAY_ENV.items():
        environ.setdefault(key, value)


def set_ray_console(verbose: bool) -> None:
    """verbose False: Ray's own logs go to its log files (the session's `logs/` folder) only;
    the console keeps Ray's warnings and, on a terminal, Ray Data's progress bars. True: Ray's
    defaults, worker output forwarded to this console included."""
    global _ray_console
    _ray_console = verbose


class _DropNotice(logging.Filter):
    """Drops Ray's records that start with `prefix`: notices that need no action from the user."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _drop(logger: str, prefix: str) -> None:
    target = logging.getLogger(logger)
    if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in target.filters):
        target.addFilter(_DropNotice(prefix))


def _quiet_ray_data(bars: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bars  # drawn only where stdout is a terminal; else logged to ray-data.log
    ctx.print_on_execution_start = False
    # Ray Data's logger writes to a session file and to the console; the console gets warnings only.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropNotice) for f in handler.filters):
                handler.addFilter(_DropNotice("Progress bars disabled"))  # the hint to turn them back on


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if _ray_console is False:
        from ray.util.annotations import RayDeprecationWarning

        from synreal_ray.progress import shown

        # Ray's notices about its own internals are not the user's to act on (after `import ray`,
        # which puts its own filter for them first).
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
        # A local Ray starting with token authentication on (its secure default) says so each time.
        _drop("ray._private.authentication.authentication_token_setup", "Token authentication is enabled")
        _quiet_ray_data(bars=shown(logging.getLogger("synreal_ray")))
    if ray.is_initialized():
        return
    console = {} if _ray_console is None else {
        "log_to_driver": _ray_console, "logging_level": logging.INFO if _ray_console else logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **console)
        return
    # At least 4 logical CPUs: with num_cpus=2 on a 2-core machine, a trainer or an actor pool
    # takes every CPU and the read tasks feeding it never get scheduled (a silent deadlock).
    cpus = num_cpus or max(4, machine_cores())
    set_local_ray_env(os.environ)  # before the start: Ray's processes inherit it
    ray.init(num_cpus=cpus, include_dashboard=False, **console)


def machine_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpus_per_worker(workers: int, reserve: float = 1.0) -> int:
    """CPUs for each of `workers` training workers: the cluster's free CPUs now, less `reserve` for
    the tasks that feed them, shared out; at most one node's CPUs. At least 1."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    return max(1, int(min(largest, (free - reserve) / workers)))


def use_assigned_cpus() -> int:
    """Inside a Ray worker or actor: torch's intra-op threads = the CPUs Ray assigned it (Ray's
    default leaves torch at one thread, or at more threads than cores on a machine whose logical
    CPUs outnumber its cores). Returns the thread count."""
    import ray
    import torch

    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, min(int(assigned), machine_cores()))
    torch.set_num_threads(threads)
    return threads


DEVICES = ("auto", "cpu", "cuda")
# Sets of at most this many images are scored in the calling process instead of an actor pool
# (seg-eval, FID): a pool's start-up (~15 s on 2 cores) outweighs their compute. 0: always a pool.
IN_PROCESS_MAX = 100


def call_in_batches(fn, items: list[dict], batch_size: int, threads: int | None = None):
    """In this process, what a Ray Data map_batches actor would receive: `fn` on each batch of
    `items` as columns ({key: [values]}); yields its results. `threads`: torch's intra-op threads
    meanwhile (1 on CPU is what each pool actor has, so the results equal the pool's), restored
    after; None leaves them alone."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for k in range(0, len(items), batch_size):
            part = items[k:k + batch_size]
            yield fn({key: [it[key] for it in part] for key in part[0]})
    finally:
        torch.set_num_threads(before)


def items_dataset(items: list[dict], batch_size: int, actors: int):
    """(a Ray Data dataset of `items`, one block per batch up to 1000 blocks; `actors` cut to the
    number of blocks, as an actor without a block would only cost its start-up)."""
    import ray.data

    blocks = max(1, min(1000, -(-len(items) // batch_size)))
    return ray.data.from_items(items, override_num_blocks=blocks), min(actors, blocks)


def local_device(device: str, key: str = "device") -> str:
    """The torch device for work done in this process: cuda when asked or (auto) when this
    process sees a GPU, else cpu."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"{key}: {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} cuda: this process sees no GPU")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def actor_resources(actors: int | None = None, device: str = "auto", cpus_per_actor: float = 1.0,
                    key: str = "device") -> tuple[int, dict, str]:
    """(pool size, Ray resources per actor, the actors' torch device) for an inference actor pool
    (translate, FID, seg-eval).

    auto: one actor per GPU when the cluster has GPUs, else one single-threaded CPU actor per two
    logical CPUs (Ray gives a 1-CPU actor OMP_NUM_THREADS=1, so actors do not fight over cores;
    the other half is left to the tasks that feed them). `cpus_per_actor` below 1 leaves read
    tasks room on small machines (seg-eval); `key` names the setting in errors."""
    import ray

    if device not in DEVICES:
        raise ValueError(f"{key}: {device!r} is not one of {', '.join(DEVICES)}")
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0)
    if device == "cuda" and not gpus:
        raise ValueError(f"{key} cuda: the Ray cluster has no GPU")
    if gpus and device != "cpu":
        n = actors or int(gpus)
        return n, {"num_gpus": min(1.0, gpus / n)}, "cuda"  # more actors than GPUs share them
    return actors or max(1, int(res.get("CPU", 1)) // 2), {"num_cpus": cpus_per_actor}, "cpu"
