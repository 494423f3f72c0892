"""The whole job: config validation, `ray job submit` on a two-node local cluster, resume by
skipping, the report's four tables; semantic consistency of an identity translation. (A two-trial
Ray Tune sweep runs as the README's `synreal tune` command in test_readme.)"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from synreal_ray import storage
from synreal_ray.config import ConfigError
from synreal_ray.pipeline import load_pipeline_config

from conftest import REPO, RUN_DIR

TINY_TRAIN = {"image_size": "32x64", "batch_size": 2, "steps": 2, "workers": 1, "checkpoint_every": 2,
              "grid_every": 2, "log_every": 1, "model_config": {"base_channels": 8, "n_res": 1, "dis_channels": 8}}
RUNS = {"unit-method": {"name": "unit-method", "model": "unit", "pairing": "spfeat", "weighting": "loss"},
        "cyclegan-baseline": {"name": "cyclegan-baseline", "model": "cyclegan", "pairing": "random", "weighting": "none"}}
TINY_MODELS = {"unit": {"dis_layers": 2, "dis_scales": 2}, "cyclegan": {"pool_size": 4}}
TINY_SEGMENT = {"image_size": "32x64", "batch_size": 2, "steps": 2, "checkpoint_every": 2, "log_every": 1,
                "bn_batches": 1}


def tiny_config(demo_data, out, runs=("unit-method",)) -> dict:
    return {
        "out": str(out),
        "data": {"syn": str(demo_data / "syn"), "real": str(demo_data / "real")},
        "features": {"levels": "1,2"},
        "kliep": {"sigma": 1.0, "centers": 8},
        "pairs": {"k": 2},
        "train": TINY_TRAIN,
        "models": TINY_MODELS,
        "runs": [RUNS[name] for name in runs],
        "fid": {"dims": 64},
        "segment": TINY_SEGMENT,
        "grid_images": 2,
    }


def write_yaml(path, doc) -> str:
    Path(path).write_text(yaml.safe_dump(doc))
    return str(path)


def test_shipped_configs_are_valid():
    for name in ("demo.yaml", "ablation.yaml", "synscapes_to_cityscapes.yaml", "gta5_to_cityscapes.yaml"):
        cfg = load_pipeline_config(str(REPO / "configs" / name))
        assert cfg.runs
    from synreal_ray.tune import load_sweep_config

    cfg, tune_cfg = load_sweep_config(str(REPO / "configs" / "sweep.yaml"))
    assert len(tune_cfg.space.k) > 1 and tune_cfg.milestones


@pytest.mark.parametrize("doc,message", [
    ({"kliep": {"centres": 5}}, "kliep.centres: unknown key"),
    ({"train": {"stepz": 5}}, "stepz: unknown key"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "run names must be unique"),
    ({"runs": [{"name": "a", "model": "pix2pix"}]}, "'pix2pix' is not one of"),
    ({"models": {"pix2pix": {}}}, "unknown model 'pix2pix'"),
    ({"pairs": {"k": "five"}}, "pairs.k: expected int"),
    ({"segment": {"stepz": 5}}, "segment.stepz: unknown key"),
    ({"segment": {"steps": 0}}, "segment.steps: must be >= 1"),
    ({"segment": {"train": []}}, "segment.train: set by the pipeline"),
    ({"evaluate": {"downstream": "yes"}}, "evaluate.downstream: expected bool"),
])
def test_bad_config_is_named(tmp_path, doc, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(write_yaml(tmp_path / "c.yaml", doc))


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:  # Ray's worker port range
            return port


def _kill_cluster(marker: str) -> None:
    """Stop the processes of one local Ray cluster: `ray stop` would also stop the session's."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.mark.timeout(900)
