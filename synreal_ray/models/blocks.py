"""Building blocks shared by UNIT and CycleGAN: conv layers, residual blocks, discriminators,
the image pool, weight initialisation.

Normalisation is InstanceNorm (as in both papers), LayerNorm (the official UNIT decoder's
up-sampling blocks) or none, never BatchNorm: instance and layer statistics are per sample, so
no sample of a batch changes another's output or gradient. The importance
weighting relies on that: a sample of weight 0 must leave the gradients exactly unchanged,
which BatchNorm's batch statistics would break.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn


class LayerNorm(nn.Module):
    """The official UNIT code's LayerNorm (networks.py, `norm='ln'`), not torch's nn.LayerNorm:
    each sample is normalised by the mean and the (unbiased) standard deviation of all its C*H*W
    values, (x - mean) / (std + eps), then scaled and shifted per channel (gamma, beta of shape
    (C,)). As there, gamma starts uniform in [0, 1) and beta at 0. Computed in float32 (fp16
    autocast would lose the statistics of large maps), returned in the input's dtype."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.empty(channels).uniform_())
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        shape = (-1,) + (1,) * (x.dim() - 1)
        mean, std = xf.flatten(1).mean(1).view(shape), xf.flatten(1).std(1).view(shape)
        y = (xf - mean) / (std + self.eps)
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        return (y * self.gamma.view(per_channel) + self.beta.view(per_channel)).to(x.dtype)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """'instance' (no affine, no running stats: as in CycleGAN and UNIT), 'ln' (`LayerNorm`,
    UNIT's up-sampling blocks) or 'none'."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "ln":
        return LayerNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use 'instance', 'ln' or 'none'")


def act_layer(kind: str) -> nn.Module:
    layers = {"relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh, "none": nn.Identity}
    if kind not in layers:
        raise ValueError(f"unknown activation {kind!r}: use one of {sorted(layers)}")
    return layers[kind]()


class ConvBlock(nn.Sequential):
    """conv -> norm -> activation; padding k//2 ('same' at stride 1, halving at stride 2 for k=4)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        norm: str = "instance",
        act: str = "relu",
        pad_mode: str = "reflect",
        padding: int | None = None,
    ):
        padding = (kernel - 1) // 2 if padding is None else padding
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding, padding_mode=pad_mode),
            norm_layer(norm, cout),
            act_layer(act),
        )


class ResBlock(nn.Module):
    """Two 3x3 convs with a skip connection; channels and resolution unchanged."""

    def __init__(self, channels: int, norm: str = "instance"):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels, 3, norm=norm, act="relu"),
            ConvBlock(channels, channels, 3, norm=norm, act="none"),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def res_blocks(channels: int, n: int, norm: str = "instance") -> nn.Sequential:
    return nn.Sequential(*(ResBlock(channels, norm) for _ in range(n)))


class UpBlock(nn.Sequential):
    """x2 up-sampling: a stride-2 transposed 3x3 conv (CycleGAN's u-k) or nearest-neighbour
    up-sampling then a 5x5 conv (the official UNIT code, there with norm='ln'; avoids
    checkerboard artefacts)."""

    def __init__(self, cin: int, cout: int, mode: str = "transpose", norm: str = "instance"):
        if mode == "transpose":
            layers = [nn.ConvTranspose2d(cin, cout, 3, 2, padding=1, output_padding=1), norm_layer(norm, cout), nn.ReLU()]
        elif mode == "nearest":
            layers = [nn.Upsample(scale_factor=2, mode="nearest"), ConvBlock(cin, cout, 5, norm=norm)]
        else:
            raise ValueError(f"unknown up-sampling mode {mode!r}: use 'transpose' or 'nearest'")
        super().__init__(*layers)


