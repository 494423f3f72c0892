"""The interface shared by UNIT and CycleGAN: optimisers, schedulers, one training step,
DDP wrapping, translation.

Domains are named "syn" (synthetic, weights w_syn) and "real" (weights w_real). Subclasses build
`self.generators` and `self.discriminators` (nn.ModuleDict; the discriminators are keyed by the
domain they judge) and implement `gen_losses` and `translate_module`.

Training step, and why in this order (works with plain modules and with DDP-wrapped ones):
  1. generator phase: the generators produce the fakes, the generator losses are computed
     (through the discriminators, for the adversarial terms), backward, generator step;
  2. discriminator phase: the discriminators score the real images and the *detached* fakes of
     phase 1 (through the image pool for CycleGAN), backward, discriminator step.
DDP synchronises a module's gradients in the backward that follows its forward. Each phase
therefore runs its own forwards and then one backward; computing both phases' losses first and
back-propagating twice would leave the second backward's discriminator gradients un-reduced
(DDP ignores gradient hooks after its first backward until the next forward). Phase 1 also
computes (and all-reduces) discriminator gradients, which are discarded (zeroed) before phase 2:
the simple, DDP-safe price for not toggling requires_grad, which DDP does not allow between
iterations (it expects a gradient for every parameter it was built with).
Reusing phase 1's fakes in phase 2 (as the official CycleGAN does) saves one generator forward;
the official UNIT code instead updates the discriminators first on fresh fakes: the difference
is one generator step of staleness in the fakes the discriminators see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .losses import lsgan_loss, weighted_mean

# domain -> (generated images of that domain, weights of the samples they were generated from)
Fakes = dict[str, tuple[Tensor, Tensor]]


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP (`.module`) or torch.compile (`._orig_mod`) wrapper."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def as_weights(w: Tensor | None, x: Tensor) -> Tensor:
    """(B,) float32 weights on x's device; None means weighting off (all ones)."""
    if w is None:
        return torch.ones(x.shape[0], device=x.device)
    w = torch.as_tensor(w, dtype=torch.float32, device=x.device)
    if w.shape != (x.shape[0],):
        raise ValueError(f"weights of shape {tuple(w.shape)} for a batch of {x.shape[0]} images")
    return w


