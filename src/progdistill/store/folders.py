"""Model folders: a card (`progdistill.json`) plus weights in diffusers' `save_pretrained` layout.

A training run's model folder is replaced at every checkpoint through versions and a `current` link,
a distillation round's `steps-NNNN/` is written once; atomic.py says how neither can be seen half
written, and `version_folder` is how every reader here pins one version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from progdistill.errors import UserError
from progdistill.nets.build import build_network
from progdistill.nets.compile import plain_state_dict, unwrap
from progdistill.nets.spec import network_from_spec, network_spec, spec_with_param
from progdistill.store.atomic import publish_dir, publish_version, version_folder, write_json
from progdistill.store.card import CARD, WEIGHTS, ModelCard, read_json


def build_network_from_card(card: ModelCard, param: str | None = None, *, dropout: float | None = None) -> torch.nn.Module:
    """A freshly initialised network of the card's architecture (from `network` if recorded, else `model`).

    `param` builds the same architecture for another output parameterization (a student: `both`
    doubles the output channels, eps/x/v keep them); `dropout` overrides the dropout rate.
    """
    param = param or card.param
    if card.network is not None:
        same = param == card.param and dropout is None
        return network_from_spec(card.network if same else spec_with_param(card.network, param, dropout=dropout))
    cfg = card.model if dropout is None else dataclasses.replace(card.model, dropout=dropout)
    return build_network(cfg, param)


def write_model_files(folder: Path, card: ModelCard, weights: dict[str, torch.nn.Module]) -> None:
    """Each network (`{"model": net, "ema": ema_net}`) in diffusers layout, then the card, into `folder`.
    A card without `network` gets the saved net's config."""
    folder = Path(folder)
    weights = {sub: unwrap(net) for sub, net in weights.items()}    # plain keys, never `_orig_mod.`
    for sub, net in weights.items():
        net.save_pretrained(folder / sub, safe_serialization=True)
    if card.network is None and weights:
        card = dataclasses.replace(card, network=network_spec(weights.get(card.weights, next(iter(weights.values())))))
    write_json(folder / CARD, card.to_dict())


def save_model_folder(folder: Path, card: ModelCard, weights: dict[str, torch.nn.Module]) -> None:
    """Publish a new version of a training run's model folder: weights and card change together, in one
    rename (atomic.py); readers see the previous version or this one, whole."""
    publish_version(folder, lambda v: write_model_files(v, card, weights), tag=f"{card.iteration:08d}",
                    public=[CARD, *weights])


def publish_model_folder(folder: Path, card: ModelCard, weights: dict[str, torch.nn.Module]) -> bool:
    """Publish a model folder written once (a distillation round's `steps-NNNN/`) with one rename of a
    complete, fsynced temp folder; one already complete is kept (False)."""
    return publish_dir(lambda tmp: write_model_files(tmp, card, weights), folder, complete=CARD)


def resolve_model_folder(path: Path) -> Path:
    """A model folder itself, or a distillation run (-> its latest finished `steps-*` round)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model {path} not found: pass a training run folder, a distillation run, a steps-NNNN folder "
                        f"or diffusers:DIR")
    card = read_json(version_folder(path) / CARD, "model card")
    if card.get("kind") == "distillation":
        latest = card.get("latest")
        if not latest:
            raise UserError(f"distillation run {path} has no finished round yet; resume it with `progdistill distill --resume`")
        return path / latest
    return path


def load_network(folder: Path, card: ModelCard, which: str | None = None) -> torch.nn.Module:
    """Rebuild the network from the card and load safetensors weights (`which`: model or ema)."""
    sub = version_folder(Path(folder)) / (which or card.weights)
    f = sub / WEIGHTS
    if not f.is_file():
        raise UserError(f"weights {f} not found; the run may be unfinished: resume it, or point at a finished model")
    net = build_network_from_card(card)
    try:
        state = plain_state_dict(load_file(str(f)))    # weights saved from a torch.compile'd module load too
    except Exception as e:  # safetensors raises several types for truncated or corrupt files
        raise UserError(f"weights {f} are corrupt ({e}); restore them or re-run training") from None
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"weights {f} do not match the architecture in {Path(folder) / CARD} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return net
