"""The stage layer and the storage writes it relies on: the output guard (local and S3), the
marker that allows clearing, the one-writer lease, resuming only the same run, raw-input
fingerprints, and writers that readers never see half-done."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from synreal_ray import storage
from synreal_ray.stage import LEASE, MARKER, OutputError, Stage, check_output, fingerprint

from conftest import run_cli


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the guard ---------------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["", "  ", ".", "./", "~", "/", "s3://bucket", "s3://bucket/", "s3://bucket//"])
def test_guard_refuses_places_that_are_not_an_output_folder(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError):
        check_output(out)


def test_guard_refuses_the_current_and_home_directory_by_any_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (str(tmp_path), f"{tmp_path}/sub/..", os.path.expanduser("~") + "/"):
        with pytest.raises(OutputError):
            check_output(out)


@pytest.mark.parametrize("scheme", ["local", "s3"])
def test_guard_refuses_an_output_that_equals_contains_or_lies_inside_an_input(scheme, tmp_path):
    base = str(tmp_path) if scheme == "local" else "s3://bucket/work"
    data = f"{base}/data/syn"
    for out in (data, f"{data}/", f"{data}/features", f"{base}/data", base):
        with pytest.raises(OutputError, match="input"):
            check_output(out, [data])
    check_output(f"{base}/data/syn-features", [data])  # a sibling with a shared prefix is fine
    check_output(f"{base}/out/features", [data, None])


def test_storage_refuses_to_delete_a_bucket_or_the_root():
    for uri in ("s3://bucket", "/"):
        with pytest.raises(ValueError, match="refusing"):
            storage.delete_dir(uri)


def test_features_out_onto_the_dataset_is_refused_and_the_dataset_survives(demo_data, tmp_path):
    """The issue's cases: --out equal to the dataset, its parent, and "" (an unset variable)."""
    data = tmp_path / "data"
    (data / "syn").mkdir(parents=True)
    os.system(f"cp -r {demo_data / 'syn'}/. {data / 'syn'}")
    (data / "real").mkdir()
    (data / "real" / "keep.txt").write_text("mine")
    before = tree(data)
    for out in (str(data / "syn"), str(data), ""):
        p = run_cli("features", "--dataset", str(data / "syn"), "--layout", "synscapes", "--out", out, check=False)
        assert p.returncode != 0
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and ("input" in errors[0] or "empty" in errors[0]), p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    assert tree(data) == before


def test_a_folder_without_the_marker_is_never_cleared(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("four years of work")
    stage = Stage("features", str(out), {"a": 1})
    with pytest.raises(OutputError, match="not written by synreal-ray"):
        stage.begin(force=True)  # not even with force
    assert (out / "thesis.tex").read_text() == "four years of work" and not (out / LEASE).exists()


def test_marker_written_first_then_a_rerun_with_other_settings_clears_only_its_own_folder(tmp_path):
    out = tmp_path / "out"
    stage = Stage("features", str(out), {"a": 1})
    assert stage.begin()
    assert json.loads((out / MARKER).read_text())["stage"] == "features"
    (out / "features").mkdir()
    (out / "features" / "part-1.parquet").write_bytes(b"x")
    (tmp_path / "neighbour.txt").write_text("untouched")
    stage.publish(rows=1)
    assert not (out / LEASE).exists()  # publishing gives the lease back
    assert Stage("features", str(out), {"a": 1}).begin() is False  # up to date
    again = Stage("features", str(out), {"a": 2})
    assert again.begin() is True
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, LEASE])
    assert (tmp_path / "neighbour.txt").read_text() == "untouched"


# --- one writer per output ------------------------------------------------------------------------

def write_lease(out: Path, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE).write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "time": time.time(), **fields}))


def test_a_live_lease_refuses_a_second_writer_and_force_breaks_it(tmp_path):
    out = tmp_path / "out"
    write_lease(out, pid=1)  # pid 1 is alive on every Linux machine
    with pytest.raises(OutputError, match="another run is writing here.*pid 1"):
        Stage("kliep", str(out), {}).begin()
    assert Stage("kliep", str(out), {}).begin(force=True)
    assert json.loads((out / LEASE).read_text())["pid"] == os.getpid()


