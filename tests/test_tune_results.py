"""Sweep results: failed trials in one table line each, their tracebacks in files beside it; a
sweep config with relative paths works although each trial runs in a working directory of its own."""

import csv
import re

import yaml

from test_pipeline import tiny_config


def test_failed_trials_are_one_line_rows_with_traceback_files(demo_data, tmp_path, ray_cluster, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    doc = tiny_config(demo_data, "out/sweep")  # relative: resolved against this directory, once
    # K larger than the 24 synthetic images each real image queries: every trial fails in its pairs stage.
    doc["tune"] = {"space": {"k": [40, 50], "levels": ["1,2"], "sigma": [1.0], "model": ["unit"],
                             "weighting": ["loss"]},
                   "milestones": [2], "val_images": 4}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    from synreal_ray.cli import main

    assert main(["tune", "--config", "sweep.yaml"]) == 1
    assert "error: every trial failed; see" in capsys.readouterr().err
    out = tmp_path / "out" / "sweep"
    lines = (out / "results.md").read_text().splitlines()
    assert len(lines) == 4  # header, rule, one line per trial: a Markdown table that renders
    assert all(len(re.split(r"(?<!\\)\|", line)) == 11 for line in lines), lines  # 9 cells each
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["k"]) for r in rows) == [40, 50]
    for r in rows:
        assert r["fid"] == "" and r["error"].startswith(f"ValueError: --k {r['k']} is larger than the synthetic set")
        assert "\n" not in r["error"]
        trace = (out / r["traceback"]).read_text()
        assert "run_pairs" in trace and "line" in trace and f"ValueError: --k {r['k']}" in trace  # the trial's frames
        assert "\x1b[" not in trace  # no terminal colours
        row = next(line for line in lines[2:] if f"| {r['k']} |" in line)
        assert r["traceback"] in row and "ValueError: --k" in row


def test_tune_metric_sets_the_mode_and_a_bad_one_is_named(tmp_path):
    import pytest

    from synreal_ray.config import ConfigError
    from synreal_ray.tune import TuneSection, load_sweep_config

    assert [TuneSection(metric=m).mode for m in ("fid", "kid", "consistency_miou", "downstream_miou")] == \
        ["min", "min", "max", "max"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"tune": {"metric": "psnr"}}))
    with pytest.raises(ConfigError, match=r"s\.yaml: tune\.metric: 'psnr' is not one of"):
        load_sweep_config(str(tmp_path / "s.yaml"))
    _, tune_cfg = load_sweep_config(str(tmp_path / "s.yaml"), assignments={"tune.metric": "downstream_miou"})
    assert tune_cfg.mode == "max"
