"""Loading any model: a model folder, a distillation run (its latest round) or `diffusers:PATH`."""

from __future__ import annotations

from pathlib import Path

import torch

from progdistill.diffusion.denoiser import Denoiser
from progdistill.errors import UserError
from progdistill.nets.device import device_settings, prepare_denoiser
from progdistill.store.atomic import version_folder
from progdistill.store.card import CARD, ModelCard, is_diffusers_spec, read_json
from progdistill.store.folders import load_network, resolve_model_folder


def load_card(path: str | Path) -> ModelCard:
    """The card of a model folder or run; for `diffusers:PATH`, the card of the imported teacher."""
    if is_diffusers_spec(path):
        from progdistill.store.diffusers_reader import load_diffusers_card

        return load_diffusers_card(str(path))
    folder = version_folder(resolve_model_folder(path))
    d = read_json(folder / CARD, "model card")
    try:
        return ModelCard.from_dict(d)
    except (KeyError, TypeError) as e:
        raise UserError(f"model card {folder / CARD} is missing or has a bad field ({e}); it was not written by this progdistill") from None


def load_denoiser(path: str | Path, *, which: str | None = None, device: str | torch.device = "cpu",
                  compile: str | None = None) -> tuple[Denoiser, ModelCard]:
    """Load any model folder, distillation run or `diffusers:PATH` as an eval-mode Denoiser plus its card,
    ready to run on `device` (channels_last on CUDA; torch.compile'd with backend `compile`)."""
    device = torch.device(device)
    if is_diffusers_spec(path):
        from progdistill.store.diffusers_reader import load_diffusers_teacher

        denoiser, card = load_diffusers_teacher(str(path), device)
    else:
        folder = version_folder(resolve_model_folder(Path(path)))   # card and weights of one version
        card = load_card(folder)
        net = load_network(folder, card, which).to(device).eval()
        denoiser = Denoiser(net, schedule=card.schedule, param=card.param)
    return prepare_denoiser(denoiser, device_settings(device.type), compile), card


def resolved_teacher(spec: str) -> str:
    """The teacher as the run records it for loading: an absolute run folder, or diffusers:ABSOLUTE_PATH."""
    if is_diffusers_spec(spec):
        path = Path(spec[len("diffusers:"):]).expanduser()
        return f"diffusers:{path.resolve()}" if path.exists() else spec   # a hub id stays as given
    return str(Path(spec).resolve())