class PatchDiscriminator(nn.Sequential):
    """Fully convolutional discriminator scoring overlapping patches: (B, 3, H, W) -> (B, 1, h, w).

    `n_down` stride-2 4x4 convs (the first without norm) doubling the width up to 8x, then
    `n_flat` stride-1 4x4 convs, then a 1-channel conv of kernel `out_kernel`.
    CycleGAN's 70x70 PatchGAN C64-C128-C256-C512: n_down=3, n_flat=1, out_kernel=4.
    UNIT's per-scale discriminator (official code): n_down=4, n_flat=0, norm='none', out_kernel=1.
    Zero padding: reflection padding fails on the 1-2 pixel maps of small images at coarse scales.
    """

    def __init__(
        self,
        base_channels: int = 64,
        n_down: int = 3,
        n_flat: int = 1,
        norm: str = "instance",
        out_kernel: int = 4,
        in_channels: int = 3,
    ):
        layers: list[nn.Module] = [ConvBlock(in_channels, base_channels, 4, 2, norm="none", act="lrelu", pad_mode="zeros", padding=1)]
        ch = base_channels
        for i in range(1, n_down + n_flat):
            out = min(ch * 2, base_channels * 8)
            stride = 2 if i < n_down else 1
            layers.append(ConvBlock(ch, out, 4, stride, norm=norm, act="lrelu", pad_mode="zeros", padding=1))
            ch = out
        layers.append(nn.Conv2d(ch, 1, out_kernel, 1, padding=self._out_padding(out_kernel)))
        super().__init__(*layers)

    @staticmethod
    def _out_padding(out_kernel: int) -> int:
        return 1 if out_kernel == 4 else 0

    @classmethod
    def min_size(cls, n_down: int = 3, n_flat: int = 1, out_kernel: int = 4) -> int:
        """The smallest image side (pixels) this discriminator accepts. Each stride-2 4x4 conv
        (padding 1) floors the side to side // 2, each stride-1 4x4 conv (padding 1) takes 1 off,
        and the last conv takes out_kernel - 1 - 2 * padding off; every output must keep >= 1
        pixel, so side // 2**n_down must be >= n_flat + that + 1 (n_down >= 1)."""
        tail = out_kernel - 1 - 2 * cls._out_padding(out_kernel)
        return 2**n_down * (n_flat + tail + 1)


class MultiScaleDiscriminator(nn.Module):
    """One PatchDiscriminator per scale of an image pyramid (x, x/2, x/4, ...); returns the
    list of their outputs, which `losses.lsgan_loss` sums (as the official UNIT code)."""

    def __init__(self, n_scales: int = 3, **patch_kwargs):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(**patch_kwargs) for _ in range(n_scales))
        # count_include_pad=False: the border pixels are not darkened by the zero padding.
        self.down = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    @staticmethod
    def min_size(n_scales: int = 3, **patch_kwargs) -> int:
        """The smallest image side accepted: the pooling (3x3, stride 2, padding 1) takes a side
        s to ceil(s / 2), so the coarsest scale sees ceil(s / 2**(n_scales - 1)) pixels, which
        must be >= PatchDiscriminator.min_size."""
        return (PatchDiscriminator.min_size(**patch_kwargs) - 1) * 2 ** (n_scales - 1) + 1

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, d in enumerate(self.scales):
            if i:
                x = self.down(x)
            outs.append(d(x))
        return outs


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al. 2017), keeping each image's
    importance weight: the discriminator then sees a pooled fake with the weight of the
    synthetic/real sample it was generated from, not with the weight of the current batch.

    Until `size` images are stored each new image is stored and returned; afterwards, with
    probability 1/2, a new image replaces a random stored one and the stored one is returned.
    size=0 disables the pool. Images are stored detached; the pool is not part of the model's
    state_dict (the official CycleGAN does not checkpoint it either: it refills in `size` images).
    """

    def __init__(self, size: int = 50, seed: int | None = None):
        self.size = size
        self.images: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W), weights (B,) -> the same shapes, partly from the history."""
        if self.size == 0:
            return images.detach(), weights
        out_images, out_weights = [], []
        for img, w in zip(images.detach(), weights):
            if len(self.images) < self.size:
                self.images.append(img.clone())
                self.weights.append(w.clone())
                out_images.append(img)
                out_weights.append(w)
            elif self.rng.random() < 0.5:
                i = self.rng.randrange(self.size)
                out_images.append(self.images[i])
                out_weights.append(self.weights[i])
                self.images[i], self.weights[i] = img.clone(), w.clone()
            else:
                out_images.append(img)
                out_weights.append(w)
        return torch.stack(out_images), torch.stack(out_weights)


def init_weights(module: nn.Module, kind: str = "normal") -> None:
    """Conv weights ~ N(0, 0.02) ('normal', CycleGAN) or Kaiming-normal ('kaiming', official
    UNIT config `init: kaiming`); biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if kind == "normal":
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                raise ValueError(f"unknown init {kind!r}: use 'normal' or 'kaiming'")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
