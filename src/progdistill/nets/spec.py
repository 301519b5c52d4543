"""A network as data (card format 2): its class name and diffusers config, so any supported network
(UNet2DModel, MLPModel, and the GuidedNet wrapper around either) is rebuilt from its model card."""

from __future__ import annotations

from torch import nn

from progdistill.diffusion.parameterization import output_channels
from progdistill.errors import UserError
from progdistill.nets.build import BASE_NETWORKS
from progdistill.nets.guided import GuidedNet

NETWORK_CLASSES: dict[str, type] = {**BASE_NETWORKS, "GuidedNet": GuidedNet}

_CHANNEL_KEYS = {"UNet2DModel": ("in_channels", "out_channels"), "MLPModel": ("dim", "out_dim")}


def network_spec(net: nn.Module) -> dict:
    """{"class_name": ..., "config": dict(net.config) less private keys}: enough to rebuild the network."""
    name = type(net).__name__
    if name not in NETWORK_CLASSES:
        raise UserError(f"cannot record a {name} network: supported are {', '.join(NETWORK_CLASSES)}")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(net.config).items() if not k.startswith("_")}
    return {"class_name": name, "config": config}


def network_from_spec(spec: dict) -> nn.Module:
    """`cls.from_config(config)` for a `network_spec` (random init)."""
    name = spec.get("class_name")
    if name not in NETWORK_CLASSES:
        raise UserError(f"unknown network class {name!r} in the model card: supported are {', '.join(NETWORK_CLASSES)}")
    return NETWORK_CLASSES[name].from_config(dict(spec["config"]))


def spec_with_param(spec: dict, param: str, *, dropout: float | None = None) -> dict:
    """The same architecture with output channels for `param` (both: 2C, else C) and optionally another dropout."""
    if "base" in spec["config"]:    # a wrapper (GuidedNet): the channels live in its base network
        return {"class_name": spec["class_name"],
                "config": dict(spec["config"], base=spec_with_param(spec["config"]["base"], param, dropout=dropout))}
    cin, cout = _CHANNEL_KEYS[spec["class_name"]]
    config = dict(spec["config"])
    config[cout] = output_channels(param, config[cin])
    if dropout is not None:
        config["dropout"] = dropout
    return {"class_name": spec["class_name"], "config": config}

