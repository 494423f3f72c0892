"""The train stage: the pure parts (sampler expansion, image loading, checkpoint discovery, the
metrics log), then tiny UNIT / CycleGAN runs on Ray Train with 2 CPU workers: outputs, a
bit-identical checkpoint, a killed worker survived, a killed job resumed, the CLI on S3."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from synreal_ray import raytrain, storage
from synreal_ray.cli import main
from synreal_ray.config import ConfigError, apply_overrides
from synreal_ray.datasets.layouts import list_dataset
from synreal_ray.models import build_model
from synreal_ray.train import (
    MetricsLog,
    TrainConfig,
    _Streams,
    check_resumable,
    latest_checkpoint,
    list_checkpoints,
    load_generator,
    load_steps,
    prepare_data,
    read_metrics,
    read_pairs,
    read_state,
    run_folder,
    run_train,
    save_checkpoint,
    step_rows,
)
from synreal_ray.translate import read_generator

from conftest import run_cli

TINY = {
    "unit": dict(base_channels=8, n_res=2, n_shared=1, dis_channels=8, dis_layers=2, dis_scales=2),
    "cyclegan": dict(base_channels=8, n_res=2, dis_channels=8, pool_size=4, pool_seed=0),
}
LOSS_KEYS = {"unit": {"gen_total", "dis_total", "recon_syn", "kl_syn", "cyc_real", "gen_adv_s2r"},
             "cyclegan": {"gen_total", "dis_total", "dis_syn", "dis_real"}}


def tiny_config(demo_data, out, model="unit", **over) -> TrainConfig:
    settings = dict(syn=str(demo_data / "syn"), real=str(demo_data / "real"), out=str(out), model=model,
                    model_config=TINY[model], image_size="32x64", batch_size=2, workers=2, steps=6,
                    checkpoint_every=2, log_every=1, grid_every=3, grid_images=3, max_failures=1)
    return TrainConfig(**{**settings, **over})


def write_pairs(demo_data, out, k=3) -> str:
    """A pairs stage output in its published layout: each synthetic image with k real ones, and
    synthetic weights 1, 2, 3, 1, 2, ... (one per synthetic id, as the pairs stage writes them)."""
    syn, _ = list_dataset(str(demo_data / "syn"), "synscapes")
    real, _ = list_dataset(str(demo_data / "real"), "cityscapes")
    rows = [(i, s, real[(i * 5 + r) % len(real)], r) for i, s in enumerate(syn) for r in range(k)]
    table = pa.table({
        "syn_id": [s.id for _, s, _, _ in rows], "real_id": [r.id for _, _, r, _ in rows],
        "rank": pa.array([k for *_, k in rows], pa.int32()), "distance": pa.array([0.1 * k for *_, k in rows], pa.float32()),
        "w_syn": pa.array([1.0 + i % 3 for i, *_ in rows], pa.float32()), "w_real": pa.array([1.0] * len(rows), pa.float32()),
        "syn_image_uri": [s.image_uri for _, s, _, _ in rows], "real_image_uri": [r.image_uri for _, _, r, _ in rows]})
    storage.write_parquet(table, storage.join(out, "pairs", "part-0.parquet"))
    storage.write_json(storage.join(out, "stage.json"), {"fingerprint": "test-pairs"})
    storage.write_bytes(storage.join(out, storage.SUCCESS), b"")
    return out


# -- pure parts -------------------------------------------------------------------------------


def test_step_rows_split_each_global_batch_over_workers_and_resume_the_same_sequence(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "o", batch_size=4, pairs=write_pairs(demo_data, str(tmp_path / "p")))
    data = prepare_data(cfg)
    ref = data.sampler(cfg)
    batches = [ref.next_batch() for _ in range(6)]
    rows = step_rows(data.sampler(cfg), data, 6, workers=2)
    for r in (0, 1):
        assert rows[r]["step"].tolist() == list(range(6))
        for i, b in enumerate(batches):
            assert [data.syn_ids[j] for j in rows[r]["syn"][i]] == b.syn_ids[2 * r:2 * r + 2]
            assert [data.real_ids[j] for j in rows[r]["real"][i]] == b.real_ids[2 * r:2 * r + 2]
            np.testing.assert_array_equal(rows[r]["w_syn"][i], b.w_syn[2 * r:2 * r + 2])
    # a sampler restored at step 4 expands to the tail of the uninterrupted sequence
    at4 = data.sampler(cfg)
    for _ in range(4):
        at4.next_batch()
    resumed = data.sampler(cfg)
    resumed.load_state_dict(json.loads(json.dumps(at4.state_dict())))  # as stored in meta.json
    tail = step_rows(resumed, data, 6, workers=2)
    for r in (0, 1):
        for k in rows[r]:
            np.testing.assert_array_equal(tail[r][k], rows[r][k][4:])


def test_a_small_run_loads_in_its_workers_exactly_the_batches_its_ray_data_stream_gives(demo_data, ray_cluster,
                                                                                        tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "o", batch_size=4, steps=7, pairs=write_pairs(demo_data, str(tmp_path / "p")))
    streams = _Streams(cfg, prepare_data(cfg))
    assert raytrain.IN_WORKER_MAX >= cfg.steps * cfg.batch_size  # this run loads in its workers
    for rank in range(cfg.workers):
        here = list(raytrain.load_here(*streams.plan(rank), batch_size=2))
        streamed = list(streams.for_rank(rank).iter_torch_batches(batch_size=2))
        assert [b["step"].tolist() for b in here] == [[s, s] for s in range(7)]  # 7 steps: chunks of 4 and 3
        assert len(streamed) == len(here)
        for a, b in zip(here, streamed):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_load_steps_reads_and_resizes_the_images_of_each_step_in_order(demo_data):
    cfg = tiny_config(demo_data, "unused")
    data = prepare_data(cfg)
    rows = step_rows(data.sampler(cfg), data, 3, workers=2)[1]
    out = load_steps({"id": np.array([2, 0])}, rows=rows, syn_uris=data.syn_uris, real_uris=data.real_uris,
                     size=(32, 64))
    assert out["step"].tolist() == [2, 0]  # 1 pair per worker per step
    assert out["syn"].shape == (2, 32, 64, 3) and out["syn"].dtype == np.uint8
    from synreal_ray.train import read_training_image

    np.testing.assert_array_equal(out["real"][1], read_training_image(data.real_uris[rows["real"][0, 0]], (32, 64)))


def test_prepare_data_rejects_pairs_of_other_datasets_and_bad_tables(demo_data, tmp_path):
    pairs = write_pairs(demo_data, str(tmp_path / "p"))
    other = tiny_config(demo_data, tmp_path / "o", pairs=pairs, real=str(demo_data / "real"), real_split="val")
    with pytest.raises(ValueError, match="real_id values in pairs are not in real_ids"):
        prepare_data(other)
    table = read_pairs(pairs).drop(["distance"])
    storage.write_parquet(table, storage.join(str(tmp_path / "q"), "pairs", "part-0.parquet"))
    with pytest.raises(FileNotFoundError, match="pairs output is incomplete"):
        read_pairs(str(tmp_path / "q"))
    storage.write_bytes(storage.join(str(tmp_path / "q"), storage.SUCCESS), b"")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['distance'\]"):
        read_pairs(str(tmp_path / "q"))


def test_grid_pairs_are_the_samplers_first_draws_each_synthetic_image_once(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "o", pairs=write_pairs(demo_data, str(tmp_path / "p")), grid_images=4)
    data = prepare_data(cfg)
    grid = data.grid_pairs(cfg)
    sampler, drawn = data.sampler(cfg), {}
    while len(drawn) < 4:
        b = sampler.next_batch()
        for syn, real in zip(b.syn_ids, b.real_ids):
            drawn.setdefault(syn, real)
    syn_uri, real_uri = dict(zip(data.syn_ids, data.syn_uris)), dict(zip(data.real_ids, data.real_uris))
    assert grid == [(syn_uri[syn], real_uri[real]) for syn, real in list(drawn.items())[:4]]
    assert data.grid_pairs(cfg) == grid and len({s for s, _ in grid}) == 4  # fixed, distinct
    listed = {(s, r) for s, r in zip(data.pairs.column("syn_id").to_pylist(), data.pairs.column("real_id").to_pylist())}
    assert all(pair in listed for pair in list(drawn.items())[:4])  # a pair of the table, as training draws
    other = tiny_config(demo_data, tmp_path / "o", pairs=cfg.pairs, grid_images=4, seed=1)
    assert data.grid_pairs(other) != grid  # drawn (seeded), not always the first neighbour


def test_lr_schedule_settings_are_checked_and_old_unit_checkpoints_refused_in_one_line(demo_data, tmp_path):
    for key, value in (("lr_step_size", 0), ("lr_gamma", 0.0), ("lr_gamma", 1.5)):
        with pytest.raises(ConfigError) as e:
            tiny_config(demo_data, tmp_path / "o", **{key: value})
        assert e.value.key == key
    cfg = tiny_config(demo_data, tmp_path / "o", lr_step_size=3)
    data = prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model("unit", **TINY["unit"])
    opts = model.make_optimizers()
    scheds = model.make_schedulers(opts, cfg.steps, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    folder = tmp_path / "checkpoint_00000002"
    folder.mkdir()
    save_checkpoint(str(folder), cfg=cfg, step=2, model=model, opts=opts, scheds=scheds, sampler=data.sampler(cfg),
                    scaler=None)
    assert scheds["gen"].state_dict()["step_size"] == 3 and read_state(str(folder))["checkpoint_version"] == 2
    gen, meta = load_generator(str(folder))
    assert meta["checkpoint_version"] == 2
    check_resumable(cfg, str(folder), data)
    # a checkpoint from before issue 12 records no version (1) and has no LayerNorm parameters
    state = read_state(str(folder))
    del state["checkpoint_version"]
    state["model"] = {k: v for k, v in state["model"].items() if not k.endswith((".gamma", ".beta"))}
    torch.save(state, folder / "state.pt")
    meta = json.loads((folder / "meta.json").read_text())
    del meta["checkpoint_version"]
    meta["state_bytes"] = (folder / "state.pt").stat().st_size
    (folder / "meta.json").write_text(json.dumps(meta))
    want = f"{folder}: a unit checkpoint of version 1, this code loads version 2 (version 2 has LayerNorm"
    for load in (lambda: load_generator(str(folder)), lambda: check_resumable(cfg, str(folder), data),
                 lambda: read_generator(str(folder))):
        with pytest.raises(ValueError) as e:
            load()
        assert want.split(": a unit")[1] in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    run = Path(run_folder(str(tmp_path)))
    for step, state in ((2, b"x" * 10), (4, b"y" * 10), (6, b"z" * 3)):  # 6: partly written
        d = run / f"checkpoint_{step:08d}"
        d.mkdir(parents=True)
        (d / "state.pt").write_bytes(state)
        (d / "meta.json").write_text(json.dumps({"step": step, "state_bytes": 10}))
    (run / "checkpoint_00000008").mkdir()  # meta.json not uploaded yet
    assert [s for s, _ in list_checkpoints(str(run))] == [2, 4]
    assert latest_checkpoint(str(tmp_path)) == str(run / "checkpoint_00000004")
    assert latest_checkpoint(str(run / "checkpoint_00000002")) == str(run / "checkpoint_00000002")
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        latest_checkpoint(str(run / "checkpoint_00000006"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(str(tmp_path / "nothing"))


def test_metrics_log_keeps_steps_up_to_the_checkpoint_on_resume(tmp_path):
    uri = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(uri, keep_until=0)
    for s in range(1, 6):
        log.add({"step": s, "loss": float(s)})
    log.flush(force=True)
    resumed = MetricsLog(uri, keep_until=3)  # steps 4, 5 will be trained (and logged) again
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    resumed.add({"step": 4, "loss": 0.5})
    resumed.flush(force=True)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    MetricsLog(uri, keep_until=0)  # a fresh run starts an empty log
    assert read_metrics(str(tmp_path)) == []


# -- Ray Train runs -----------------------------------------------------------------------------

# The hooks run inside Ray workers, which cannot import this test module: pickle it by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def record_steps(folder: str, kill_steps: tuple[int, ...], *, step: int, rank: int, model) -> None:
    """Step hook: log (step, rank, pid, hash of rank 0's weights); keep rank 0's weights at even
    steps; at a kill step, rank 1 publishes its pid (once per step, across restarts) and waits
    for the test to SIGKILL it."""
    digest = "-"
    if rank == 0:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()[:16]
        if step % 2 == 0:
            torch.save(state, os.path.join(folder, f"model_step{step}.pt"))
    with open(os.path.join(folder, "steps.log"), "a") as f:
        f.write(f"{step} {rank} {os.getpid()} {digest}\n")
    marker = os.path.join(folder, f"kill_{step}")
    if rank == 1 and step in kill_steps and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        time.sleep(300)


class Killer(threading.Thread):
    """SIGKILLs every worker that publishes its pid through `record_steps`."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.killed, self.stop = folder, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            for marker in sorted(self.folder.glob("kill_*")):
                if marker.suffix != ".tmp" and marker.name not in [m for m, _ in self.killed]:
                    pid = int(marker.read_text())
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((marker.name, pid))
            time.sleep(0.1)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def unit_story(demo_data, ray_cluster, tmp_path_factory):
    """One tiny UNIT run (6 steps, 2 workers, checkpoints at 2, 4, 6) through two crashes. Rank 1
    is SIGKILLed after step 3: Ray Train restarts the worker group from checkpoint 2
    (max_failures=1). Killed again after step 5, the run fails: a dead job. `resume` then
    continues it from checkpoint 4. The workers read Ray Data streams (a run this small would
    load in the workers: the segment stage's killed-worker test covers that path)."""
    from ray.train import TrainingFailedError

    root = tmp_path_factory.mktemp("unit_story")
    hooks = root / "hooks"
    hooks.mkdir()
    # `out` relative to the current folder, as people type it (the workers run in another folder)
    cfg = tiny_config(demo_data, "out")
    hook = functools.partial(record_steps, str(hooks), (3, 5))
    killer = Killer(hooks)
    killer.start()
    t, cwd = time.time(), os.getcwd()
    streams = pytest.MonkeyPatch()
    streams.setattr(raytrain, "IN_WORKER_MAX", 0)
    try:
        os.chdir(root)
        with pytest.raises(TrainingFailedError):
            run_train(cfg, step_hook=hook)
        failed = {"complete": storage.is_complete(cfg.out), "metrics": [r["step"] for r in read_metrics(cfg.out)],
                  "checkpoints": [s for s, _ in list_checkpoints(run_folder(cfg.out))]}
        record = run_train(apply_overrides(cfg, {"resume": True}), step_hook=hook)
    finally:
        os.chdir(cwd)
        killer.stop.set()
        streams.undo()
    cfg = apply_overrides(cfg, {"out": str(root / "out")})
    print(f"unit story: {time.time() - t:.1f} s")
    log = [line.split() for line in (hooks / "steps.log").read_text().splitlines()]
    return SimpleNamespace(cfg=cfg, record=record, hooks=hooks, failed=failed, killed=killer.killed,
                           log=[(int(s), int(r), int(p), h) for s, r, p, h in log])


def test_killed_worker_is_survived_and_a_killed_job_resumes_bit_identically(unit_story):
    assert [m for m, _ in unit_story.killed] == ["kill_3", "kill_5"]
    failed = unit_story.failed
    assert not failed["complete"]  # a dead job never looks complete
    assert failed["checkpoints"] == [2, 4]
    assert failed["metrics"][:4] == [1, 2, 3, 4] and len(set(failed["metrics"])) == len(failed["metrics"])
    # rank 1 ran in three processes: from step 1, from checkpoint 2, and (resumed job) from checkpoint 4
    pids = list(dict.fromkeys(p for _, r, p, _ in unit_story.log if r == 1))
    assert [min(s for s, r, p, _ in unit_story.log if p == pid) for pid in pids] == [1, 3, 5]
    # steps done twice (3: before the kill and after the restart; 5: before the dead job and after
    # resume) end with bit-identical weights: the restarted run continues the same sequence
    # (data, sampler, noise, optimiser state) as if nothing had happened
    digests: dict[int, set] = {}
    for s, r, _, h in unit_story.log:
        if r == 0:
            digests.setdefault(s, set()).add(h)
    rank0_steps = [s for s, r, _, _ in unit_story.log if r == 0]
    assert rank0_steps.count(3) == 2 and rank0_steps.count(5) == 2
    assert all(len(h) == 1 for h in digests.values()), digests
    assert sorted(digests) == [1, 2, 3, 4, 5, 6]
    assert unit_story.record["resumed_from"] == 4 and storage.is_complete(unit_story.cfg.out)
    assert [r["step"] for r in read_metrics(unit_story.cfg.out)] == [1, 2, 3, 4, 5, 6]  # each step once


def test_run_writes_losses_checkpoints_grids_and_publishes(unit_story):
    cfg, record = unit_story.cfg, unit_story.record
    out = Path(cfg.out)
    records = read_metrics(cfg.out)
    for r in records:
        assert LOSS_KEYS["unit"] <= r.keys()
        assert all(np.isfinite(v) for v in r.values()), r
    assert record["final"] == records[-1] and record["images_per_s"] > 0
    assert [s for s, _ in list_checkpoints(run_folder(cfg.out))] == [2, 4, 6]
    assert record["outputs"]["checkpoint"] == latest_checkpoint(cfg.out) == run_folder(cfg.out) + "/checkpoint_00000006"
    meta = json.loads((Path(latest_checkpoint(cfg.out)) / "meta.json").read_text())
    assert meta["step"] == 6 and meta["model_name"] == "unit" and meta["image_size"] == [32, 64]
    assert meta["model_config"] == cfg.full_model_config()
    state = read_state(latest_checkpoint(cfg.out))
    assert {"model_name", "model_config", "model", "optimizers", "schedulers", "sampler", "step"} <= state.keys()
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["step_000003.png", "step_000006.png"]
    for png in [out / "loss_curves.png", *(out / "grids").iterdir()]:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "stage.json").read_text())["stage"] == "train"
    assert run_train(cfg)["skipped"] is True  # published with the same settings: nothing to do


