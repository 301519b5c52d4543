"""Networks built from a ModelConfig: diffusers' UNet2DModel or progdistill's MLPModel, the output
channels following the parameterization; `base_network_from_spec` rebuilds either from its config."""

from __future__ import annotations

from diffusers import UNet2DModel
from torch import nn

from progdistill.diffusion.parameterization import output_channels
from progdistill.errors import UserError
from progdistill.nets.mlp import MLPModel
from progdistill.nets.presets import ModelConfig

BASE_NETWORKS: dict[str, type] = {"UNet2DModel": UNet2DModel, "MLPModel": MLPModel}   # by class name


def _unet_blocks(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """Block types per level: attention at the listed levels (0 = full resolution)."""
    plain_down = "ResnetDownsampleBlock2D" if cfg.resample == "resnet" else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if cfg.resample == "resnet" else "UpBlock2D"
    levels = range(len(cfg.block_out_channels))
    down = ["AttnDownBlock2D" if i in cfg.attention_levels else plain_down for i in levels]
    up = ["AttnUpBlock2D" if i in cfg.attention_levels else plain_up for i in reversed(levels)]
    return down, up


def build_network(cfg: ModelConfig, param: str) -> nn.Module:
    """The raw network for a model config; output channels follow the parameterization."""
    out = output_channels(param, cfg.channels)
    class_embeds = cfg.num_classes + 1 if cfg.num_classes else None   # + the null class for guidance
    if cfg.kind == "mlp":
        return MLPModel(dim=cfg.channels, out_dim=out, hidden=cfg.hidden, depth=cfg.depth,
                        num_class_embeds=class_embeds, dropout=cfg.dropout)
    if cfg.kind != "unet":
        raise UserError(f"unknown model kind {cfg.kind!r}: use 'unet' or 'mlp'")
    down, up = _unet_blocks(cfg)
    return UNet2DModel(
        sample_size=cfg.resolution, in_channels=cfg.channels, out_channels=out,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), downsample_type=cfg.resample,
        upsample_type=cfg.resample, attention_head_dim=cfg.attention_head_dim, dropout=cfg.dropout,
        norm_num_groups=cfg.norm_num_groups, resnet_time_scale_shift="scale_shift",
        num_class_embeds=class_embeds, num_train_timesteps=1024)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def base_network_from_spec(spec: dict) -> nn.Module:
    """`cls.from_config(config)` for a base network's spec (random init): UNet2DModel or MLPModel."""
    name = spec.get("class_name")
    if name not in BASE_NETWORKS:
        raise UserError(f"unknown base network class {name!r}: supported are {', '.join(BASE_NETWORKS)}")
    return BASE_NETWORKS[name].from_config(dict(spec["config"]))