def test_ray_job_submit_on_two_nodes_then_rerun_skips(demo_data, tmp_path, ray_cluster):
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "tiny.yaml", {**tiny_config(demo_data, out),
                                                 "evaluate": {"consistency": False, "downstream": False}})
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = Path(RUN_DIR) / f"jr{os.getpid()}"  # short: Ray's socket paths are length-limited
    gcs, dash = _free_port(), _free_port()
    # The job's `python` must be this environment's, as it is for a user inside their venv.
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def node_ports() -> list[str]:
        # The session's own cluster already holds the default agent ports on this machine.
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}", "--num-cpus=3",
                        f"--temp-dir={temp}", "--disable-usage-stats", *node_ports()],
                       check=True, env=env, capture_output=True, timeout=120)
        # Its own temp dir, as a second machine would have: two nodes sharing one would unpack the
        # job's working dir into the same folder, replacing it under the running driver.
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", *node_ports(), f"--temp-dir={temp}w",
                        '--resources={"worker_node": 1}'], check=True, env=env, capture_output=True, timeout=120)
        submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                  "--runtime-env-json", json.dumps({"excludes": [".git", ".ci", "out", "data", "*.egg-info"]}),
                  "--", "python", "jobs/pipeline.py", "--config", config]
        for _ in range(20):  # the dashboard answers before its job agent is up: retry only that
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=800)
            if "No available agent to submit job" not in job.stderr + job.stdout:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "| unit-method: translated vs real val |" in job.stdout  # the tables, printed at the end
        assert "succeeded" in job.stdout.lower()
    finally:
        _kill_cluster(str(temp))

    report = json.loads((out / "report.json").read_text())
    names = [r["comparison"] for r in report["rows"]]
    assert names[0] == "synthetic vs real val (no adaptation)" and "real train vs real val (floor)" in names
    # The segmenters are off here (CI time: each is a Ray Train start); the README's demo command,
    # run by tests/test_readme.py, checks the four tables.
    assert list(report["tables"]) == ["fid", "kid"]
    assert "disjoint halves" in (out / "report.md").read_text()
    assert "random-weight" in report["inception"]  # no real Inception weights here: labelled, never silent
    # where the time went: every published stage's recorded seconds, training split into its steps
    times = {r["stage"]: r for r in report["time"]}
    train = json.loads((out / "runs" / "unit-method" / "train" / "stage.json").read_text())
    assert times["train unit-method"]["seconds"] == round(train["seconds"], 1)
    assert 0 < times["train unit-method"]["work"] < times["train unit-method"]["seconds"]
    assert {"features syn", "features real", "kliep", "pairs", "translate unit-method"} <= times.keys()
    assert report["time"][-1]["stage"].startswith("report") and report["time"][-1]["seconds"] > 0
    assert "### Time (wall seconds per stage)" in (out / "report.md").read_text()
    assert (out / "before_after.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 3  # the page, images embedded
    for run in ("unit-method",):
        for stage in ("train", "translated"):
            assert storage.is_complete(str(out / "runs" / run / stage)), stage
        assert len(list((out / "runs" / run / "translated" / "img" / "rgb").glob("*.png"))) == 24

    # A re-run finds every stage published with the same fingerprint and only redoes the report.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    from synreal_ray.cli import main

    t = time.time()
    assert main(["run", "--config", config]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")} == stamps
    assert time.time() - t < 120


def test_consistency_of_an_identity_translation_is_seg_eval_on_the_raw_synthetic_set(demo_data, tmp_path, ray_cluster):
    """A translation that changes nothing (a copy of the synthetic set) scores exactly what the
    raw synthetic set scores; the report's consistency and downstream tables have their raw
    synthetic, run and ceiling rows. The judge is a real LR-ASPP checkpoint, written as the
    segment stage writes one (untrained: no Ray Train start needed to compare two scorings)."""
    import torch
    from PIL import Image

    from synreal_ray.ablation import cohort_confusion, cohorts
    from synreal_ray.datasets.layouts import list_dataset
    from synreal_ray.pipeline import (
        consistency_picture,
        pipeline_config_from_doc,
        run_consistency,
        run_paths,
        segment_paths,
        segmentation_tables,
        translated_uri,
    )
    from synreal_ray.segment import SegmentConfig, TrainSource, build_segmenter, run_folder, save_checkpoint
    from synreal_ray.train import checkpoint_name

    cfg = pipeline_config_from_doc(tiny_config(demo_data, tmp_path / "out"))
    run, sp = cfg.runs[0], segment_paths(cfg)
    folder = Path(run_folder(sp["judge"])) / checkpoint_name(0)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_segmenter("lraspp_mobilenet_v3_large").eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    save_checkpoint(str(folder), cfg=SegmentConfig(train=(TrainSource(str(demo_data / "real"), "cityscapes"),)), step=0,
                    model=model, opt=opt, sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), scaler=None, bn=0)
    shutil.copytree(demo_data / "syn", translated_uri(cfg, run))

    raw = run_consistency(cfg, sp["judge"], cfg.data.syn, sp["syn_consistency"])
    same = run_consistency(cfg, sp["judge"], translated_uri(cfg, run), run_paths(cfg, run)["consistency"])
    assert raw["num_images"] == same["num_images"] == 24 and raw["layout"] == "synscapes"
    for key in ("confusion", "miou", "pixel_accuracy", "iou", "top_confusions"):
        assert raw[key] == same[key], key
    assert len(list(Path(run_paths(cfg, run)["consistency"], "predictions").rglob("*.png"))) == 24

    # The importance cohorts split that evaluation exactly: their matrices, recomputed from the
    # saved predictions and the synthetic labels, add up to the seg-eval's own.
    samples, _ = list_dataset(translated_uri(cfg, run), "synscapes")
    weights = {s.id: float(k % 5) for k, s in enumerate(samples)}
    groups = cohorts(weights)
    parts = [cohort_confusion(samples, set(g["ids"]), str(Path(run_paths(cfg, run)["consistency"], "predictions")))
             for g in groups]
    assert [len(g["ids"]) for g in groups] == [8, 8, 8] and all(p.sum() > 0 for p in parts)
    np.testing.assert_array_equal(sum(parts), np.asarray(same["confusion"]))

    tables = segmentation_tables(cfg)
    consistency = tables["consistency_miou"]["rows"]
    assert [r["kind"] for r in consistency] == ["raw synthetic", "run", "ceiling"]
    assert consistency[0]["miou"] == consistency[1]["miou"] == raw["miou"] and consistency[2]["miou"] is None
    assert [r["kind"] for r in tables["downstream_miou"]["rows"]] == ["raw synthetic", "run", "ceiling"]

    png = consistency_picture(cfg, translated_uri(cfg, run), run_paths(cfg, run)["consistency"], tile=(32, 64))
    picture = Image.open(io.BytesIO(png))
    assert picture.size == (3 * 64 + 2 * 2, 2 * 32 + 2)  # translated | labels | prediction, grid_images rows