class OptionError(ValueError):
    """A model option (a constructor / `build_model` keyword argument) out of range."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


def constructor_args(frame_locals: dict) -> dict:
    """A constructor's arguments from its `locals()` taken on entry (for `check_options`)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class TranslationModel(nn.Module):
    """Generators + discriminators of an unpaired synthetic <-> real translation GAN."""

    default_lr: float = 2e-4
    default_weight_decay: float = 0.0
    # factor on each discriminator's (real + fake) loss: CycleGAN halves it, UNIT sets it to gan_w
    dis_scale: float = 1.0
    # learning-rate policy (`make_schedulers`): "linear" (CycleGAN) or "step" (UNIT)
    lr_policy: str = "linear"
    # layout of the parameters in a checkpoint; raised when a change makes older checkpoints unloadable
    # (their meta.json / state.pt without "checkpoint_version" are version 1); see `version_note`
    checkpoint_version: int = 1
    version_note: str = ""
    # constructor option -> smallest value it takes (None, where allowed, means "the default")
    option_minimums: dict[str, float] = {}

    generators: nn.ModuleDict
    discriminators: nn.ModuleDict

    # -- option and image-size rules (checked by the constructor, and by the config layer before
    #    any worker builds the model) --------------------------------------------------------
    @classmethod
    def check_options(cls, **options) -> None:
        """Raise OptionError for an option out of its range. Subclasses add their cross-option rules."""
        for key, low in cls.option_minimums.items():
            value = options.get(key)
            if value is not None and value < low:
                raise OptionError(key, f"must be >= {low}, got {value}")

    @classmethod
    def image_size_rule(cls, **options) -> tuple[int, int, str]:
        """(multiple, minimum, why) for every side of a training image, given all constructor
        options: the generators halve a side n_downsample times and double it back, so it must be a
        multiple of 2**n_downsample; it must be at least `minimum` pixels for every layer to keep a
        valid input (`why`: which options bind). See `_dis_min_size` and `_gen_min_size`."""
        multiple = 2 ** options["n_downsample"]
        gen, dis = cls._gen_min_size(**options), cls._dis_min_size(**options)
        raw = max(gen, dis)
        minimum = -(-raw // multiple) * multiple  # the smallest multiple of `multiple` >= raw
        why = cls._dis_why(**options) if dis >= gen else cls._gen_why(**options)
        return multiple, minimum, why

    @classmethod
    def _gen_min_size(cls, n_downsample: int, **_) -> int:
        # the 7x7 convs' reflection padding 3 needs >= 4 pixels; at the bottleneck (side / 2**n)
        # the residual blocks' reflection padding and InstanceNorm need >= 2
        return max(4, 2 ** (n_downsample + 1))

    @classmethod
    def _gen_why(cls, n_downsample: int, **_) -> str:
        if 2 ** (n_downsample + 1) < 4:
            return "the generators' 7x7 convolutions need >= 4 pixels"
        return f"the generators' n_downsample={n_downsample}: side / {2**n_downsample} must be >= 2 pixels"

    @classmethod
    def _dis_min_size(cls, **options) -> int:
        raise NotImplementedError

    @classmethod
    def _dis_why(cls, **options) -> str:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        # Wrapped callables (e.g. DDP) by "gen.<name>"/"dis.<name>". A plain dict, not registered
        # submodules: state_dict() keeps the plain modules' keys (no "module." prefixes), so a
        # checkpoint loads into a model whether or not it is wrapped.
        self._wrapped: dict[str, nn.Module] = {}

    # -- submodules -----------------------------------------------------------------------
    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> TranslationModel:
        """Apply fn (e.g. `ray.train.torch.prepare_model`) to every generator and discriminator
        submodule, and run them through the wrappers from now on.

        Each trainable submodule is wrapped on its own (disjoint parameter sets: UNIT's shared
        encoder/decoder layers are their own submodules, never inside two DDP wrappers). fn must
        wrap the module in place (DDP keeps a reference, `.to(device)` moves it in place), so the
        optimisers and state_dict() keep seeing the same parameters: checked here. Do not move
        the model to another device after wrapping. Submodules without parameters (UNIT with
        n_shared=0) are left alone: DDP refuses them.
        """
        for prefix, group in (("gen", self.generators), ("dis", self.discriminators)):
            for name, module in group.items():
                if not any(p.requires_grad for p in module.parameters()):
                    continue
                wrapped = fn(module)
                if unwrap(wrapped) is not module:
                    raise ValueError(f"wrap: fn returned a copy of {prefix}.{name}, not a wrapper around it")
                self._wrapped[f"{prefix}.{name}"] = wrapped
        return self

    def _g(self, name: str) -> nn.Module:
        return self._wrapped.get(f"gen.{name}", self.generators[name])

    def _d(self, name: str) -> nn.Module:
        return self._wrapped.get(f"dis.{name}", self.discriminators[name])

    # -- optimisation ---------------------------------------------------------------------
    def make_optimizers(
        self,
        lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float | None = None,
    ) -> dict[str, torch.optim.Optimizer]:
        """Adam for all generator parameters ("gen") and all discriminator parameters ("dis");
        lr and weight_decay default to the model's paper/official values."""
        lr = self.default_lr if lr is None else lr
        wd = self.default_weight_decay if weight_decay is None else weight_decay
        return {
            "gen": torch.optim.Adam(self.generators.parameters(), lr=lr, betas=betas, weight_decay=wd),
            "dis": torch.optim.Adam(self.discriminators.parameters(), lr=lr, betas=betas, weight_decay=wd),
        }

    def make_schedulers(
        self,
        opts: dict[str, torch.optim.Optimizer],
        total_steps: int,
        *,
        step_size: int | None = None,
        gamma: float | None = None,
        decay_start: int | None = None,
    ) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """The model's learning-rate policy (`lr_policy`); step them once per train_step.

        "linear" (CycleGAN's): constant lr, then linear decay to 0 at total_steps (decay_start
        defaults to half-way); step_size and gamma are not used.
        "step" (UNIT's official `lr_policy: step`, utils.get_scheduler's StepLR): the lr of step i
        (0-based) is lr * gamma ** (i // step_size); total_steps is not used. step_size and gamma
        have no default here: the train stage's TrainConfig (lr_step_size, lr_gamma) holds them."""
        if self.lr_policy == "step":
            if step_size is None or gamma is None:
                raise ValueError(f"{type(self).__name__}'s step lr schedule needs step_size and gamma")
            return {k: torch.optim.lr_scheduler.StepLR(opt, step_size, gamma) for k, opt in opts.items()}
        start = total_steps // 2 if decay_start is None else decay_start
        span = max(1, total_steps - start)

        def factor(step: int) -> float:
            return 1.0 if step < start else max(0.0, (total_steps - step) / span)

        return {k: torch.optim.lr_scheduler.LambdaLR(opt, factor) for k, opt in opts.items()}

    # -- losses ---------------------------------------------------------------------------
    def gen_losses(self, x_syn: Tensor, x_real: Tensor, w_syn: Tensor, w_real: Tensor) -> tuple[dict[str, Tensor], Fakes]:
        """Generator loss terms (with "gen_total") and the fakes for the discriminators."""
        raise NotImplementedError

    def pool_fakes(self, fakes: Fakes) -> Fakes:
        """Hook for CycleGAN's image pool; identity otherwise."""
        return fakes

    def dis_losses(self, x_syn: Tensor, x_real: Tensor, w_syn: Tensor, w_real: Tensor, fakes: Fakes) -> dict[str, Tensor]:
        """LSGAN discriminator losses: real images of a domain (their own weights) -> 1, fakes of
        that domain (the weights of the samples they come from) -> 0; a multi-scale
        discriminator's terms summed over its scales (`lsgan_loss`); times `dis_scale`."""
        out = {}
        for domain, x, w in (("syn", x_syn, w_syn), ("real", x_real, w_real)):
            d = self._d(domain)
            fake, w_fake = fakes[domain]
            loss = weighted_mean(lsgan_loss(d(x), True), w) + weighted_mean(lsgan_loss(d(fake.detach()), False), w_fake)
            out[f"dis_{domain}"] = self.dis_scale * loss
        out["dis_total"] = out["dis_syn"] + out["dis_real"]
        return out

    def compute_losses(
        self, x_syn: Tensor, x_real: Tensor, w_syn: Tensor | None = None, w_real: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Every loss term as a scalar tensor, as train_step computes them but without the
        image pool (a pure function of the batch, the parameters and the RNG). "gen_total" is
        what the generators minimise, "dis_total" what the discriminators minimise.
        Weights None = weighting off (all ones)."""
        w_syn, w_real = as_weights(w_syn, x_syn), as_weights(w_real, x_real)
        g, fakes = self.gen_losses(x_syn, x_real, w_syn, w_real)
        return {**g, **self.dis_losses(x_syn, x_real, w_syn, w_real, fakes)}

    def train_step(
        self,
        x_syn: Tensor,
        x_real: Tensor,
        w_syn: Tensor | None,
        w_real: Tensor | None,
        opts: dict[str, torch.optim.Optimizer],
        scaler: torch.amp.GradScaler | None = None,
        amp: bool = False,
    ) -> dict[str, float]:
        """One generator update then one discriminator update (see the module docstring);
        returns every loss term by name. amp=True autocasts to fp16 on CUDA (ignored on CPU),
        with `scaler` (a torch.amp.GradScaler, updated once per step) scaling both losses."""
        self.train()
        use_amp = amp and x_syn.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
        scaler = scaler if use_amp else None
        w_syn, w_real = as_weights(w_syn, x_syn), as_weights(w_real, x_real)

        with autocast:
            g, fakes = self.gen_losses(x_syn, x_real, w_syn, w_real)
        self._update(g["gen_total"], opts["gen"], scaler)

        fakes = self.pool_fakes({k: (img.detach(), w) for k, (img, w) in fakes.items()})
        with autocast:
            d = self.dis_losses(x_syn, x_real, w_syn, w_real, fakes)
        self._update(d["dis_total"], opts["dis"], scaler)
        if scaler is not None:
            scaler.update()

        losses = {**g, **d}
        # one device->host copy for all terms instead of one sync per .item()
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
        return dict(zip(losses, values))

    @staticmethod
    def _update(loss: Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        # set_to_none also drops the discriminator gradients left by the generator phase
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)

    # -- inference ------------------------------------------------------------------------
    def translate_module(self) -> nn.Module:
        """The synthetic -> real generator as plain (unwrapped) modules sharing this model's
        parameters."""
        raise NotImplementedError

    def generator_s2r(self) -> nn.Module:
        """The synthetic -> real generator, to save alone (`.state_dict()`) or to run for
        translation. It shares this model's parameters; copy.deepcopy it to detach it."""
        return self.translate_module()

    @torch.no_grad()
    def translate(self, x_syn: Tensor) -> Tensor:
        """Synthetic images in [-1, 1] -> real-looking images in [-1, 1], deterministic.

        Runs the plain modules, never the DDP wrappers: no collective op, so one worker alone
        can translate (e.g. to draw a grid). Restores the previous train/eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self.translate_module()(x_syn)
        finally:
            self.train(was_training)

    def forward(self, x_syn: Tensor) -> Tensor:
        """Synthetic -> real translation with autograd (train or eval mode as set)."""
        return self.translate_module()(x_syn)