def test_a_lease_from_another_host_needs_force(tmp_path):
    out = tmp_path / "out"
    write_lease(out, host="some-other-node", pid=os.getpid())
    with pytest.raises(OutputError, match="some-other-node"):
        Stage("kliep", str(out), {}).begin()


def test_a_dead_process_lease_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    write_lease(out, pid=dead.pid)
    assert Stage("kliep", str(out), {}).begin()


def test_two_processes_on_one_output_one_refuses(tmp_path, demo_data):
    """A real second process: the first holds the lease while it runs."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from synreal_ray.stage import Stage; "
        f"s = Stage('kliep', {str(out)!r}, {{}}); s.begin(); print('held', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            Stage("kliep", str(out), {}).begin()
    finally:
        holder.kill()
        holder.wait()
    assert Stage("kliep", str(out), {}).begin()  # its holder is gone


# --- resuming only the same run ---------------------------------------------------------------------

def test_resume_keeps_the_output_only_for_the_same_run(tmp_path):
    out = tmp_path / "out"
    first = Stage("translate", str(out), {"s": 1}, run_settings={"s": 1})
    assert first.begin() and not first.resumed
    (out / "done-1.png").write_bytes(b"1")
    first.release()  # a killed run: no _SUCCESS
    same = Stage("translate", str(out), {"s": 1}, run_settings={"s": 1})
    assert same.begin() and same.resumed and (out / "done-1.png").exists()
    same.release()
    other = Stage("translate", str(out), {"s": 2}, run_settings={"s": 2})
    assert other.begin() and not other.resumed and not (out / "done-1.png").exists()


def test_precious_output_of_another_run_is_kept_unless_forced(tmp_path):
    out = tmp_path / "out"
    run = {"lr": 1e-4, "seed": 0}
    stage = Stage("train", str(out), {**run, "steps": 6}, run_settings=run, precious=True)
    assert stage.begin(resume=True)
    (out / "checkpoint_6").mkdir()
    (out / "checkpoint_6" / "state.pt").write_bytes(b"weights")
    stage.publish(steps=6)
    # new lr and seed: refused, naming what changed; the checkpoint stays
    new = {"lr": 2e-4, "seed": 1}
    with pytest.raises(OutputError, match=r"other settings \(lr: 0.0001 -> 0.0002, seed: 0 -> 1\)"):
        Stage("train", str(out), {**new, "steps": 6}, run_settings=new, precious=True).begin(resume=True)
    # the same run without --resume: refused too (a crash followed by a plain re-run)
    with pytest.raises(OutputError, match="pass --resume"):
        Stage("train", str(out), {**run, "steps": 8}, run_settings=run, precious=True).begin(resume=False)
    assert (out / "checkpoint_6" / "state.pt").read_bytes() == b"weights" and (out / "_SUCCESS").exists()
    # more steps of the same run with resume: continued, and no longer looks complete while it runs
    more = Stage("train", str(out), {**run, "steps": 8}, run_settings=run, precious=True)
    assert more.begin(resume=True) and more.resumed
    assert (out / "checkpoint_6").exists() and not (out / "_SUCCESS").exists()
    more.release()
    # --force: a clean start
    forced = Stage("train", str(out), {**new, "steps": 6}, run_settings=new, precious=True)
    assert forced.begin(force=True, resume=True) and not forced.resumed and not (out / "checkpoint_6").exists()


def test_a_raw_input_fingerprint_follows_its_files_size_and_time(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"1234")
    fp = fingerprint({}, [str(data)])
    assert fingerprint({}, [str(data)]) == fp
    (data / "a.png").write_bytes(b"12345")  # same path, other content
    assert fingerprint({}, [str(data)]) != fp
    fp = fingerprint({}, [str(data)])
    os.utime(data / "a.png", ns=(1, 1))
    assert fingerprint({}, [str(data)]) != fp


def test_s3_guard_marker_and_clear(s3_bucket):
    with pytest.raises(OutputError, match="whole bucket"):
        Stage("features", s3_bucket, {}).begin()
    storage.write_bytes(f"{s3_bucket}/data/x.png", b"data")
    with pytest.raises(OutputError, match="not written by synreal-ray"):
        Stage("features", f"{s3_bucket}/data", {}).begin()
    with pytest.raises(OutputError, match="input"):
        Stage("features", f"{s3_bucket}/data/out", {}, inputs=[f"{s3_bucket}/data"]).begin()
    out = f"{s3_bucket}/out"
    stage = Stage("features", out, {"a": 1}, inputs=[f"{s3_bucket}/data"])
    assert stage.begin()
    storage.write_bytes(f"{out}/features/part-1.parquet", b"x")
    stage.publish()
    assert Stage("features", out, {"a": 2}, inputs=[f"{s3_bucket}/data"]).begin()
    assert [u.rsplit("/", 1)[1] for u in storage.list_files(out)] == sorted([LEASE, MARKER])
    assert storage.read_bytes(f"{s3_bucket}/data/x.png") == b"data"
    # the S3 fingerprint of a raw input follows its objects
    fp = fingerprint({}, [f"{s3_bucket}/data"])
    storage.write_bytes(f"{s3_bucket}/data/x.png", b"other data")
    assert fingerprint({}, [f"{s3_bucket}/data"]) != fp


# --- writers invisible until complete ---------------------------------------------------------------

def test_temporaries_and_markers_are_never_read_as_data(tmp_path):
    folder = tmp_path / "features"
    storage.write_parquet(pa.table({"id": ["a", "b"]}), str(folder / "part-1.parquet"))
    # what a killed writer leaves: the old temporary name, the new hidden one, and markers
    (folder / "part-1.parquet.tmp-1a2b3c4d").write_bytes((folder / "part-1.parquet").read_bytes())
    (folder / ".part-2.parquet.tmp-1a2b3c4d").write_bytes((folder / "part-1.parquet").read_bytes())
    (folder / "_journal").mkdir()
    (folder / "_journal" / "part-9.parquet").write_bytes((folder / "part-1.parquet").read_bytes())
    assert storage.read_table(str(folder)).num_rows == 2
    assert [Path(u).name for u in storage.data_files(str(folder))] == ["part-1.parquet"]


def test_local_writes_leave_no_temporary_and_use_a_hidden_name(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(a).name), real_replace(a, b)))
    storage.write_bytes(str(tmp_path / "x" / "file.bin"), b"data")
    assert seen and seen[0].startswith(".file.bin.tmp-")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["file.bin"]


def test_a_sweep_restores_only_the_same_sweep(tmp_path):
    """Tune's folder of an interrupted sweep is continued only with the same settings; another
    sweep's remains are refused unless forced, which clears them (never the data)."""
    from synreal_ray.tune import load_sweep_config, same_sweep

    from conftest import REPO

    out = tmp_path / "sweep"
    cfg, tune_cfg = load_sweep_config(str(REPO / "configs" / "sweep.yaml"), {"out": str(out)})
    assert same_sweep(cfg, tune_cfg, can_restore=False) is False  # a new sweep: its settings recorded
    (out / "trials" / "t1").mkdir(parents=True)
    assert same_sweep(cfg, tune_cfg, can_restore=True) is True  # interrupted, same settings: restore
    other_cfg, other_tune = load_sweep_config(str(REPO / "configs" / "sweep.yaml"), {"out": str(out)},
                                              {"tune.milestones": [5, 10]})
    with pytest.raises(OutputError, match="other settings .*tune.milestones"):
        same_sweep(other_cfg, other_tune, can_restore=True)
    assert (out / "trials" / "t1").exists()
    assert same_sweep(other_cfg, other_tune, can_restore=True, force=True) is False
    assert not (out / "trials").exists() and (out / "tune" / "_synreal_sweep.json").exists()


def test_downstream_is_recomputed_when_upstream_is_published_again(tmp_path):
    """Forcing an upstream stage with the same settings publishes new content: its downstream
    fingerprint must change, or a stale result would be reused."""
    up = str(tmp_path / "up")
    first = Stage("segment", up, {"a": 1})
    first.begin()
    first.publish()
    fp = fingerprint({}, [up])
    assert fingerprint({}, [up]) == fp
    again = Stage("segment", up, {"a": 1})
    assert again.begin(force=True)
    again.publish()
    assert fingerprint({}, [up]) != fp