def test_checkpoints_restore_bit_identical_weights_and_sampler_state(unit_story):
    cfg = unit_story.cfg
    data = prepare_data(cfg)
    for step, checkpoint in list_checkpoints(run_folder(cfg.out)):
        state = read_state(checkpoint)
        fresh = build_model(state["model_name"], **state["model_config"])
        fresh.load_state_dict(state["model"])
        assert_same_weights(fresh.state_dict(), torch.load(unit_story.hooks / f"model_step{step}.pt"))
        ref = data.sampler(cfg)
        for _ in range(step):
            ref.next_batch()
        assert state["sampler"] == ref.state_dict() and state["step"] == step
        restored = data.sampler(cfg)
        restored.load_state_dict(state["sampler"])
        a, b = restored.next_batch(), ref.next_batch()
        assert (a.syn_ids, a.real_ids) == (b.syn_ids, b.real_ids)
    # the translation stage's entry point: the final generator, found from the run's folder
    gen, meta = load_generator(cfg.out)
    final = build_model("unit", **meta["model_config"])
    final.load_state_dict(read_state(latest_checkpoint(cfg.out))["model"])
    x = torch.rand(1, 3, 32, 64) * 2 - 1
    assert torch.equal(gen(x), final.translate(x)) and not gen.training


def test_resume_refuses_a_checkpoint_of_another_model_or_sampler(unit_story):
    cfg = unit_story.cfg
    other = apply_overrides(cfg, {"model_config.base_channels": 16})
    with pytest.raises(ValueError, match="cannot resume: it has model_config"):
        check_resumable(other, latest_checkpoint(cfg.out), prepare_data(other))
    with pytest.raises(ValueError, match="cannot resume: sampler state was saved for a different sampler: batch_size"):
        check_resumable(apply_overrides(cfg, {"batch_size": 4}), latest_checkpoint(cfg.out), prepare_data(cfg))


