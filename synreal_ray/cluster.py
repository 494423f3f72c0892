"""Connecting to Ray: an existing cluster when there is one (RAY_ADDRESS, `ray job submit`),
otherwise a local one sized so that small machines do not deadlock."""

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
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
