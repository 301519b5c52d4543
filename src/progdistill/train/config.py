"""Typed, validated run configs; resolved against the preset (or teacher) and saved with every run.

A field the command line sets defaults to None, meaning "not given": the CLI builds a config from the
flags typed and nothing else, and `with_defaults` (new runs) or the saved config (`--resume`) fills the
rest. `resume_config` is the one resume rule of teacher training, distillation and guided stage 1: start
from the saved config; a given field that differs from it stops the command with one line, unless its
flag is in `RESUME_MUTABLE`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from progdistill.data.normalize import check_normalize
from progdistill.diffusion.losses import check_weighting
from progdistill.diffusion.parameterization import check_param
from progdistill.errors import UserError
from progdistill.seeds import check_seed

PRECISIONS = ("fp32", "bf16")
LR_DECAYS = ("constant", "cosine")
DEFAULT_SCHEDULE = {"kind": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0}

# What a field left unset (None) becomes in a new run (fields filled from the preset or teacher are not here).
_COMMON_DEFAULTS = dict(weighting="snr_trunc", seed=0, precision="fp32", grad_accum=1, keep_last=3, log_every=25,
                        workers=0)
DEFAULTS = {
    "train": dict(_COMMON_DEFAULTS, data="digits", checkpoint_every=1000, class_cond=False, label_dropout=0.1,
                  normalize="standard", lr_final_frac=0.02, ema_warmup=True, schedule=DEFAULT_SCHEDULE),
    "distill": dict(_COMMON_DEFAULTS, checkpoint_every=200, final_steps=1, ema_decay=0.0,
                    guided=False, switch_factor=1.0, target_clip=False),   # w_min, w_max, guided_iters: by the teacher (see distill_config.py)
}

# Flags a `--resume` may change. Session options (the time limit, DataLoader workers, torch.compile) are the
# resuming command's own (not typed: none, 0, eager); the others keep the saved value when not typed.
RESUME_MUTABLE = {
    "train": ("--time-limit", "--workers", "--compile", "--log-every", "--checkpoint-every", "--keep-last", "--iters"),
    "distill": ("--time-limit", "--workers", "--compile", "--log-every", "--checkpoint-every", "--keep-last"),
}
SESSION_FIELDS = ("time_limit", "workers", "compile")

# Command-line spelling of fields whose flag is not --field-name.
_FLAGS = {("distill", "ema_decay"): "--student-ema", ("train", "schedule"): "--logsnr-shift",
          ("train", "ema_warmup"): "--no-ema-warmup"}


def flag_of(kind: str, name: str) -> str:
    return _FLAGS.get((kind, name), "--" + name.replace("_", "-"))


def _field_of(kind: str, flag: str) -> str:
    inverse = {f: n for (k, n), f in _FLAGS.items() if k == kind}
    return inverse.get(flag, flag[2:].replace("-", "_"))


def _check_common(cfg) -> None:
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.workers is not None and (not isinstance(cfg.workers, int) or cfg.workers < 0):
        raise UserError(f"--workers must be a non-negative integer, got {cfg.workers!r}")
    for name in ("batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.seed is not None:
        check_seed(cfg.seed)
    if cfg.weighting is not None:
        check_weighting(cfg.weighting)
    if cfg.lr is not None and not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.time_limit is not None and not cfg.time_limit > 0:
        raise UserError(f"--time-limit must be a positive number of minutes, got {cfg.time_limit}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise UserError(f"gradient clipping norm must be positive, got {cfg.grad_clip}")
    if cfg.compile is not None and (not isinstance(cfg.compile, str) or not cfg.compile):
        raise UserError(f"--compile takes a torch.compile backend name (default inductor), got {cfg.compile!r}")


def _check_fraction(value, what: str, *, closed: bool = False) -> None:
    if value is not None and not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise UserError(f"{what} must lie in [0, 1{']' if closed else ')'}, got {value}")


@dataclass
class TrainConfig:
    """Teacher training (Algorithm 1). None: not given; filled by `with_defaults`, then from the preset."""

    data: str | None = None          # default digits
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
    lr_final_frac: float | None = None   # default 0.02
    ema_warmup: bool | None = None   # default True: decay min(ema_decay, (1 + n) / (10 + n)) lets short runs' EMA move
    grad_clip: float | None = 1.0
    dropout: float | None = None
    param: str | None = None
    weighting: str | None = None     # default snr_trunc
    class_cond: bool | None = None   # default False
    label_dropout: float | None = None   # default 0.1
    normalize: str | None = None     # vector data: standard (default) | minmax | none (images stay in [-1, 1])
    hflip: bool | None = None
    seed: int | None = None          # default 0
    precision: str | None = None     # default fp32
    grad_accum: int | None = None    # default 1
    checkpoint_every: int | None = None   # default 1000
    keep_last: int | None = None     # default 3
    time_limit: float | None = None  # minutes
    log_every: int | None = None     # default 25
    workers: int | None = None       # DataLoader workers for streamed data (default 0: read in the training process)
    compile: str | None = None       # torch.compile backend ("inductor"), None: eager. A speed option: --resume may change it
    schedule: dict | None = None     # default DEFAULT_SCHEDULE; the CLI sets it for --logsnr-shift
    model_overrides: dict = field(default_factory=dict)   # ModelConfig fields to change, e.g. {"hidden": 128}

    def validate(self) -> "TrainConfig":
        _check_common(self)
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
        if self.normalize is not None:
            check_normalize(self.normalize)
        if self.lr_decay is not None and self.lr_decay not in LR_DECAYS:
            raise UserError(f"--lr-decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        _check_fraction(self.lr_final_frac, "--lr-final-frac", closed=True)
        _check_fraction(self.label_dropout, "label dropout")
        _check_fraction(self.ema_decay, "EMA decay")
        _check_fraction(self.dropout, "dropout")
        return self


@dataclass
class DistillConfig:
    """Progressive distillation (Algorithm 2). None: not given; filled by `with_defaults`, then from the teacher."""

    teacher: str | None = None       # required for a new run; --resume reads the run's
    data: str | None = None
    start_steps: int | None = None
    final_steps: int | None = None   # default 1
    iters_per_round: int | None = None
    last_rounds_factor: float | None = None   # default 1.0; imported teachers 3.0 (distill_config.py)
    round_iters: list[int] | None = None   # explicit iterations per round (N0/2 first); overrides the two above
    budget: float | None = None      # examples (iters x batch) over all rounds; x teacher_examples when that is given
    teacher_examples: int | None = None   # E0: --budget is then a fraction of E0 (the resolved plan: round_iters)
    switch_factor: float | None = None    # default 1.0: the first round's weight when the parameterisation switches
    target_clip: bool | None = None  # default False: clamp the teacher's x predictions in the target as its sampler does
    lr: float | None = None
    batch_size: int | None = None
    weighting: str | None = None     # default snr_trunc
    student_param: str | None = None
    ema_decay: float | None = None   # default 0.0 (released configs: no student EMA)
    grad_clip: float | None = 1.0
    seed: int | None = None          # default 0
    precision: str | None = None     # default fp32
    grad_accum: int | None = None    # default 1
    checkpoint_every: int | None = None   # default 200
    keep_last: int | None = None     # default 3
    time_limit: float | None = None
    log_every: int | None = None     # default 25
    guided: bool | None = None       # guided distillation (docs/method.md §9): stage 1, then the rounds on it
    w_min: float | None = None       # default 0 (a w-conditioned teacher: its card's)
    w_max: float | None = None       # default 4 (likewise)
    guided_iters: int | None = None  # stage-1 iterations (default: --iters-per-round)
    hflip: bool | None = None        # random horizontal flip; None: the teacher run's (imported teachers: off)
    workers: int | None = None       # DataLoader workers for streamed data (default 0: read in the training process)
    compile: str | None = None       # torch.compile backend ("inductor"), None: eager. A speed option: --resume may change it

    def validate(self) -> "DistillConfig":
        _check_common(self)
        if self.student_param is not None:
            check_param(self.student_param)
        for name in ("start_steps", "final_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1 or v & (v - 1)):
                raise UserError(f"--{name.replace('_', '-')} must be a power of two (1, 2, 4, ...), got {v!r}")
        if self.start_steps is not None and not (self.final_steps or 1) < self.start_steps:
            raise UserError(f"--final-steps ({self.final_steps or 1}) must be smaller than --start-steps "
                            f"({self.start_steps})")
        for name in ("iters_per_round", "guided_iters"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.round_iters is not None and (not self.round_iters or any(
                not isinstance(k, int) or k < 1 for k in self.round_iters)):
            raise UserError(f"--round-iters must list positive integers, got {self.round_iters!r}")
        if self.last_rounds_factor is not None and not self.last_rounds_factor > 0:
            raise UserError(f"--last-rounds-factor must be positive, got {self.last_rounds_factor}")
        self._check_budget()
        _check_fraction(self.ema_decay, "student EMA decay")
        lo, hi = self.w_min, self.w_max
        if (lo is not None and not lo >= 0) or (hi is not None and not hi > (lo or 0.0)):
            raise UserError(f"guidance range needs 0 <= --w-min < --w-max, got [{lo}, {hi}]")
        return self

    def _check_budget(self) -> None:
        if self.switch_factor is not None and not self.switch_factor > 0:
            raise UserError(f"--switch-factor must be positive, got {self.switch_factor}")
        te = self.teacher_examples
        if te is not None and (isinstance(te, bool) or not isinstance(te, int) or te < 1):
            raise UserError(f"--teacher-examples must be a positive integer (the teacher's training examples), got {te!r}")
        if te is not None and self.budget is None:
            raise UserError("--teacher-examples is the reference of a fractional budget: give --budget F too")
        if self.budget is not None and not self.budget > 0:
            raise UserError(f"--budget must be positive, got {self.budget}")
        if self.budget is not None and te is None and not float(self.budget).is_integer():
            raise UserError(f"--budget {self.budget:g} without --teacher-examples is a number of examples and must be "
                            f"whole; for a fraction of the teacher's training add --teacher-examples E0")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def given(cfg) -> dict:
    """The fields `cfg` sets: those that differ from the dataclass default (for CLI fields: not None)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != _default(f)}


