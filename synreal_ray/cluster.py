"""Connecting to Ray: an existing cluster when there is one (RAY_ADDRESS, `ray job submit`),
otherwise a local one sized so that small machines do not deadlock; and the CPUs a worker holds."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # At least 4 logical CPUs: with num_cpus=2 on a 2-core machine, a trainer or an actor pool
    # takes every CPU and the read tasks feeding it never get scheduled (a silent deadlock).
    cpus = num_cpus or max(4, machine_cores())
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)


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
