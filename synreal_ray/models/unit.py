"""UNIT (Liu, Breuel, Kautz 2017, "Unsupervised Image-to-Image Translation Networks") with
importance-weighted losses (eq. 12 of the KLIEP-GAN paper: each term of a synthetic sample
weighted by w_syn, of a real sample by w_real).

Shared latent space: each domain has an encoder E and a generator (decoder) G; the last layers
of E_syn and E_real are one shared module, as are the first layers of G_syn and G_real, so both
domains are encoded into, and decoded from, the same latent space. A latent code z = E(x) + n,
n ~ N(0, I) (the VAE with unit variance); translation s -> r is G_real(E_syn(x_syn)).
Architecture (official code, mingyuliutw/UNIT, configs/unit_gta2city_folder.yaml): c7s1-64, two
4x4 stride-2 convs, 4 residual blocks in E and in G, nearest up-sampling + 5x5 convs, reflection
padding, InstanceNorm, except LayerNorm in the decoder's up-sampling blocks (networks.py
`Decoder`: `Conv2dBlock(..., norm='ln')`; its own LayerNorm over C, H, W per sample with a
per-channel affine, `blocks.LayerNorm`); multi-scale (3 scales) LSGAN discriminators of four
stride-2 4x4 convs, no norm, LeakyReLU 0.2. The paper shares the last layer of E and the first
of G: n_shared=1 residual block here.

Adversarial losses as the official trainer.py / networks.py MsImageDis: the generator's LSGAN
term is SUMMED over the discriminator scales (calc_gen_loss), the discriminator's likewise
(calc_dis_loss: per scale mean((D(fake) - 0)^2) + mean((D(real) - 1)^2)), and the discriminators
minimise gan_w * (loss_dis_syn + loss_dis_real). Learning rate: the official `lr_policy: step`,
lr * gamma every step_size iterations (gamma 0.5, step_size 100000; TrainConfig.lr_gamma,
lr_step_size). Checkpoints written before the LayerNorm (no "checkpoint_version": version 1)
cannot load into this decoder: loading one fails with one line saying so.

Loss weights: the official code's config (verified in configs/unit_gta2city_folder.yaml):
gan_w 1, recon_x_w 10, recon_kl_w 0.01, recon_x_cyc_w 10, recon_kl_cyc_w 0.01 (recon_h_w 0),
Adam lr 1e-4, betas (0.5, 0.999), weight_decay 1e-4, Kaiming init. These are the paper's
lambda_0 = 10 (GAN), lambda_1 = lambda_3 = 0.1 (KL), lambda_2 = lambda_4 = 100 (reconstruction,
cycle) divided by 10: the same balance. The config's vgg_w 1 (a perceptual loss needing
pretrained VGG weights) is left out; the original paper has no such term.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .base import Fakes, OptionError, TranslationModel, constructor_args
from .blocks import ConvBlock, MultiScaleDiscriminator, UpBlock, init_weights, res_blocks
from .losses import kl_per_sample, l1_per_sample, lsgan_loss, weighted_mean

DOMAINS = ("syn", "real")


def private_encoder(base_channels: int, n_downsample: int, n_res: int) -> nn.Sequential:
    """c7s1-C, n_downsample 4x4 stride-2 convs doubling the width, n_res residual blocks."""
    layers: list[nn.Module] = [ConvBlock(3, base_channels, 7)]
    ch = base_channels
    for _ in range(n_downsample):
        layers.append(ConvBlock(ch, ch * 2, 4, stride=2, padding=1))
        ch *= 2
    layers.append(res_blocks(ch, n_res))
    return nn.Sequential(*layers)


def private_decoder(base_channels: int, n_downsample: int, n_res: int) -> nn.Sequential:
    """n_res residual blocks (InstanceNorm), n_downsample x2 up-samplings halving the width
    (LayerNorm, as the official Decoder), c7s1-3 tanh."""
    ch = base_channels * 2**n_downsample
    layers: list[nn.Module] = [res_blocks(ch, n_res)]
    for _ in range(n_downsample):
        layers.append(UpBlock(ch, ch // 2, mode="nearest", norm="ln"))
        ch //= 2
    layers.append(ConvBlock(ch, 3, 7, norm="none", act="tanh"))
    return nn.Sequential(*layers)


class UNIT(TranslationModel):
    """Generator submodules "enc_syn", "enc_real", "enc_shared", "dec_shared", "dec_syn",
    "dec_real" (each its own module, so DDP can wrap each once); discriminators "syn", "real"."""

    default_lr = 1e-4
    default_weight_decay = 1e-4
    lr_policy = "step"
    checkpoint_version = 2
    version_note = "version 2 has LayerNorm in the decoder's up-sampling blocks (issue 12)"
    option_minimums = {"base_channels": 1, "n_downsample": 0, "n_res": 0, "n_shared": 0, "dis_channels": 1,
                       "dis_layers": 1, "dis_scales": 1, "gan_w": 0, "recon_x_w": 0, "recon_kl_w": 0,
                       "recon_x_cyc_w": 0, "recon_kl_cyc_w": 0}

    @classmethod
    def check_options(cls, **options) -> None:
        super().check_options(**options)
        if options["n_shared"] > options["n_res"]:
            raise OptionError("n_shared", f"must be between 0 and n_res={options['n_res']}, got {options['n_shared']}")

    @classmethod
    def _dis_min_size(cls, dis_layers: int, dis_scales: int, **_) -> int:
        return MultiScaleDiscriminator.min_size(dis_scales, n_down=dis_layers, n_flat=0, out_kernel=1)

    @classmethod
    def _dis_why(cls, dis_layers: int, dis_scales: int, **_) -> str:
        return (f"dis_scales={dis_scales}: the coarsest discriminator scale, side / {2 ** (dis_scales - 1)}, "
                f"must be >= {2 ** dis_layers} pixels for dis_layers={dis_layers}")

    def __init__(
        self,
        base_channels: int = 64,
        n_downsample: int = 2,
        n_res: int = 4,
        n_shared: int = 1,
        dis_channels: int | None = None,
        dis_layers: int = 4,
        dis_scales: int = 3,
        gan_w: float = 1.0,
        recon_x_w: float = 10.0,
        recon_kl_w: float = 0.01,
        recon_x_cyc_w: float = 10.0,
        recon_kl_cyc_w: float = 0.01,
    ):
        """n_res residual blocks per encoder and per decoder, n_shared of them shared between the
        domains (the encoders' last, the decoders' first). dis_layers: stride-2 convs per scale;
        the coarsest scale must stay >= 2**dis_layers pixels (H / 2**(dis_scales-1)); see
        `image_size_rule`."""
        self.check_options(**constructor_args(locals()))
        super().__init__()
        self.gan_w, self.recon_x_w, self.recon_kl_w = gan_w, recon_x_w, recon_kl_w
        self.recon_x_cyc_w, self.recon_kl_cyc_w = recon_x_cyc_w, recon_kl_cyc_w
        self.dis_scale = gan_w  # official dis_update: loss_dis_total = gan_w * loss_dis_a + gan_w * loss_dis_b
        latent = base_channels * 2**n_downsample
        own = n_res - n_shared
        self.generators = nn.ModuleDict(
            {
                "enc_syn": private_encoder(base_channels, n_downsample, own),
                "enc_real": private_encoder(base_channels, n_downsample, own),
                "enc_shared": res_blocks(latent, n_shared),
                "dec_shared": res_blocks(latent, n_shared),
                "dec_syn": private_decoder(base_channels, n_downsample, own),
                "dec_real": private_decoder(base_channels, n_downsample, own),
            }
        )
        dis = dis_channels or base_channels
        self.discriminators = nn.ModuleDict(
            {
                k: MultiScaleDiscriminator(dis_scales, base_channels=dis, n_down=dis_layers, n_flat=0, norm="none", out_kernel=1)
                for k in DOMAINS
            }
        )
        init_weights(self, "kaiming")

    def encode(self, x: Tensor, domain: str) -> Tensor:
        """The latent mean mu = E_domain(x) (shared last layers included)."""
        return self._g("enc_shared")(self._g(f"enc_{domain}")(x))

    def _noise_like(self, mu: Tensor) -> Tensor:
        # the VAE's sampling z = mu + n with unit variance; a method so tests can make it 0
        return torch.randn_like(mu)

    def gen_losses(self, x_syn: Tensor, x_real: Tensor, w_syn: Tensor, w_real: Tensor) -> tuple[dict[str, Tensor], Fakes]:
        x = {"syn": x_syn, "real": x_real}
        w = {"syn": w_syn, "real": w_real}
        other = {"syn": "real", "real": "syn"}
        out: dict[str, Tensor] = {}
        fakes: Fakes = {}
        for src in DOMAINS:
            dst = other[src]
            mu = self.encode(x[src], src)
            h = self._g("dec_shared")(mu + self._noise_like(mu))  # decoded once, for both domains
            recon = self._g(f"dec_{src}")(h)
            fake = self._g(f"dec_{dst}")(h)
            # cycle: back into the latent space from the other domain, and out again
            mu_cyc = self.encode(fake, dst)
            cyc = self._g(f"dec_{src}")(self._g("dec_shared")(mu_cyc + self._noise_like(mu_cyc)))
            # every term below is a function of the sample x[src] alone: weight w[src]
            direction = "s2r" if src == "syn" else "r2s"
            out[f"gen_adv_{direction}"] = weighted_mean(lsgan_loss(self._d(dst)(fake), True), w[src])
            out[f"recon_{src}"] = weighted_mean(l1_per_sample(recon, x[src]), w[src])
            out[f"kl_{src}"] = weighted_mean(kl_per_sample(mu), w[src])
            out[f"cyc_{src}"] = weighted_mean(l1_per_sample(cyc, x[src]), w[src])
            out[f"kl_cyc_{src}"] = weighted_mean(kl_per_sample(mu_cyc), w[src])
            fakes[dst] = (fake, w[src])
        out["gen_total"] = (
            self.gan_w * (out["gen_adv_s2r"] + out["gen_adv_r2s"])
            + self.recon_x_w * (out["recon_syn"] + out["recon_real"])
            + self.recon_kl_w * (out["kl_syn"] + out["kl_real"])
            + self.recon_x_cyc_w * (out["cyc_syn"] + out["cyc_real"])
            + self.recon_kl_cyc_w * (out["kl_cyc_syn"] + out["kl_cyc_real"])
        )
        return out, fakes

    def translate_module(self) -> nn.Module:
        # deterministic translation: the latent mean, no sampling noise (as the official code)
        g = self.generators
        return nn.Sequential(
            OrderedDict((k, g[k]) for k in ("enc_syn", "enc_shared", "dec_shared", "dec_real"))
        )
