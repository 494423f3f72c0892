"""The config layer: YAML -> typed, validated dataclasses; unknown keys and bad values named."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

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
    size: Optional[int] = None
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
