"""The model card (`progdistill.json`): what it takes to rebuild and use a model without its training
config: architecture as a diffusers config, parameterization, schedule, data shape, classes, sampling
clip, iteration, provenance. Also the small names every reader of a run shares (JSON reading, spec
prefixes, `steps-NNNN` folder names)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from progdistill.diffusion.schedules import Schedule
from progdistill.errors import UserError
from progdistill.nets.presets import ModelConfig

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


def is_diffusers_spec(path: str | Path) -> bool:
    """True for `diffusers:PATH` (a diffusers pipeline folder or hub id, imported as a teacher)."""
    return str(path).startswith(DIFFUSERS_PREFIX)


def steps_folder_name(n: int) -> str:
    return f"steps-{n:04d}"


def parse_steps_folder(name: str) -> int | None:
    m = re.fullmatch(r"steps-(\d+)", name)
    return int(m.group(1)) if m else None