def test_cli_trains_cyclegan_with_pairs_and_weights_on_s3(demo_data, ray_cluster, s3_bucket, tmp_path, capsys):
    pairs = write_pairs(demo_data, f"{s3_bucket}/pairs")
    syn, _ = list_dataset(str(demo_data / "syn"), "synscapes")
    real, _ = list_dataset(str(demo_data / "real"), "cityscapes")
    weights = f"{s3_bucket}/kliep"
    storage.write_parquet(pa.table({"id": [s.id for s in syn] + [r.id for r in real],
                                    "domain": ["syn"] * len(syn) + ["real"] * len(real),
                                    "weight": [0.0 if i % 4 == 0 else 1.5 for i in range(len(syn))] + [1.0] * len(real)}),
                          f"{weights}/weights/part-0.parquet")
    storage.write_bytes(f"{weights}/_SUCCESS", b"")
    config = tmp_path / "train.yaml"
    config.write_text(
        "train:\n  model: cyclegan\n  model_config: {base_channels: 8, n_res: 2, dis_channels: 8, pool_size: 4}\n"
        "  image_size: 64x128\n  steps: 50\n  log_every: 1\n  grid_every: 1\n  checkpoint_every: 2\n"
        "  real_random_share: 0.5\n")
    out = f"{s3_bucket}/train"
    args = ["train", "--config", str(config), "--syn", str(demo_data / "syn"), "--syn-layout", "synscapes",
            "--real", str(demo_data / "real"), "--real-layout", "cityscapes", "--pairs", pairs, "--weights", weights,
            "--steps", "2", "--image-size", "32x64", "--batch-size", "2", "--workers", "2", "--out", out]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out}/ray/train/checkpoint_00000002" in printed and f"{out}/metrics.jsonl" in printed
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(LOSS_KEYS["cyclegan"] <= r.keys() and all(np.isfinite(list(r.values()))) for r in records)
    assert storage.list_files(f"{out}/grids") == [f"{out}/grids/step_000001.png", f"{out}/grids/step_000002.png"]
    gen, meta = load_generator(out)
    assert meta["model_name"] == "cyclegan" and meta["image_size"] == [32, 64] and meta["step"] == 2
    assert gen(torch.zeros(1, 3, 32, 64)).shape == (1, 3, 32, 64)
    info = storage.read_json(f"{out}/stage.json")
    assert info["settings"]["pairs"] == pairs and info["settings"]["model"] == "cyclegan"
    assert main(args) == 0 and "up to date" in capsys.readouterr().out


