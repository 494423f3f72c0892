"""The train stage on Ray Train: 2 CPU workers (DDP/gloo), checkpoints, a killed worker, resume."""

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from synreal_ray import storage
from synreal_ray.cli import main
from synreal_ray.config import ConfigError, from_dict
from synreal_ray.models import build_model
from synreal_ray.train import (TrainConfig, latest_checkpoint, list_checkpoints, load_generator, prepare_data,
                               read_metrics, read_state, run_folder, run_train)

# The step hooks below run inside Ray Train workers, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.usefixtures("ray_cluster")

TINY = {"unit": {"base_channels": 8, "n_res": 1, "dis_channels": 8, "dis_layers": 2, "dis_scales": 2},
        "cyclegan": {"base_channels": 8, "n_res": 1, "dis_channels": 8, "pool_size": 4}}


def tiny(demo_data, out, model="cyclegan", **kw) -> TrainConfig:
    doc = {"syn": str(demo_data / "syn"), "real": str(demo_data / "real"), "real_split": "train", "model": model,
           "model_config": TINY[model], "image_size": "32x64", "batch_size": 2, "workers": 2, "steps": 4,
           "checkpoint_every": 2, "log_every": 1, "grid_every": 2, "grid_images": 2, "out": str(out), **kw}
    return from_dict(TrainConfig, doc)


def save_model_at(step, rank, model, *, at: int, path: str):
    """Hook: the model's weights on rank 0 right after step `at` (what that checkpoint must hold)."""
    if rank == 0 and step == at:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)


def kill_once(step, rank, model, *, at: int, rank_to_kill: int, marker: str):
    """Hook: SIGKILL this worker's own process once (a real crash, not an exception)."""
    if rank == rank_to_kill and step == at and not os.path.exists(marker):
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("model", ["unit", "cyclegan"])
def test_two_workers_train_checkpoint_and_restore_bit_identical(model, demo_data, tmp_path):
    import functools

    out, saved = tmp_path / "run", str(tmp_path / "model_at_2.pt")
    cfg = tiny(demo_data, out, model)
    rec = run_train(cfg, step_hook=functools.partial(save_model_at, at=2, path=saved))
    assert storage.is_complete(str(out)) and rec["steps"] == 4

    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for m in metrics for k, v in m.items() if isinstance(v, float))
    assert {"gen_total", "dis_total", "cyc_syn"} <= set(metrics[0])
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "grids").glob("*.png")) == ["step_000002.png", "step_000004.png"]

    # The step-2 checkpoint holds exactly the weights the workers had after step 2 ...
    steps = [s for s, _ in list_checkpoints(run_folder(str(out)))]
    assert steps == [2, 4]
    state = read_state(dict((s, u) for s, u in list_checkpoints(run_folder(str(out))))[2])
    expected = torch.load(saved)
    fresh = build_model(model, **state["model_config"])
    fresh.load_state_dict(state["model"])
    got = fresh.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # ... and the sampler state of a sampler advanced by 2 batches.
    sampler = prepare_data(cfg).sampler(cfg)
    for _ in range(2):
        sampler.next_batch()
    assert json.loads(json.dumps(state["sampler"])) == json.loads(json.dumps(sampler.state_dict()))

    gen, meta = load_generator(latest_checkpoint(str(out)))
    assert meta["step"] == 4
    with torch.no_grad():
        y = gen(torch.zeros(1, 3, 32, 64))
    assert y.shape == (1, 3, 32, 64) and float(y.abs().max()) <= 1.0


def test_killed_worker_is_survived(demo_data, tmp_path):
    import functools

    out, marker = tmp_path / "run", str(tmp_path / "killed")
    cfg = tiny(demo_data, out, steps=6, max_failures=1)
    rec = run_train(cfg, step_hook=functools.partial(kill_once, at=3, rank_to_kill=1, marker=marker))
    assert os.path.exists(marker)  # the worker really was killed
    assert storage.is_complete(str(out)) and rec["steps"] == 6
    steps = [m["step"] for m in read_metrics(str(out))]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3.. redone from the step-2 checkpoint, none logged twice


def test_failed_job_resumes_with_resume(demo_data, tmp_path, capsys):
    import functools

    from ray.train import TrainingFailedError

    out, marker = tmp_path / "run", str(tmp_path / "killed")
    cfg = tiny(demo_data, out, steps=6, max_failures=0)
    with pytest.raises(TrainingFailedError):
        run_train(cfg, step_hook=functools.partial(kill_once, at=3, rank_to_kill=0, marker=marker))
    assert not storage.is_complete(str(out))  # a failed run never looks complete
    assert [s for s, _ in list_checkpoints(run_folder(str(out)))] == [2]

    config = tmp_path / "c.yaml"
    config.write_text("train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in
                                           {**{k: v for k, v in vars(cfg).items()}, "max_failures": 0}.items()))
    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert storage.is_complete(str(out))
    assert [m["step"] for m in read_metrics(str(out))] == [1, 2, 3, 4, 5, 6]


def test_bad_config_is_named(demo_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model_config.pool_size: unknown unit option"):
        tiny(demo_data, tmp_path, "unit", model_config={"pool_size": 3})
    with pytest.raises(ConfigError, match="batch_size: 3 does not split evenly over 2 workers"):
        tiny(demo_data, tmp_path, batch_size=3)
    with pytest.raises(ConfigError, match="pairing: 'spfeat' pairing needs"):
        tiny(demo_data, tmp_path, pairing="spfeat")
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  stepz: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "train.stepz: unknown key" in capsys.readouterr().err
