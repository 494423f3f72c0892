"""Paths are resolved once, in the config layer: every local path of a config dataclass comes
back absolute (against the working directory), s3:// URIs untouched; `--set KEY=VALUE`."""

import os

import pytest
import yaml

from synreal_ray.config import ConfigError, apply_overrides, from_dict, parse_assignments

from conftest import REPO


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return os.path.realpath(os.getcwd())


def test_stage_configs_make_local_paths_absolute(in_tmp):
    from synreal_ray.features import FeaturesConfig
    from synreal_ray.fid import FidConfig
    from synreal_ray.pairing import PairsConfig
    from synreal_ray.train import TrainConfig
    from synreal_ray.translate import TranslateConfig
    from synreal_ray.weighting import KliepConfig

    j = lambda *p: os.path.join(in_tmp, *p)  # noqa: E731
    f = from_dict(FeaturesConfig, {"dataset": "data/syn", "layout": "synscapes", "out": "s3://bucket/f"})
    assert (f.dataset, f.out) == (j("data", "syn"), "s3://bucket/f")
    k = from_dict(KliepConfig, {"syn": "f/syn", "real": "./f/real", "out": "k"})
    assert (k.syn, k.real, k.out) == (j("f", "syn"), j("f", "real"), j("k"))
    p = from_dict(PairsConfig, {"syn": "a", "real": "b", "out": "c", "weights": "k"})
    assert (p.syn, p.real, p.out, p.weights) == (j("a"), j("b"), j("c"), j("k"))
    assert from_dict(PairsConfig, {"syn": "a", "real": "b", "out": "c"}).weights is None
    t = from_dict(TranslateConfig, {"checkpoint": "ck", "dataset": "d", "layout": "synscapes", "out": "../o"})
    assert (t.checkpoint, t.dataset, t.out) == (j("ck"), j("d"), os.path.dirname(in_tmp) + "/o")
    z = from_dict(FidConfig, {"a": "x", "b": "s3://b/y", "weights": "w.pth", "cache": "c"})
    assert (z.a, z.b, z.weights, z.cache) == (j("x"), "s3://b/y", j("w.pth"), j("c"))
    tr = from_dict(TrainConfig, {"pairs": "p"})  # defaults are resolved too
    assert (tr.syn, tr.real, tr.out, tr.pairs, tr.weights) == (j("data/demo/syn"), j("data/demo/real"), j("out/train"), j("p"), None)
    assert apply_overrides(tr, {"out": "elsewhere"}).out == j("elsewhere")  # CLI flags: the same layer
    with pytest.raises(ConfigError, match="out: empty path"):
        from_dict(KliepConfig, {"syn": "a", "real": "b", "out": ""})


def test_pipeline_and_sweep_configs_are_absolute(in_tmp):
    from synreal_ray.pipeline import load_pipeline_config, train_config
    from synreal_ray.tune import load_sweep_config

    cfg, tune_cfg = load_sweep_config(str(REPO / "configs" / "sweep.yaml"))
    assert cfg.out == os.path.join(in_tmp, "out", "sweep")
    assert (cfg.data.syn, cfg.data.real) == (os.path.join(in_tmp, "data/demo/syn"), os.path.join(in_tmp, "data/demo/real"))
    demo = load_pipeline_config(str(REPO / "configs" / "demo.yaml"), {"fid.inception_weights": "w.pth"})
    assert demo.fid.inception_weights == os.path.join(in_tmp, "w.pth")
    tc = train_config(demo, demo.runs[1])
    assert all(os.path.isabs(u) for u in (tc.syn, tc.real, tc.pairs, tc.weights, tc.out))


def test_set_assignments(tmp_path):
    from synreal_ray.pipeline import load_pipeline_config
    from synreal_ray.tune import load_sweep_config

    sets = parse_assignments(["train.steps=20", "kliep.sigma=null", "kliep.clip=3.5", "tune.milestones=[5, 9]",
                              "runs=[{name: a, model: cyclegan}]", "features.levels=1,2"])
    assert sets == {"train.steps": 20, "kliep.sigma": None, "kliep.clip": 3.5, "tune.milestones": [5, 9],
                    "runs": [{"name": "a", "model": "cyclegan"}], "features.levels": "1,2"}
    cfg, tune_cfg = load_sweep_config(str(REPO / "configs" / "sweep.yaml"), None, sets)
    assert cfg.train["steps"] == 20 and cfg.kliep.sigma is None and cfg.kliep.clip == 3.5
    assert tune_cfg.milestones == (5, 9) and [r.name for r in cfg.runs] == ["a"] and cfg.features.levels == "1,2"
    demo = str(REPO / "configs" / "demo.yaml")
    for items, message in [(["train.stepz=3"], r"demo.yaml: train \(run unit-baseline\).stepz: unknown key"),
                           (["train.steps=many"], r"train \(run unit-baseline\).steps: expected int, got 'many'"),
                           (["trian.steps=3"], "demo.yaml: trian: unknown key"),
                           (["train.steps.x=3"], "train.steps: is \\d+, not a section"),
                           (["fid.dims=65"], "fid.dims: 65 is not one of")]:
        with pytest.raises(ConfigError, match=message):
            load_pipeline_config(demo, None, parse_assignments(items))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignments(["train.steps"])
    with pytest.raises(ConfigError, match="tune.milestones: must be increasing"):
        load_sweep_config(str(REPO / "configs" / "sweep.yaml"), None, {"tune.milestones": [9, 5]})
    with pytest.raises(ConfigError, match=r"train.steps: '\[1' is not a YAML value"):
        parse_assignments(["train.steps=[1"])


def test_cli_set_reaches_the_config(tmp_path, capsys):
    """`synreal run --set` with a bad key stops before any work, naming the key."""
    from synreal_ray.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "out")}))
    assert main(["run", "--config", str(config), "--set", "kliep.centres=5"]) == 2
    assert "kliep.centres: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