def test_cli_reports_bad_config_keys_and_values(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("train:\n  model: unit\n  model_config:\n    base_chanels: 8\n")
    p = run_cli("train", "--config", str(config), check=False, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith(f"error: {config}: train.model_config.base_chanels: unknown unit option; allowed: ")
    config.write_text("train:\n  stepz: 8\n")
    assert main(["train", "--config", str(config)]) == 2
    assert main(["train", "--config", str(config).replace(".yaml", "-missing.yaml")]) == 2
    config.write_text("train:\n  steps: 8\n")
    assert main(["train", "--config", str(config), "--batch-size", "3", "--workers", "2"]) == 2


def test_a_finished_run_is_never_overwritten_by_other_settings_or_a_plain_rerun(unit_story):
    """The issue's case: a finished run re-run with a new lr and seed used to publish the new
    settings over the old state.pt and train nothing; a re-run without --resume deleted every
    checkpoint. Both are refused now, before any training, and the checkpoints stay."""
    from synreal_ray.stage import OutputError

    cfg = unit_story.cfg
    before = {u: storage.read_bytes(u) for u in storage.list_files(run_folder(cfg.out)) if u.endswith("state.pt")}
    with pytest.raises(OutputError, match=r"other settings \(lr: None -> 0.001, seed: 0 -> 7\)"):
        run_train(apply_overrides(cfg, {"lr": 1e-3, "seed": 7, "resume": True}))
    with pytest.raises(OutputError, match="pass --resume"):
        run_train(apply_overrides(cfg, {"steps": 8, "resume": False}))
    after = {u: storage.read_bytes(u) for u in storage.list_files(run_folder(cfg.out)) if u.endswith("state.pt")}
    assert after == before and len(before) == 3 and storage.is_complete(cfg.out)
