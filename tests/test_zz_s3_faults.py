"""Fault injection on S3: SeaweedFS is SIGKILLed and started again on the same ports and data
while a stage writes (see test_faults.py for the Ray worker kills). This file runs last on
purpose: restarting the session's S3 server must not disturb the other tests' S3 use.
"""

from __future__ import annotations

import threading
import time

import pytest

from synreal_ray import storage
from synreal_ray.features import FeaturesConfig, load_features, run_features
from synreal_ray.translate import TranslateConfig, run_translate
from test_translate import run_dir  # noqa: F401  (a fixture: a training run's checkpoints)

from test_faults import check_translation, report, survive

pytestmark = pytest.mark.slow


def restart_s3_when(weed, uri: str, delay: float = 0.0) -> threading.Thread:
    """Restart the S3 server as soon as something exists under `uri` (+ delay)."""
    done = threading.Event()

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if len(storage.list_files(uri)) > 2:  # marker, lease, then the first data object
                    break
            except Exception:  # noqa: BLE001 - the server is ours to break
                pass
            time.sleep(0.05)
        time.sleep(delay)
        weed.restart(down_seconds=1.0)
        done.set()

    t = threading.Thread(target=watch, daemon=True)
    t.done = done
    t.start()
    return t


def test_features_on_s3_survive_a_server_restart_mid_write(ray_cluster, demo_data, weed, s3_bucket):
    out = f"{s3_bucket}/feat"
    cfg = FeaturesConfig(dataset=str(demo_data / "syn"), layout="synscapes", out=out, batch_size=1)
    watcher = restart_s3_when(weed, out)
    outcome = survive(lambda: run_features(cfg), out, recovered=lambda: watcher.join(timeout=150))
    watcher.join(timeout=150)
    assert watcher.done.is_set(), "the server was not restarted"
    ids = load_features(out, columns=("id",))["id"].tolist()
    assert len(ids) == len(set(ids)) == 24
    report("features (S3)", "S3 server SIGKILLed and restarted mid-write", outcome)


def test_translate_on_s3_survives_a_server_restart_mid_write(ray_cluster, demo_data, run_dir, weed, s3_bucket):  # noqa: F811
    out = f"{s3_bucket}/translated"
    cfg = TranslateConfig(checkpoint=str(run_dir), dataset=str(demo_data / "syn"), layout="synscapes", out=out,
                          batch_size=2, actors=1, in_process_max=0)  # the pool's actors write through the restart
    watcher = restart_s3_when(weed, out)
    outcome = survive(lambda: run_translate(cfg), out, recovered=lambda: watcher.join(timeout=150))
    watcher.join(timeout=150)
    assert watcher.done.is_set(), "the server was not restarted"
    check_translation(out)
    report("translate (S3)", "S3 server SIGKILLed and restarted mid-write", outcome)
