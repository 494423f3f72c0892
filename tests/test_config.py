"""The config layer: YAML -> typed, validated dataclasses; unknown keys and bad values named."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from synreal_ray.config import ConfigError, apply_overrides, from_dict, load_config, to_dict


@dataclass(frozen=True)
class Inner:
    channels: int = 8
    scale: float = 1.0

    def __post_init__(self):
        if self.channels < 1:
            raise ConfigError(f"must be >= 1, got {self.channels}", "channels")


@dataclass(frozen=True)
class Outer:
    name: str
    kind: Literal["a", "b"] = "a"
    size: int | None = None
    flag: bool = False
    levels: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (1, "x")
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, float] = field(default_factory=dict)


def test_from_dict_converts_nested_sections_and_normalises_types():
    cfg = from_dict(Outer, {"name": "n", "kind": "b", "size": 3, "flag": True, "levels": [1, 2, 4],
                            "pair": [2, "y"], "inner": {"channels": 4, "scale": 2}, "extra": {"w": 1}})
    assert cfg == Outer("n", "b", 3, True, (1, 2, 4), (2, "y"), Inner(4, 2.0), {"w": 1.0})
    assert isinstance(cfg.inner.scale, float) and isinstance(cfg.extra["w"], float)  # int accepted as float
    assert from_dict(Outer, {"name": "n", "size": None}).size is None
    assert from_dict(Outer, to_dict(cfg)) == cfg  # round trip


@pytest.mark.parametrize("data, message", [
    ({"name": "n", "inner": {"chanels": 4}}, "outer.inner.chanels: unknown key; allowed keys: channels, scale"),
    ({"name": "n", "colour": 1}, "outer.colour: unknown key; allowed keys: extra, flag, inner, kind, levels, name"),
    ({}, "outer.name: missing required key"),
    ({"name": "n", "kind": "c"}, "outer.kind: 'c' is not one of 'a', 'b'"),
    ({"name": "n", "size": "3"}, "outer.size: expected int, got '3'"),
    ({"name": "n", "size": 2.5}, "outer.size: expected int, got 2.5"),
    ({"name": "n", "flag": 1}, "outer.flag: expected bool, got 1"),
    ({"name": "n", "size": True}, "outer.size: expected int, got True"),
    ({"name": "n", "levels": [1, "x"]}, "outer.levels[1]: expected int, got 'x'"),
    ({"name": "n", "pair": [1]}, "outer.pair: expected 2 items, got 1"),
    ({"name": "n", "inner": 3}, "outer.inner: expected a mapping of Inner keys, got 3"),
    ({"name": "n", "inner": {"channels": 0}}, "outer.inner.channels: must be >= 1, got 0"),
    ({"name": "n", "extra": {"w": "heavy"}}, "outer.extra.w: expected float, got 'heavy'"),
])
def test_errors_name_the_key_its_path_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, "outer")
    assert str(e.value).startswith(message)


def test_apply_overrides_sets_dotted_keys_and_validates_again():
    cfg = from_dict(Outer, {"name": "n"})
    new = apply_overrides(cfg, {"size": 5, "inner.channels": 16, "extra.w": 2, "kind": None})
    assert (new.size, new.inner.channels, new.extra, new.kind) == (5, 16, {"w": 2.0}, "a")
    assert cfg.size is None  # a copy
    with pytest.raises(ConfigError, match=r"^inner.chanels: unknown key"):
        apply_overrides(cfg, {"inner.chanels": 3})
    with pytest.raises(ConfigError, match=r"^inner.channels: must be >= 1"):
        apply_overrides(cfg, {"inner.channels": 0})
    with pytest.raises(ConfigError, match=r"^name: not a section"):
        apply_overrides(cfg, {"name.x": 1})


def test_load_config_reads_one_section_and_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("outer:\n  name: n\n  inner:\n    scale: 3\nother_stage:\n  anything: 1\n")
    assert load_config(str(path), Outer, "outer") == Outer("n", inner=Inner(scale=3.0))
    path.write_text("outer:\n  name: n\n  inner:\n    chanels: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: outer.inner.chanels: unknown key; allowed keys: channels, scale"):
        load_config(str(path), Outer, "outer")
    path.write_text("train:\n  name: n\n")
    with pytest.raises(ConfigError, match=r"no 'outer:' section \(found: train\)"):
        load_config(str(path), Outer, "outer")
    path.write_text("outer: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path), Outer, "outer")
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.yaml"), Outer, "outer")


def test_load_config_from_s3(s3_bucket):
    from synreal_ray import storage

    uri = f"{s3_bucket}/configs/c.yaml"
    storage.write_bytes(uri, b"outer:\n  name: remote\n  size: 7\n")
    assert load_config(uri, Outer, "outer") == Outer("remote", size=7)


def test_train_config_validates_values_and_model_options():
    from synreal_ray.train import TrainConfig

    cfg = from_dict(TrainConfig, {"model": "cyclegan", "model_config": {"base_channels": 8, "n_res": 2},
                                  "image_size": " 32 x 64", "batch_size": 4, "workers": 2}, "train")
    assert cfg.size == (32, 64) and cfg.image_size == "32x64"
    assert cfg.full_model_config()["base_channels"] == 8 and cfg.full_model_config()["n_downsample"] == 2
    bad = [
        ({"model_config": {"base_chanels": 8}}, "train.model_config.base_chanels: unknown unit option; allowed: "),
        ({"model_config": {"base_channels": 8.5}}, "train.model_config.base_channels: expected int, got 8.5"),
        ({"model": "pix2pix"}, "train.model: 'pix2pix' is not one of 'unit', 'cyclegan'"),
        ({"batch_size": 3, "workers": 2}, "train.batch_size: 3 does not split evenly over 2 workers"),
        ({"image_size": "30x64"}, "train.image_size: 30x64: both sides must be multiples of 4"),
        ({"image_size": "big"}, "train.image_size: 'big' is not HxW"),
        ({"pairing": "spfeat"}, "train.pairing: 'spfeat' pairing needs the pairs stage's output"),
        ({"steps": 0}, "train.steps: must be >= 1, got 0"),
        ({"syn_layout": "kitti"}, "train.syn_layout: 'kitti' is not one of"),
        ({"lr": -1}, "train.lr: must be > 0"),
        ({"real_random_share": 1.5}, "train.real_random_share: must be in [0, 1]"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError) as e:
            from_dict(TrainConfig, data, "train")
        assert str(e.value).startswith(message), (data, str(e.value))


# --- validation at the door: every section range-checked when the file loads -------------------

ONE_RUN = [{"name": "u", "model": "unit", "pairing": "spfeat", "weighting": "loss"}]


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return str(path)


def _dump(tmp_path, doc: dict) -> str:
    import yaml

    return _write(tmp_path, yaml.safe_dump(doc))


@pytest.mark.parametrize("doc, message", [
    ({"features": {"levels": "1,x"}}, "features.levels: bad SP-Feat level 'x'"),
    ({"features": {"levels": "1,0"}}, "features.levels: bad SP-Feat level '0': rows and columns must be >= 1"),
    ({"kliep": {"centers": 0}}, "kliep.centers: must be >= 1, got 0"),
    ({"kliep": {"sigma": 0}}, "kliep.sigma: must be a finite number > 0 or null"),
    ({"kliep": {"sigma": -0.5}}, "kliep.sigma: must be a finite number > 0 or null"),
    ({"kliep": {"folds": 1}}, "kliep.folds: must be >= 2, got 1"),
    ({"kliep": {"clip": 0.5}}, "kliep.clip: must be > 1"),
    ({"kliep": {"cv_samples": 3}}, "kliep.cv_samples: must be >= 10, got 3"),
    ({"pairs": {"k": 0}}, "pairs.k: must be >= 1, got 0"),
    ({"pairs": {"k": -3}}, "pairs.k: must be >= 1, got -3"),
    ({"pairs": {"max_distance": 0}}, "pairs.max_distance: must be > 0"),
    ({"train": {"image_size": "32x64"}}, "train (run u).image_size: 32x64 is too small for unit"),
    ({"models": {"unit": {"n_shared": 5}}}, "models.unit.n_shared: must be between 0 and n_res=4, got 5"),
    ({"models": {"unit": {"base_channels": 0}}}, "models.unit.base_channels: must be >= 1, got 0"),
    ({"models": {"cyclegan": {"dis_layers": 0}}}, "models.cyclegan.dis_layers: must be >= 1, got 0"),  # no run uses it
    ({"models": {"cyclegan": {"n_shared": 1}}}, "models.cyclegan.n_shared: unknown cyclegan option"),
    ({"translate": {"batch_size": 0}}, "translate.batch_size: must be >= 1, got 0"),
    ({"fid": {"size": "big"}}, "fid.size: 'big' is not HxW"),
    ({"fid": {"size": "0x10"}}, "fid.size: '0x10': both sides must be >= 1"),
    ({"fid": {"max_images": 1}}, "fid.max_images: must be >= 2"),
    ({"grid_images": 0}, "grid_images: must be >= 1, got 0"),
])
def test_pipeline_sections_are_range_checked_when_the_file_loads(tmp_path, doc, message):
    from synreal_ray.pipeline import load_pipeline_config

    path = _dump(tmp_path, {"runs": ONE_RUN, **doc})
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tune, message", [
    ({"space": {"k": [5, 0]}}, "tune.space.k[1]: must be >= 1, got 0"),
    ({"space": {"sigma": [None, -1.0]}}, "tune.space.sigma[1]: must be a finite number > 0 or null"),
    ({"space": {"levels": ["1,2", "2y8"]}}, "tune.space.levels[1]: bad SP-Feat level '2y8'"),
    ({"space": {"model": ["cyclegan", "unit"]}}, "tune.space.model[1]: train (run unit-loss).image_size: 32x64 is too small"),
    ({"val_images": 1}, "tune.val_images: must be >= 2, got 1"),
    ({"trial_cpus": 0}, "tune.trial_cpus: must be > 0, got 0.0"),
])
def test_sweep_values_are_checked_by_their_stage_when_the_file_loads(tmp_path, tune, message):
    from synreal_ray.tune import load_sweep_config

    runs = [{"name": "c", "model": "cyclegan"}]  # 32x64 suits CycleGAN, not UNIT's default discriminators
    path = _dump(tmp_path, {"train": {"image_size": "32x64"}, "runs": runs, "tune": tune})
    with pytest.raises(ConfigError) as e:
        load_sweep_config(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    from synreal_ray.cli import main
    from synreal_ray.pipeline import load_pipeline_config
    from synreal_ray.tune import load_sweep_config

    path = _write(tmp_path, "out: o\nkliep:\n  centers: [1, 2\n  folds: 3\n")
    expected = f"{path}: line 4, column 8: not valid YAML: while parsing a flow sequence: expected ',' or ']', but got ':'"
    for load in (load_pipeline_config, load_sweep_config, lambda p: load_config(p, Outer, "kliep")):
        with pytest.raises(ConfigError) as e:
            load(path)
        assert str(e.value) == expected
    assert main(["run", "--config", path]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    path = _write(tmp_path, "kliep:\n  centers: 0\n")  # a bad value through the CLI: one line too
    assert main(["run", "--config", path]) == 2
    assert capsys.readouterr().err == f"error: {path}: kliep.centers: must be >= 1, got 0\n"


def test_image_size_is_checked_against_the_model_when_the_config_loads():
    from synreal_ray.train import TrainConfig

    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, {"model": "unit", "image_size": "32x64"}, "train")
    assert str(e.value) == (
        "train.image_size: 32x64 is too small for unit: each side must be at least 64 and a multiple of 4 "
        "(dis_scales=3: the coarsest discriminator scale, side / 4, must be >= 16 pixels for dis_layers=4)")
    assert from_dict(TrainConfig, {"model": "unit", "image_size": "64x128"}, "train").size == (64, 128)
    # computed from the model's options, not fixed: fewer discriminator layers, smaller images
    small = {"dis_layers": 2, "dis_scales": 2}
    assert from_dict(TrainConfig, {"model": "unit", "image_size": "32x64", "model_config": small}).size == (32, 64)
    with pytest.raises(ConfigError, match=r"^image_size: 16x64 is too small for cyclegan: each side must be at "
                                          r"least 24 and a multiple of 4 \(the discriminator's dis_layers=3"):
        from_dict(TrainConfig, {"model": "cyclegan", "image_size": "16x64"})
    with pytest.raises(ConfigError, match=r"^image_size: 36x72: both sides must be multiples of 8"):
        from_dict(TrainConfig, {"model": "cyclegan", "image_size": "36x72", "model_config": {"n_downsample": 3}})


@pytest.mark.parametrize("name, options", [
    ("unit", {}),
    ("unit", {"dis_layers": 3, "dis_scales": 2}),
    ("unit", {"dis_layers": 1, "dis_scales": 1, "n_downsample": 3}),  # the generator binds
    ("cyclegan", {}),
    ("cyclegan", {"dis_layers": 4, "n_downsample": 1}),
])
def test_image_size_rule_is_what_a_real_training_forward_pass_accepts(name, options):
    """At the rule's minimum a training forward pass (generators and discriminators) works; one
    multiple smaller, in either direction, PyTorch fails. Tiny channels: a fraction of a second."""
    import torch

    from synreal_ray.models import build_model, image_size_rule

    step, minimum, _ = image_size_rule(name, **options)
    model = build_model(name, base_channels=2, dis_channels=2, n_res=1, **options).train()

    def forward(h, w):
        x, ones = torch.zeros(1, 3, h, w), torch.ones(1)
        with torch.no_grad():
            _, fakes = model.gen_losses(x, x, ones, ones)
            for domain, (fake, _) in fakes.items():
                model.discriminators[domain](fake)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add contention on a shared machine
    try:
        forward(minimum, minimum)
        for h, w in ((minimum - step, minimum), (minimum, minimum - step)):
            with pytest.raises((RuntimeError, ValueError)):
                forward(h, w)
    finally:
        torch.set_num_threads(threads)


def test_cli_train_with_a_too_small_image_size_fails_at_config_time_in_one_line():
    from conftest import run_cli

    p = run_cli("train", "--image-size", "32x64", check=False, timeout=120)
    assert p.returncode == 2
    assert p.stderr == ("error: image_size: 32x64 is too small for unit: each side must be at least 64 and a "
                        "multiple of 4 (dis_scales=3: the coarsest discriminator scale, side / 4, must be >= 16 "
                        "pixels for dis_layers=4)\n")
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.parametrize("stage", ["translate", "seg-eval"])
@pytest.mark.parametrize("key, value, message", [
    ("layout", "kitti", "layout: 'kitti' is not one of "),
    ("batch_size", 0, "batch_size: must be >= 1, got 0"),
    ("actors", 0, "actors: must be >= 1 or null"),
    ("in_process_max", -1, "in_process_max: must be >= 0, got -1"),
])
def test_actor_pool_stages_check_their_shared_keys_alike(stage, key, value, message):
    from synreal_ray.segment import SegEvalConfig
    from synreal_ray.translate import TranslateConfig

    cls, first = (TranslateConfig, "checkpoint") if stage == "translate" else (SegEvalConfig, "model")
    data = {first: "/m", "dataset": "/d", "layout": "synscapes", "out": "/o", key: value}
    with pytest.raises(ConfigError) as e:
        from_dict(cls, data, stage)
    assert message in str(e.value)
