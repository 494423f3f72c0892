"""The local Ray that synreal starts (synreal_ray/cluster.py)."""

from __future__ import annotations

import os

from synreal_ray.cluster import LOCAL_RAY_ENV, set_local_ray_env


def test_the_local_ray_s_worker_processes_inherit_its_settings(ray_cluster):
    # Ray Train reads these in the driver and in its controller, a Ray worker process, which
    # inherits its environment from the raylet that init_ray started (conftest sets none of them).
    @ray_cluster.remote(num_cpus=0)
    def worker_env(keys: list[str]) -> dict:
        return {k: os.environ.get(k) for k in keys}

    assert ray_cluster.get(worker_env.remote(list(LOCAL_RAY_ENV))) == LOCAL_RAY_ENV


def test_a_setting_the_user_made_wins():
    key = next(iter(LOCAL_RAY_ENV))
    environ = {key: "1"}
    set_local_ray_env(environ)
    assert environ == {**LOCAL_RAY_ENV, key: "1"}
