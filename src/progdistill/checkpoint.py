"""Run folders and checkpoints: atomic writes, diffusers layout for weights, no pickle for models.

A *model folder* holds `progdistill.json` (the model card: architecture as a diffusers config,
parameterization, schedule, data shape, classes, sampling clip, iteration, provenance) and its weights in diffusers'
`save_pretrained` layout (`model/`, and `ema/` for teachers). Training states (optimizer, step,
RNG) live in `state/` and are loaded with `torch.load(weights_only=True)`.

A training run's model folder is replaced at every checkpoint through versions and a `current` link,
a distillation round's `steps-NNNN/` is written once; publish.py says how neither can be seen half
written, and `version_folder` is how every reader here pins one version.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .accel import device_settings, plain_state_dict, prepare_denoiser, unwrap
from .denoiser import Denoiser
from .errors import UserError
from .models import ModelConfig, build_network, network_from_spec, network_spec, spec_with_param
from .publish import (clean_run_folder, publish_dir, publish_version, replace_dir_atomic,  # noqa: F401 (re-exported)
                      torch_save_atomic, version_folder, write_json)
from .schedules import Schedule

CARD = "progdistill.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CARD_FORMAT = 2   # 2: network config, clip/clip_range, null_class, normalizer, source
DIFFUSERS_PREFIX = "diffusers:"
PUBLIC = [CARD, "model", "ema"]   # a training run's paths that resolve through its `current` version


def read_json(path: Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is corrupt ({e.__class__.__name__}: {e}); delete it or restore a copy") from None


@dataclass
class ModelCard:
    """What it takes to rebuild and use a model without its training config (card format 2).

    Format 2 adds `network` (class and diffusers config: any UNet2DModel round-trips), sampling
    `clip`/`clip_range`, `null_class`, `normalizer`, `source` and (optional) `guidance`; format 1 cards still load.
    """

    model: ModelConfig | None    # progdistill's architecture; None for imported teachers
    param: str
    schedule: Schedule
    data: dict                   # spec, kind ("image"/"vector"), shape, num_classes, class_names
    iteration: int = 0
    kind: str = "teacher"        # "teacher" or "student"
    steps: int | None = None     # sampling steps a student was distilled for
    weights: str = "ema"         # sub-folder used for sampling: "ema", "model" ("unet" for imported teachers)
    provenance: dict | None = None
    network: dict | None = None  # {"class_name": "UNet2DModel" | "MLPModel", "config": diffusers config}
    clip: bool | None = None     # clip x_pred when sampling; None -> images clip, vectors do not
    clip_range: float = 1.0      # clamp(-r, r) (diffusers' clip_sample_range)
    null_class: bool = True      # own class-conditional nets: last class row is the null class (guidance)
    normalizer: dict | None = None   # vector normalisation, stored and round-tripped only
    source: str | None = None    # the `diffusers:` spec as given, for imported teachers
    guidance: dict | None = None     # w-conditioned (guidance-distilled) models: {"w_min", "w_max"}

    def __post_init__(self) -> None:
        if self.model is None and self.network is None:
            raise UserError("a model card needs a network config or a progdistill model config")
        if self.clip is None:    # the format-1 rule, so `card.clip` is always a bool
            self.clip = self.data.get("kind") == "image"
        self.clip, self.clip_range = bool(self.clip), float(self.clip_range)

    def to_dict(self) -> dict:
        return {"format": CARD_FORMAT, "model": self.model.to_dict() if self.model is not None else None,
                "network": self.network, "param": self.param, "schedule": self.schedule.to_dict(), "data": self.data,
                "iteration": self.iteration, "kind": self.kind, "steps": self.steps, "weights": self.weights,
                "provenance": self.provenance or {}, "clip": self.clip, "clip_range": self.clip_range,
                "null_class": self.null_class, "normalizer": self.normalizer, "source": self.source,
                "guidance": self.guidance}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        fmt = d.get("format", 1)
        if not isinstance(fmt, int) or fmt > CARD_FORMAT:
            raise UserError(f"model card format {fmt!r} is newer than this progdistill reads ({CARD_FORMAT}); upgrade progdistill")
        return cls(model=ModelConfig.from_dict(d["model"]) if d.get("model") is not None else None, param=d["param"],
                   schedule=Schedule.from_dict(d["schedule"]), data=d["data"], iteration=d.get("iteration", 0),
                   kind=d.get("kind", "teacher"), steps=d.get("steps"), weights=d.get("weights", "ema"),
                   provenance=d.get("provenance"), network=d.get("network"), clip=d.get("clip"),
                   clip_range=d.get("clip_range", 1.0), null_class=d.get("null_class", True),
                   normalizer=d.get("normalizer"), source=d.get("source"), guidance=d.get("guidance"))


def num_classes(card: ModelCard) -> int:
    """Real classes the network is conditioned on: its class rows, less the null row of own models (0: unconditional)."""
    if card.network is not None:
        rows = card.network["config"].get("num_class_embeds") or 0
        return rows - 1 if rows and card.null_class else rows
    return card.model.num_classes


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
    rename (publish.py); readers see the previous version or this one, whole."""
    publish_version(folder, lambda v: write_model_files(v, card, weights), tag=f"{card.iteration:08d}",
                    public=[CARD, *weights])


