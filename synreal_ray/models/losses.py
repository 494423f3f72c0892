"""Per-sample losses and the importance-weighted batch mean.

Eq. 12 of the KLIEP-GAN paper (../shared/papers/001_*, section III.D) weights every loss term
of a synthetic sample by its importance w_syn = omega(x_s) and every term of a real sample by
w_real = psi(x_r). A weight can only be applied to a per-sample value, so every function here
reduces over all dimensions but the batch one and returns shape (B,); `weighted_mean` then
turns (B,) losses and (B,) weights into the scalar that is back-propagated.

Half-precision inputs are reduced in float32 (`_upcast`), so the squared errors do not
overflow under fp16 autocast; float64 stays float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def lsgan_loss(pred: Tensor | Sequence[Tensor], target_is_real: bool) -> Tensor:
    """Least-squares GAN loss per sample, (B,).

    `pred` is one discriminator output (B, 1, h, w) or, for a multi-scale discriminator, a
    list of them (one per scale, different h, w): the per-sample loss is then the SUM over
    scales of each scale's mean squared error, as the official UNIT code (networks.py,
    MsImageDis.calc_gen_loss / calc_dis_loss: `loss += torch.mean((out - target)**2)` per
    scale), so with 3 scales the adversarial term weighs 3 times a single-scale one.
    """
    preds = [pred] if isinstance(pred, Tensor) else list(pred)
    target = 1.0 if target_is_real else 0.0
    per_scale = [_per_sample_mean((_upcast(p) - target) ** 2) for p in preds]
    return torch.stack(per_scale).sum(0)


def l1_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute error per sample, (B,)."""
    return _per_sample_mean((_upcast(a) - _upcast(b)).abs())


def kl_per_sample(mu: Tensor) -> Tensor:
    """UNIT's KL term per sample, (B,).

    UNIT's encoders output only the mean of q(z|x) and fix its variance to 1; KL(N(mu, I) || N(0, I))
    is then 0.5 * ||mu||^2, and UNIT drops the constant: the mean of mu^2.
    """
    return _per_sample_mean(_upcast(mu) ** 2)


def weighted_mean(per_sample: Tensor, w: Tensor | None) -> Tensor:
    """sum_i w_i * l_i / B: the importance-weighted batch loss (w=None: the plain mean).

    Why divide by the batch size B and not by sum(w):
    - it is the importance-sampling estimate E_s[omega(x) l(x)] = E_r[l(x)], and the KLIEP
      constraint (eq. 9) makes the weights average 1, so with all weights 1 it is exactly the
      unweighted baseline, and on average it has the baseline's scale;
    - a batch's gradient is proportional to its total importance: a batch of unimportant samples
      moves the model little, instead of being renormalised up to a full step (the loss scale,
      hence the effective learning rate, would jump from batch to batch), and a batch whose
      weights are all 0 gives a 0 loss, not 0/0;
    - a sample of weight 0 contributes exactly 0 to the value and to every gradient;
    - under DDP each worker divides by the same B and the gradients are averaged, so the global
      loss is sum(w*l) / (B * workers) whatever the weights; a per-worker sum(w) would normalise
      each worker by a different number.
    """
    if w is None:
        return per_sample.mean()
    if w.shape != per_sample.shape:
        raise ValueError(f"weights of shape {tuple(w.shape)} for losses of shape {tuple(per_sample.shape)}")
    return (per_sample * w.to(per_sample.dtype)).sum() / per_sample.shape[0]