def with_defaults(cfg, kind: str):
    """`cfg` with every unset (None) field of DEFAULTS[kind] set to its documented default."""
    fill = {k: v for k, v in DEFAULTS[kind].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **{k: dict(v) if isinstance(v, dict) else v for k, v in fill.items()})


def _same(name: str, a, b) -> bool:
    if name == "schedule":    # an unshifted schedule is the same with or without the key
        return {"logsnr_shift": 0.0, **(a or {})} == {"logsnr_shift": 0.0, **(b or {})}
    return a == b


def _with_flag(kind: str, name: str, value) -> str:
    """How `value` of field `name` reads on the command line (a phrase after "made with")."""
    flag = flag_of(kind, name)
    if name == "schedule":
        value = (value or {}).get("logsnr_shift", 0.0)
    elif name == "ema_warmup":
        return "the default EMA warm-up" if value else flag
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if value is None:
        return f"no {flag}"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{flag} {value:.12g}" if isinstance(value, float) else f"{flag} {value}"


def resume_config(saved, asked, kind: str, out: Path, *, compare: dict | None = None):
    """The saved config `saved`, continued by the command's config `asked` (the one resume rule).

    Every field `asked` gives (see `given`) must equal the saved value unless its flag is resume-mutable;
    the first that does not stops the command with one line. `compare` maps field names to a function
    turning a given value into the saved form (e.g. --teacher to its resolved path). Mutable fields take
    the given value; session options (SESSION_FIELDS) are the command's own even when not given."""
    mutable = {_field_of(kind, f) for f in RESUME_MUTABLE[kind]}
    for name, value in given(asked).items():
        if name in mutable:
            continue
        value = (compare or {}).get(name, lambda v: v)(value)
        kept = getattr(saved, name)
        if not _same(name, value, kept):
            raise UserError(f"--resume: {out} was made with {_with_flag(kind, name, kept)}; drop "
                            f"{_with_flag(kind, name, value).removeprefix('no ')} or start a new run")
    changes = {n: getattr(asked, n) for n in mutable if getattr(asked, n) is not None or n in SESSION_FIELDS}
    return dataclasses.replace(saved, **changes)


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
