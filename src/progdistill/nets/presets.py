"""Networks and their named presets. The network never sees the schedule (see denoiser.py).

Images use diffusers' `UNet2DModel`; vectors a small MLP with the same call interface
`net(sample, timestep, class_labels=...)`. Both save with diffusers' `save_pretrained`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from progdistill.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one network; `num_classes` > 0 adds class embeddings plus one null class.

    A preset's config names an architecture and a size; `resolution`/`channels` come from the data
    (`for_data`). Attention sits at `attention_levels` (0 = full resolution, i = side / 2**i), so it
    follows the resolution: the digits UNet has attention at level 1 at 8 px and at 32 px alike.
    """

    kind: str = "unet"                      # "unet" (images) or "mlp" (vectors)
    resolution: int = 8                     # image side (unet) — ignored for mlp
    channels: int = 1                       # image channels, or vector dimension for mlp
    block_out_channels: tuple[int, ...] = (32, 32, 64)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (1,)   # UNet levels with self-attention, 0 = the input's side
    attention_head_dim: int | None = None   # None: one head per attention layer
    norm_num_groups: int = 32
    resample: str = "conv"                  # "conv" or "resnet" (res-block up/down-sampling)
    dropout: float = 0.0
    num_classes: int = 0
    hidden: int = 256                       # mlp width
    depth: int = 4                          # mlp hidden layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From JSON; cards written before attention levels (absolute `attention_resolutions`) convert exactly."""
        d = dict(d)
        legacy = d.pop("attention_resolutions", None)
        if legacy is not None and "attention_levels" not in d:
            res, n = d.get("resolution", cls.resolution), len(d.get("block_out_channels", cls.block_out_channels))
            d["attention_levels"] = [i for i in range(n) if res // 2**i in set(legacy)]
        for k in ("block_out_channels", "attention_levels"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    @property
    def width(self) -> int:
        """Base width: the UNet's first-level channels, or the MLP's hidden size."""
        return self.hidden if self.kind == "mlp" else self.block_out_channels[0]

    @property
    def side_multiple(self) -> int:
        """A UNet with L levels halves the side L - 1 times: the side must be a multiple of 2**(L - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


def nearest_valid_sides(side: int, multiple: int) -> list[int]:
    """The multiples of `multiple` nearest to `side` (two when it lies half-way), never 0."""
    lo, hi = side // multiple * multiple, -(-side // multiple) * multiple
    if lo < multiple:
        return [max(hi, multiple)]
    if lo == hi:
        return [lo]
    return [lo] if side - lo < hi - side else [hi] if hi - side < side - lo else [lo, hi]


def check_side(cfg: ModelConfig, side: int, *, what: str) -> None:
    """One-line UserError when a UNet with cfg's levels cannot take images of `side` px."""
    m = cfg.side_multiple
    if side < 1 or side % m:
        near = " or ".join(str(s) for s in nearest_valid_sides(side, m))
        raise UserError(f"{what}: side {side} does not fit a {len(cfg.block_out_channels)}-level UNet (it needs a "
                        f"multiple of {m}); nearest valid: {near} (pass --resolution)")


def scaled_width(cfg: ModelConfig, width: int) -> ModelConfig:
    """The same architecture at base width `width`: every level's channels scale by width / base.

    Group-norm groups become the largest divisor of the preset's count that divides every level,
    so narrow test models stay valid; attention heads must still divide the channels.
    """
    if not isinstance(width, int) or width < 1:
        raise UserError(f"--width must be a positive integer, got {width!r}")
    if cfg.kind == "mlp":
        return replace(cfg, hidden=width)
    base = cfg.block_out_channels[0]
    chans = tuple(max(1, round(c * width / base)) for c in cfg.block_out_channels)
    groups = math.gcd(cfg.norm_num_groups, *chans)
    head = cfg.attention_head_dim
    bad = [chans[i] for i in cfg.attention_levels if head and chans[i] % head]
    if bad:
        raise UserError(f"--width {width} gives {bad[0]} channels at an attention level, not a multiple of the "
                        f"{head}-channel attention heads; pick a width whose levels are multiples of {head}")
    return replace(cfg, block_out_channels=chans, norm_num_groups=groups)


def for_data(cfg: ModelConfig, *, resolution: int | None, channels: int, width: int | None, what: str) -> ModelConfig:
    """The preset's architecture sized for the data: its shape (images: side, channels; vectors: dim) and width."""
    if width is not None and width != cfg.width:
        cfg = scaled_width(cfg, width)
    if cfg.kind == "mlp":
        return replace(cfg, channels=channels)
    check_side(cfg, resolution, what=what)
    return replace(cfg, resolution=resolution, channels=channels)


@dataclass(frozen=True)
class Preset:
    """A model plus the training defaults that go with it (docs/method.md §5, §6)."""

    name: str
    model: ModelConfig
    hflip: bool
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int
    ema_decay: float
    iters: int
    param: str
    distill_lr: float
    distill_start_steps: int
    distill_iters_per_round: int
    description: str = ""
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "digits": Preset(
        "digits", ModelConfig(resolution=8, channels=1, block_out_channels=(32, 32, 64), layers_per_block=1,
                              attention_levels=(1,), dropout=0.0),
        hflip=False, batch_size=64, lr=1e-3, weight_decay=0.0, warmup=100, ema_decay=0.999, iters=3000,
        param="v", distill_lr=3e-4, distill_start_steps=256, distill_iters_per_round=300,
        description="built-in digits (8x8 gray); trains on 2 CPU cores in minutes"),
    "small": Preset(
        "small", ModelConfig(resolution=32, channels=3, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
                             attention_levels=(2, 3), dropout=0.0),
        hflip=True, batch_size=64, lr=3e-4, weight_decay=0.0, warmup=200, ema_decay=0.9995, iters=20_000,
        param="v", distill_lr=1e-4, distill_start_steps=256, distill_iters_per_round=1000,
        extra={"lr_decay": "cosine"},
        description="~4.7M-parameter UNet for 16-64 px RGB or gray on a CPU (sides: multiples of 8)"),
    "cifar10": Preset(
        "cifar10", ModelConfig(resolution=32, channels=3, block_out_channels=(256, 256, 256), layers_per_block=3,
                               attention_levels=(1, 2), resample="resnet", dropout=0.2),
        hflip=True, batch_size=128, lr=2e-4, weight_decay=1e-3, warmup=1000, ema_decay=0.9999, iters=800_000,
        param="x", distill_lr=5e-5, distill_start_steps=8192, distill_iters_per_round=50_000,
        description="released CIFAR-10 config (paper Table 1 best: x output, truncated SNR)"),
    "imagenet64": Preset(
        "imagenet64", ModelConfig(resolution=64, channels=3, block_out_channels=(192, 384, 576, 768),
                                  layers_per_block=3, attention_levels=(1, 2, 3), attention_head_dim=64,
                                  resample="resnet", dropout=0.1, num_classes=1000),
        hflip=True, batch_size=2048, lr=3e-4, weight_decay=0.0, warmup=1000, ema_decay=0.9999, iters=800_000,
        param="both", distill_lr=1e-4, distill_start_steps=1024, distill_iters_per_round=50_000,
        description="released ImageNet 64x64 class-conditional config"),
    "lsun128": Preset(
        "lsun128", ModelConfig(resolution=128, channels=3, block_out_channels=(64, 128, 256, 384, 512),
                               layers_per_block=3, attention_levels=(2, 3, 4), attention_head_dim=64,
                               resample="resnet", dropout=0.1),
        hflip=True, batch_size=2048, lr=3e-4, weight_decay=0.0, warmup=1000, ema_decay=0.9999, iters=400_000,
        param="both", distill_lr=1e-4, distill_start_steps=1024, distill_iters_per_round=50_000,
        description="released LSUN 128x128 (bedrooms / church) config"),
    "mlp": Preset(
        "mlp", ModelConfig(kind="mlp", channels=2, hidden=256, depth=4, block_out_channels=(),
                           attention_levels=()),
        hflip=False, batch_size=512, lr=1e-3, weight_decay=0.0, warmup=100, ema_decay=0.999, iters=6000,
        param="v", distill_lr=3e-4, distill_start_steps=256, distill_iters_per_round=500,
        extra={"lr_decay": "cosine"},   # issue 10: toy:gmm within-3 sigma share 0.954 -> 0.978 (README)
        description="small MLP for 2-D toy data or npz vectors"),
}


# Training examples/s (value, batch) at each preset's default shape, one torch thread, measured with
# `measure_train_speed` (`progdistill --threads 1 presets --measure` re-measures here); None: too slow on a CPU.
# 2 threads there: digits 1,152/s, small 63/s. Paper presets: a few steps at a tiny batch, for scale only.
MEASURED_ON = "2 shared AMD EPYC cores (load ~1.5), 1 torch thread"
MEASURED_SPEED: dict[str, tuple[float | None, int]] = {
    "digits": (841.0, 64), "small": (36.6, 64), "cifar10": (0.81, 8), "imagenet64": (0.08, 1), "lsun128": (0.13, 1),
    "mlp": (16_200.0, 512),
}


def get_preset(name: str | None) -> Preset:
    if name is None or name not in PRESETS:
        what = "no --preset given" if name is None else f"unknown preset {name!r}"
        raise UserError(f"{what}: choose one of {', '.join(PRESETS)} (see `progdistill presets`)")
    return PRESETS[name]


def with_dropout(cfg: ModelConfig, dropout: float) -> ModelConfig:
    return replace(cfg, dropout=dropout)