def publish_model_folder(folder: Path, card: ModelCard, weights: dict[str, torch.nn.Module]) -> bool:
    """Publish a model folder written once (a distillation round's `steps-NNNN/`) with one rename of a
    complete, fsynced temp folder; one already complete is kept (False)."""
    return publish_dir(lambda tmp: write_model_files(tmp, card, weights), folder, complete=CARD)


def is_diffusers_spec(path: str | Path) -> bool:
    """True for `diffusers:PATH` (a diffusers pipeline folder or hub id, imported as a teacher)."""
    return str(path).startswith(DIFFUSERS_PREFIX)


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


def load_card(path: str | Path) -> ModelCard:
    """The card of a model folder or run; for `diffusers:PATH`, the card of the imported teacher."""
    if is_diffusers_spec(path):
        from .diffusers_io import load_diffusers_card

        return load_diffusers_card(str(path))
    folder = version_folder(resolve_model_folder(path))
    d = read_json(folder / CARD, "model card")
    try:
        return ModelCard.from_dict(d)
    except (KeyError, TypeError) as e:
        raise UserError(f"model card {folder / CARD} is missing or has a bad field ({e}); it was not written by this progdistill") from None


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


def load_denoiser(path: str | Path, *, which: str | None = None, device: str | torch.device = "cpu",
                  compile: str | None = None) -> tuple[Denoiser, ModelCard]:
    """Load any model folder, distillation run or `diffusers:PATH` as an eval-mode Denoiser plus its card,
    ready to run on `device` (channels_last on CUDA; torch.compile'd with backend `compile`)."""
    device = torch.device(device)
    if is_diffusers_spec(path):
        from .diffusers_io import load_diffusers_teacher

        denoiser, card = load_diffusers_teacher(str(path), device)
    else:
        folder = version_folder(resolve_model_folder(Path(path)))   # card and weights of one version
        card = load_card(folder)
        net = load_network(folder, card, which).to(device).eval()
        denoiser = Denoiser(net, schedule=card.schedule, param=card.param)
    return prepare_denoiser(denoiser, device_settings(device.type), compile), card


def list_states(state_dir: Path) -> list[Path]:
    return sorted(Path(state_dir).glob("state-*.pt"))


def rotate_states(state_dir: Path, keep: int) -> None:
    """Keep the newest `keep` training states (never touches model folders)."""
    for p in list_states(state_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def latest_state(state_dir: Path) -> Path | None:
    states = list_states(state_dir)
    return states[-1] if states else None


def load_state(path: Path) -> dict:
    """A training state; its network weights ("net", "ema") with plain keys (a stray `_orig_mod.` stripped)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"training state {path} is corrupt ({e.__class__.__name__}); delete it to resume from the previous one") from None
    return {k: plain_state_dict(v) if k in ("net", "ema") and isinstance(v, dict) else v for k, v in st.items()}


def state_name(*parts: int) -> str:
    return "state-" + "-".join(f"{p:08d}" for p in parts) + ".pt"


def steps_folder_name(n: int) -> str:
    return f"steps-{n:04d}"


def parse_steps_folder(name: str) -> int | None:
    m = re.fullmatch(r"steps-(\d+)", name)
    return int(m.group(1)) if m else None
