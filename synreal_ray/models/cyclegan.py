"""CycleGAN (Zhu, Park, Isola, Efros 2017) with importance-weighted losses (eq. 12 of the
KLIEP-GAN paper, which is this model's objective with per-sample weights).

Architecture and defaults from the CycleGAN paper (section 4 and appendix 7.2) and its official
code (junyanz/pytorch-CycleGAN-and-pix2pix):
- ResNet generator c7s1-64, d128, d256, R256 x n_res, u128, u64, c7s1-3 (tanh), reflection
  padding, InstanceNorm; n_res 9 for 256-pixel images (6 for 128);
- 70x70 PatchGAN discriminator C64-C128-C256-C512 (LeakyReLU 0.2, no norm on C64);
- LSGAN objective, discriminator loss halved; lambda_cyc 10; identity loss weight
  0.5 * lambda_cyc; image pool of 50; Adam lr 2e-4, betas (0.5, 0.999); N(0, 0.02) init.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Fakes, TranslationModel, constructor_args
from .blocks import ConvBlock, ImagePool, PatchDiscriminator, UpBlock, init_weights, res_blocks
from .losses import l1_per_sample, lsgan_loss, weighted_mean


class ResnetGenerator(nn.Sequential):
    """c7s1-C, then n_downsample stride-2 3x3 convs doubling the width, n_res residual blocks,
    n_downsample transposed convs back, c7s1-3 with tanh. H and W must be divisible by
    2**n_downsample."""

    def __init__(self, base_channels: int = 64, n_downsample: int = 2, n_res: int = 9, channels: int = 3):
        layers: list[nn.Module] = [ConvBlock(channels, base_channels, 7)]
        ch = base_channels
        for _ in range(n_downsample):
            layers.append(ConvBlock(ch, ch * 2, 3, stride=2))
            ch *= 2
        layers.append(res_blocks(ch, n_res))
        for _ in range(n_downsample):
            layers.append(UpBlock(ch, ch // 2, mode="transpose"))
            ch //= 2
        layers.append(ConvBlock(ch, channels, 7, norm="none", act="tanh"))
        super().__init__(*layers)


class CycleGAN(TranslationModel):
    """Generators "s2r" (synthetic -> real) and "r2s"; discriminators "real" and "syn"."""

    default_lr = 2e-4
    default_weight_decay = 0.0
    dis_scale = 0.5  # official code: loss_D = (loss_D_real + loss_D_fake) * 0.5
    option_minimums = {"base_channels": 1, "n_downsample": 0, "n_res": 0, "dis_channels": 1, "dis_layers": 1,
                       "cyc_w": 0, "idt_w": 0, "pool_size": 0}

    @classmethod
    def _dis_min_size(cls, dis_layers: int, **_) -> int:
        return PatchDiscriminator.min_size(n_down=dis_layers, n_flat=1, out_kernel=4)

    @classmethod
    def _dis_why(cls, dis_layers: int, **_) -> str:
        least = cls._dis_min_size(dis_layers) // 2**dis_layers
        return f"the discriminator's dis_layers={dis_layers} stride-2 layers need side / {2**dis_layers} >= {least} pixels"

    def __init__(
        self,
        base_channels: int = 64,
        n_downsample: int = 2,
        n_res: int = 9,
        dis_channels: int | None = None,
        dis_layers: int = 3,
        cyc_w: float = 10.0,
        idt_w: float = 0.5,
        pool_size: int = 50,
        pool_seed: int | None = None,
    ):
        """dis_layers: stride-2 layers of the PatchGAN (3: 70x70 patches). idt_w: identity loss
        weight as a fraction of cyc_w (0 turns the identity loss off). pool_seed: the image pools'
        choices; None draws it from torch's generator, so a run seeded with torch.manual_seed
        repeats itself. Image sides: see `image_size_rule`."""
        self.check_options(**constructor_args(locals()))
        super().__init__()
        self.cyc_w, self.idt_w = cyc_w, idt_w
        self.generators = nn.ModuleDict(
            {k: ResnetGenerator(base_channels, n_downsample, n_res) for k in ("s2r", "r2s")}
        )
        dis = dis_channels or base_channels
        self.discriminators = nn.ModuleDict(
            {k: PatchDiscriminator(dis, n_down=dis_layers, n_flat=1) for k in ("syn", "real")}
        )
        init_weights(self, "normal")
        # Pools of fakes per domain; each worker keeps its own, not checkpointed (see ImagePool).
        if pool_seed is None:
            pool_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.pools = {k: ImagePool(pool_size, s) for k, s in zip(("syn", "real"), (pool_seed, pool_seed + 1))}

    def gen_losses(self, x_syn: Tensor, x_real: Tensor, w_syn: Tensor, w_real: Tensor) -> tuple[dict[str, Tensor], Fakes]:
        g_s2r, g_r2s = self._g("s2r"), self._g("r2s")
        fake_real = g_s2r(x_syn)
        fake_syn = g_r2s(x_real)
        out = {
            # a fake inherits the weight of the sample it was generated from (eq. 12)
            "gen_adv_s2r": weighted_mean(lsgan_loss(self._d("real")(fake_real), True), w_syn),
            "gen_adv_r2s": weighted_mean(lsgan_loss(self._d("syn")(fake_syn), True), w_real),
            "cyc_syn": weighted_mean(l1_per_sample(g_r2s(fake_real), x_syn), w_syn),
            "cyc_real": weighted_mean(l1_per_sample(g_s2r(fake_syn), x_real), w_real),
        }
        total = out["gen_adv_s2r"] + out["gen_adv_r2s"] + self.cyc_w * (out["cyc_syn"] + out["cyc_real"])
        if self.idt_w > 0:
            # identity: a generator fed an image already of its output domain should not change it
            out["idt_syn"] = weighted_mean(l1_per_sample(g_r2s(x_syn), x_syn), w_syn)
            out["idt_real"] = weighted_mean(l1_per_sample(g_s2r(x_real), x_real), w_real)
            total = total + self.idt_w * self.cyc_w * (out["idt_syn"] + out["idt_real"])
        out["gen_total"] = total
        return out, {"real": (fake_real, w_syn), "syn": (fake_syn, w_real)}

    def pool_fakes(self, fakes: Fakes) -> Fakes:
        return {k: self.pools[k].query(img, w) for k, (img, w) in fakes.items()}

    def translate_module(self) -> nn.Module:
        return self.generators["s2r"]
