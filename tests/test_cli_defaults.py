"""Each flag's default is its stage's: read from the config dataclass (issue 13), shown by --help.

No Ray: the parser is walked, and the stage functions are replaced by ones that stop at once."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect

import pytest

from synreal_ray import cli
from synreal_ray.datasets import demo as demo_data
from synreal_ray.features import FeaturesConfig
from synreal_ray.fid import FidConfig
from synreal_ray.pairing import PairsConfig
from synreal_ray.segment import SegEvalConfig, SegmentConfig
from synreal_ray.train import TrainConfig
from synreal_ray.translate import TranslateConfig
from synreal_ray.weighting import KliepConfig

# subcommand -> what holds its defaults; train and segment flags override a --config file instead
OWNERS = {"make-demo-data": demo_data.make_demo_data, "demo": demo_data.make_demo_data,
          "features": FeaturesConfig, "kliep": KliepConfig, "pairs": PairsConfig, "translate": TranslateConfig,
          "fid": FidConfig, "seg-eval": SegEvalConfig, "train": TrainConfig, "segment": SegmentConfig}
OVERRIDES = {"train", "segment"}
NO_CONFIG = {"run", "tune", "report"}  # whole-pipeline commands: their config file holds every setting
RENAMED = {("fid", "inception_weights"): "weights"}  # flag dest -> field, where they differ (cli._fid)
# per subcommand, the flags that set no field of its config (a new flag must map to a field or be listed)
NOT_FIELDS = {"make-demo-data": set(), "demo": {"config", "data", "out", "inception_weights", "set", "force"},
              "features": {"force"}, "kliep": {"force"}, "pairs": {"preview", "out_png", "force"},
              "translate": {"force"}, "fid": set(), "seg-eval": {"force"}, "train": {"config", "force"},
              "segment": {"config", "train", "train_layout", "train_split", "force"}}


def _defaults(owner) -> dict:
    """Plain defaults of a dataclass's fields or a function's parameters (none: not listed)."""
    if dataclasses.is_dataclass(owner):
        return {f.name: f.default for f in dataclasses.fields(owner) if f.default is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(owner).parameters.items() if p.default is not p.empty}


def _fields(owner) -> set:
    if dataclasses.is_dataclass(owner):
        return {f.name for f in dataclasses.fields(owner)}
    return set(inspect.signature(owner).parameters)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _flags(p: argparse.ArgumentParser):
    return [a for a in p._actions if a.option_strings and a.dest != "help"]


def test_every_subcommand_is_covered():
    assert set(_subparsers()) == set(OWNERS) | NO_CONFIG


@pytest.mark.parametrize("command", sorted(OWNERS))
def test_flag_defaults_are_the_dataclass_defaults(command):
    owner, p = OWNERS[command], _subparsers()[command]
    defaults, fields = _defaults(owner), _fields(owner)
    checked, problems = [], []
    for action in _flags(p):
        field = RENAMED.get((command, action.dest), action.dest)
        if action.required or field in NOT_FIELDS[command]:
            continue
        if field == "no_amp":  # the switch turns off `amp`, so amp must default to on
            checked.append(field)
            if defaults["amp"] is not True or action.default is not False:
                problems.append(f"--no-amp: default {action.default}, {owner.__name__}.amp {defaults['amp']}")
            continue
        if field not in fields:
            problems.append(f"{action.option_strings[0]}: not a field of {owner.__name__}, nor in NOT_FIELDS")
            continue
        checked.append(field)
        want = defaults[field]
        if command in OVERRIDES and action.nargs != 0:
            # None = not given: the --config file's value, else the dataclass default, which --help shows
            if action.default is not None:
                problems.append(f"{action.option_strings[0]}: default {action.default!r}, must be None "
                                "(it overrides --config)")
            if want is not None and f"default: {want}," not in action.help:
                problems.append(f"{action.option_strings[0]}: help {action.help!r} does not show default {want!r}")
            continue
        got = None if (command, field) == ("kliep", "sigma") and action.default == "auto" else action.default
        if got != want or type(got) is not type(want):
            problems.append(f"{action.option_strings[0]}: parser default {action.default!r} != "
                            f"{getattr(owner, '__name__', owner)} default {want!r}")
    assert not problems, f"synreal {command}:\n  " + "\n  ".join(problems)
    assert checked, f"synreal {command}: no flag maps to a field of {owner.__name__}"


class _Stop(Exception):
    """Raised where the stage would start: the values that reached it are recorded."""


def _required(owner) -> set:
    return _fields(owner) - set(_defaults(owner)) - {f.name for f in dataclasses.fields(owner)
                                                     if f.default_factory is not dataclasses.MISSING}


@pytest.mark.parametrize("argv, cls", [
    (["features", "--dataset", "d", "--layout", "folder", "--out", "o"], FeaturesConfig),
    (["kliep", "--syn", "s", "--real", "r", "--out", "o"], KliepConfig),
    (["pairs", "--syn", "s", "--real", "r", "--out", "o"], PairsConfig),
    (["translate", "--checkpoint", "c", "--dataset", "d", "--layout", "folder", "--out", "o"], TranslateConfig),
    (["fid", "--a", "a", "--b", "b"], FidConfig),
    (["seg-eval", "--model", "m", "--dataset", "d", "--layout", "folder", "--out", "o"], SegEvalConfig),
])
def test_what_the_cli_passes_to_a_stage_config_without_flags_is_its_defaults(monkeypatch, argv, cls):
    seen = {}

    def record(c, **values):
        seen.update(cls=c, values=values)
        raise _Stop

    monkeypatch.setattr(cli, "_config", record)
    with pytest.raises(_Stop):
        cli.main(argv)
    assert seen["cls"] is cls
    defaults = _defaults(cls)
    passed = {k: v for k, v in seen["values"].items() if k not in _required(cls)}
    assert passed, argv
    differ = {k: (v, defaults[k]) for k, v in passed.items() if v != defaults[k]}
    assert not differ, f"synreal {argv[0]}: value without the flag != {cls.__name__} default: {differ}"


def test_train_and_segment_without_flags_get_the_dataclass_defaults(monkeypatch, tmp_path):
    from synreal_ray import segment, train
    from synreal_ray.config import from_dict

    seen = {}

    def record(cfg, force=False):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(train, "run_train", record)
    monkeypatch.setattr(segment, "run_segment", record)
    with pytest.raises(_Stop):
        cli.main(["train"])
    assert seen["cfg"] == from_dict(TrainConfig, {})
    with pytest.raises(_Stop):
        cli.main(["segment", "--train", str(tmp_path), "--train-layout", "folder"])
    source = {"uri": str(tmp_path), "layout": "folder", "split": None, "share": 1.0}
    assert seen["cfg"] == from_dict(SegmentConfig, {"train": [source]})


@pytest.mark.parametrize("command", ["make-demo-data", "demo"])
def test_demo_data_sizes_default_to_make_demo_data_s(monkeypatch, tmp_path, command):
    seen = {}

    @functools.wraps(demo_data.make_demo_data)  # keeps its signature: the parser reads the defaults from it
    def record(out, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(demo_data, "make_demo_data", record)
    with pytest.raises(_Stop):
        cli.main([command, "--out" if command == "make-demo-data" else "--data", str(tmp_path / "d")])
    defaults = _defaults(demo_data.make_demo_data)
    assert seen and {k: defaults[k] for k in seen} == seen


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere between words


def test_kliep_help_shows_the_centers_default(capsys):
    text = _help(capsys, "kliep")
    assert f"--centers CENTERS number of Gaussian basis centres (default: {_defaults(KliepConfig)['centers']})" in text


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_shows_every_default(capsys, command):
    """Every optional value flag shows its default; a field's None default says what it means there."""
    text = _help(capsys, command)
    owner = OWNERS.get(command)
    defaults, fields = (_defaults(owner), _fields(owner)) if owner else ({}, set())
    missing = []
    for action in _flags(_subparsers()[command]):
        field = RENAMED.get((command, action.dest), action.dest)
        if action.required or action.nargs == 0:
            continue
        if action.default is not None:
            shown = f"default: {action.default}"
        elif field in fields and field not in NOT_FIELDS[command]:
            want = defaults.get(field)
            shown = "default" if want is None else f"default: {want},"  # train, segment: "or the --config's"
            if shown not in action.help:
                missing.append(f"{action.option_strings[0]} ({shown!r} not in its help: {action.help!r})")
            continue
        else:
            continue
        if shown not in text:
            missing.append(f"{action.option_strings[0]} ({shown})")
    assert not missing, f"synreal {command} --help lacks: {missing}"
