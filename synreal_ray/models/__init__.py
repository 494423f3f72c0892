"""Unpaired synthetic -> real translation models (plain PyTorch) with importance-weighted losses.

    model = build_model("cyclegan", base_channels=64)       # or "unit"
    model.to(device).wrap(ray.train.torch.prepare_model)     # optional: DDP per submodule
    opts = model.make_optimizers()                           # {"gen": Adam, "dis": Adam}
    scheds = model.make_schedulers(opts, total_steps, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)  # cfg: TrainConfig
    losses = model.train_step(x_syn, x_real, w_syn, w_real, opts, scaler, amp=True)
    x_fake_real = model.translate(x_syn)
    torch.save(model.generator_s2r().state_dict(), path)

Images are float tensors in [-1, 1] of shape (B, 3, H, W) with H, W divisible by
2**n_downsample and large enough for the discriminators (`image_size_rule` computes both from
the options; the config layer checks them before training); weights are (B,) floats.
"""

from __future__ import annotations

import inspect
from typing import Any

from .base import OptionError, TranslationModel, unwrap
from .cyclegan import CycleGAN
from .unit import UNIT

MODELS: dict[str, type[TranslationModel]] = {"unit": UNIT, "cyclegan": CycleGAN}


def default_config(name: str) -> dict[str, Any]:
    """The constructor keyword arguments of model `name` with their defaults (for config
    validation and documentation)."""
    cls = _model_class(name)
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def build_model(name: str, **cfg: Any) -> TranslationModel:
    """A model by name ("unit" or "cyclegan"); unknown config keys raise a ValueError naming the
    accepted ones."""
    cls = _model_class(name)
    unknown = sorted(set(cfg) - set(default_config(name)))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; accepted: {sorted(default_config(name))}")
    return cls(**cfg)


def check_options(name: str, **cfg: Any) -> None:
    """Raise OptionError (a ValueError naming the option) when a build_model option of model
    `name` is out of range; what the constructor checks, without building anything."""
    _model_class(name).check_options(**{**default_config(name), **cfg})


def image_size_rule(name: str, **cfg: Any) -> tuple[int, int, str]:
    """(multiple, minimum, why): every side of a training image for model `name` with these
    build_model options must be a multiple of `multiple` and at least `minimum` pixels; `why`
    says which options bind the minimum. Options must be in range (`check_options`)."""
    return _model_class(name).image_size_rule(**{**default_config(name), **cfg})


def check_checkpoint_version(name: str, version: int | None, where: str) -> None:
    """Raise ValueError (one line, naming `where`) when a checkpoint of model `name` keeps its
    parameters in another layout than this code's `checkpoint_version` (None: a checkpoint from
    before versions were recorded, version 1), instead of load_state_dict's list of keys."""
    cls = _model_class(name)
    have = 1 if version is None else int(version)
    if have != cls.checkpoint_version:
        raise ValueError(f"{where}: a {name} checkpoint of version {have}, this code loads version "
                         f"{cls.checkpoint_version} ({cls.version_note}): train again, or load it with the "
                         f"code that wrote it")


def _model_class(name: str) -> type[TranslationModel]:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None


__all__ = ["MODELS", "CycleGAN", "OptionError", "TranslationModel", "UNIT", "build_model", "check_checkpoint_version",
           "check_options", "default_config", "image_size_rule", "unwrap"]
