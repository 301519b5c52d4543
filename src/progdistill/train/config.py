"""Typed, validated run configs; resolved against the preset and saved with every run."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields

from progdistill.data.normalize import check_normalize
from progdistill.diffusion.losses import check_weighting
from progdistill.diffusion.parameterization import check_param
from progdistill.errors import UserError

PRECISIONS = ("fp32", "bf16")
LR_DECAYS = ("constant", "cosine")


def _check_common(cfg) -> None:
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise UserError(f"--workers must be a non-negative integer, got {cfg.workers!r}")
    for name in ("batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every"):
        v = getattr(cfg, name)
        if v is None and name == "batch_size":
            continue  # filled from the preset or the teacher
        if not isinstance(v, int) or v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.time_limit is not None and not cfg.time_limit > 0:
        raise UserError(f"--time-limit must be a positive number of minutes, got {cfg.time_limit}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise UserError(f"gradient clipping norm must be positive, got {cfg.grad_clip}")
    if cfg.compile is not None and (not isinstance(cfg.compile, str) or not cfg.compile):
        raise UserError(f"--compile takes a torch.compile backend name (default inductor), got {cfg.compile!r}")


@dataclass
class TrainConfig:
    """Teacher training (Algorithm 1). None fields are filled from the preset by `resolve`."""

    data: str = "digits"
    preset: str | None = None
    resolution: int | None = None    # image side; None: the data's own. Frozen into config.json by the first run
    channels: int | None = None      # image channels (1 or 3); None: the data's own. Frozen likewise
    width: int | None = None         # base width (UNet first-level channels, MLP hidden); None: the preset's
    depth: int | None = None         # UNet residual blocks per level, MLP hidden layers; None: the preset's
    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int | None = None
    ema_decay: float | None = None
    lr_decay: str | None = None      # "constant" (after warm-up) or "cosine" (to lr_final_frac x lr); None: preset's
    lr_final_frac: float = 0.02
    ema_warmup: bool = True          # decay min(ema_decay, (1 + n) / (10 + n)): lets short runs' EMA move
    grad_clip: float | None = 1.0
    dropout: float | None = None
    param: str | None = None
    weighting: str = "snr_trunc"
    class_cond: bool = False
    label_dropout: float = 0.1
    normalize: str = "standard"      # vector data: standard | minmax | none (images stay in [-1, 1])
    hflip: bool | None = None
    seed: int = 0
    precision: str = "fp32"
    grad_accum: int = 1
    checkpoint_every: int = 1000
    keep_last: int = 3
    time_limit: float | None = None  # minutes
    log_every: int = 25
    workers: int = 0                 # DataLoader workers for streamed data (0: read in the training process)
    compile: str | None = None       # torch.compile backend ("inductor"), None: eager. A speed option: --resume may change it
    schedule: dict = field(default_factory=lambda: {"kind": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0})
    model_overrides: dict = field(default_factory=dict)   # ModelConfig fields to change, e.g. {"hidden": 128}

    def validate(self) -> "TrainConfig":
        _check_common(self)
        check_weighting(self.weighting)
        if self.param is not None:
            check_param(self.param)
        for name in ("resolution", "width", "depth"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UserError(f"--{name} must be a positive integer, got {v!r}")
        if self.channels is not None and self.channels not in (1, 3):
            raise UserError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 1):
            raise UserError(f"--iters must be a positive integer, got {self.iters!r}")
        check_normalize(self.normalize)
        if self.lr_decay is not None and self.lr_decay not in LR_DECAYS:
            raise UserError(f"--lr-decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if not 0.0 <= self.lr_final_frac <= 1.0:
            raise UserError(f"--lr-final-frac must lie in [0, 1], got {self.lr_final_frac}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"label dropout must lie in [0, 1), got {self.label_dropout}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"EMA decay must lie in [0, 1), got {self.ema_decay}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must lie in [0, 1), got {self.dropout}")
        return self


@dataclass
class DistillConfig:
    """Progressive distillation (Algorithm 2). None fields come from the teacher's preset."""

    teacher: str = ""
    data: str | None = None
    start_steps: int | None = None
    final_steps: int = 1
    iters_per_round: int | None = None
    last_rounds_factor: float = 1.0
    round_iters: list[int] | None = None   # explicit iterations per round (N0/2 first); overrides the two above
    lr: float | None = None
    batch_size: int | None = None
    weighting: str = "snr_trunc"
    student_param: str | None = None
    ema_decay: float = 0.0           # released configs: no student EMA
    grad_clip: float | None = 1.0
    seed: int = 0
    precision: str = "fp32"
    grad_accum: int = 1
    checkpoint_every: int = 200
    keep_last: int = 3
    time_limit: float | None = None
    log_every: int = 25
    guided: bool = False             # guided distillation (docs/method.md §9): stage 1, then the rounds on it
    w_min: float = 0.0
    w_max: float = 4.0
    guided_iters: int | None = None  # stage-1 iterations (default: --iters-per-round)
    hflip: bool | None = None        # random horizontal flip; None: the teacher run's (imported teachers: off)
    workers: int = 0                 # DataLoader workers for streamed data (0: read in the training process)
    compile: str | None = None       # torch.compile backend ("inductor"), None: eager. A speed option: --resume may change it

    def validate(self) -> "DistillConfig":
        _check_common(self)
        check_weighting(self.weighting)
        if self.student_param is not None:
            check_param(self.student_param)
        for name in ("start_steps", "final_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1 or v & (v - 1)):
                raise UserError(f"--{name.replace('_', '-')} must be a power of two (1, 2, 4, ...), got {v!r}")
        if self.start_steps is not None and not self.final_steps < self.start_steps:
            raise UserError(f"--final-steps ({self.final_steps}) must be smaller than --start-steps ({self.start_steps})")
        if self.iters_per_round is not None and (not isinstance(self.iters_per_round, int) or self.iters_per_round < 1):
            raise UserError(f"--iters-per-round must be a positive integer, got {self.iters_per_round!r}")
        if self.round_iters is not None and (not self.round_iters or any(
                not isinstance(k, int) or k < 1 for k in self.round_iters)):
            raise UserError(f"--round-iters must list positive integers, got {self.round_iters!r}")
        if not self.last_rounds_factor > 0:
            raise UserError(f"--last-rounds-factor must be positive, got {self.last_rounds_factor}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"student EMA decay must lie in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.w_min < self.w_max:
            raise UserError(f"guidance range needs 0 <= --w-min < --w-max, got [{self.w_min}, {self.w_max}]")
        if self.guided_iters is not None and (not isinstance(self.guided_iters, int) or self.guided_iters < 1):
            raise UserError(f"--guided-iters must be a positive integer, got {self.guided_iters!r}")
        return self


def to_dict(cfg) -> dict:
    return asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config from JSON, rejecting unknown keys with a clear message."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys {unknown}: this config was written by another version")
    return cls(**d).validate()


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
