"""One config layer: YAML (local or s3://) -> typed, validated, frozen dataclasses.

    cfg = load_config("configs/demo.yaml", TrainConfig, section="train")
    cfg = apply_overrides(cfg, {"steps": 100, "model_config.base_channels": 16})   # CLI flags

`from_dict` walks a dataclass's fields: unknown keys are errors naming the key, its path and the
allowed keys; values are checked against the field's type (int, float (an int is accepted), str,
bool, Optional, Literal choices, tuple/list, dict, nested dataclasses); then the dataclass's own
`__post_init__` checks values. A `__post_init__` names the offending key by raising
`ConfigError(message, key="batch_size")`: the error then reads `train.batch_size: message`.

Paths are resolved here, once, at the door: a field typed `URI` (or `URI | None`) holds a local
path or an `s3://` URI, and `convert` makes a local one absolute against the working directory of
the process that reads the config. Everything handed to Ray (tasks, actors, Train workers, Tune
trials, each of which runs in a working directory of its own) is therefore absolute; no stage
resolves paths itself.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import yaml

from synreal_ray import storage


class ConfigError(ValueError):
    """A bad config value or key. `key` (relative to the dataclass that raised it) is prefixed
    with the path of that dataclass by `from_dict`."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message, self.key = message, key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


_URI_MARK = "uri"
URI = Annotated[str, _URI_MARK]
"""A config field holding a local path or an `s3://` URI; `convert` makes local paths absolute."""


def check_pool_keys(cfg: Any) -> None:
    """The keys of the stages that run a dataset through an actor pool (fid, translate, seg-eval):
    `batch_size`, `actors`, `in_process_max` and `device` (cluster.DEVICES)."""
    from synreal_ray.cluster import DEVICES

    if cfg.batch_size < 1:
        raise ConfigError(f"must be >= 1, got {cfg.batch_size}", "batch_size")
    if cfg.actors is not None and cfg.actors < 1:
        raise ConfigError(f"must be >= 1 or null (one per GPU, else CPUs / 2), got {cfg.actors}", "actors")
    if cfg.in_process_max < 0:
        raise ConfigError(f"must be >= 0, got {cfg.in_process_max}", "in_process_max")
    if cfg.device not in DEVICES:
        raise ConfigError(f"{cfg.device!r} is not one of {', '.join(DEVICES)}", "device")


def absolute_uri(value: str, where: str | None = None) -> str:
    """A local path made absolute (against the current working directory, `~` expanded); a URI
    with a scheme (`s3://...`) is returned as it is (the storage layer rejects unknown schemes)."""
    if not isinstance(value, str):
        raise ConfigError(f"expected a path or s3:// URI, got {value!r}", where)
    if not value.strip():
        raise ConfigError("empty path (an unset variable?)", where)
    if "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def _is_uri_type(tp: Any) -> bool:
    """Whether `tp` is URI, or a Union (Optional) with a URI arm."""
    if typing.get_origin(tp) is Annotated:
        return _URI_MARK in typing.get_args(tp)[1:]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_uri_type(a) for a in typing.get_args(tp))
    return False


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(tp: Any, value: Any, where: str) -> Any:
    """`value` checked (and normalised: int -> float, list -> tuple) against type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = convert(args[0], value, where)
        return absolute_uri(value, where) if _URI_MARK in args[1:] else value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own, more precise error
            return convert(arms[0], value, where)
        for arm in arms:
            try:
                return convert(arm, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}", where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{value!r} is not one of {', '.join(map(repr, args))}", where)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", where)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} items, got {len(value)}", where)
            items = [convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", where)
        vt = args[1] if args else Any
        return {str(k): convert(vt, v, _path(where, str(k))) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", where)


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """An instance of dataclass `cls` from a mapping (None = all defaults); see the module doc."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of {cls.__name__} keys, got {data!r}", where or None)
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: keep the URI marker
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key; allowed keys: {', '.join(sorted(fields))}", _path(where, str(key)))
    missing = [k for k, f in fields.items() if k not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("missing required key", _path(where, missing[0]))
    kwargs = {k: convert(hints[k], v, _path(where, k)) for k, v in data.items()}
    for k, f in fields.items():  # a default path ("out/train") is made absolute like a given one
        if k not in kwargs and _is_uri_type(hints[k]) and isinstance(f.default, str):
            kwargs[k] = convert(hints[k], f.default, _path(where, k))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(e.message, _path(where, e.key) if e.key else where or None) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e), where or None) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-able) dict of a config dataclass; `from_dict` reads it back."""
    return dataclasses.asdict(cfg)


def parse_yaml(text: bytes | str, uri: str) -> Any:
    """YAML text read from `uri` -> Python objects. A syntax error is one line naming the file,
    the line and column and the problem (not PyYAML's multi-line dump of the source)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        if mark is not None and problem:
            context = getattr(e, "context", None)
            what = f"{context}: {problem}" if context else problem
            message = f"{uri}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {what}"
        else:
            message = f"{uri}: not valid YAML: {e}"
        raise ConfigError(" ".join(message.split())) from None


def load_config(uri: str, cls: type, section: str | None = None) -> Any:
    """Read a YAML file (local or s3://) into `cls`. With `section`, only that top-level key is
    read (other stages own the other sections); the file must have it."""
    doc = parse_yaml(storage.read_bytes(uri), uri)
    if section is not None:
        if not isinstance(doc, Mapping) or section not in doc:
            found = ", ".join(map(str, doc)) if isinstance(doc, Mapping) else "no mapping"
            raise ConfigError(f"{uri}: no '{section}:' section (found: {found or 'nothing'})")
        doc = doc[section]
    try:
        return from_dict(cls, doc, section or "")
    except ConfigError as e:
        raise ConfigError(f"{uri}: {e}") from None


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of `cfg` with dotted keys replaced ("steps", "model_config.base_channels"), then
    validated again. None values are skipped: a command-line flag that was not given."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                raise ConfigError("not a section", ".".join(parents[: i + 1]))
            node = child
        node[leaf] = value
    return from_dict(type(cfg), data)


def set_dotted(doc: dict, key: str, value: Any) -> None:
    """Set `key` ("train.steps", "tune.space.k") in a nested mapping, creating missing sections."""
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError("not a config key (empty part)", key)
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"is {child!r}, not a section: cannot set {key}", ".".join(parts[: i + 1]))
        node = child
    node[parts[-1]] = value


def parse_assignments(items: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """`["train.steps=20", "tune.milestones=[5]"]` (repeatable `--set KEY=VALUE` flags) as
    {dotted key: value}; each value is read as YAML (`20` an int, `[5]` a list, `null` None)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} train.steps=20")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{text!r} is not a YAML value ({str(e).splitlines()[0]}) in {flag}", key) from None
    return out
