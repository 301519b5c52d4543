"""Run configs: a field counts as given only when set (None: not given), documented defaults fill the rest,
and the one resume rule (saved config; a differing given field that is not resume-mutable is one line)."""

from dataclasses import fields
from pathlib import Path

import pytest

from progdistill.errors import UserError
from progdistill.train.config import (
    DEFAULTS,
    RESUME_MUTABLE,
    DistillConfig,
    TrainConfig,
    given,
    resume_config,
    with_defaults,
)

NOT_CLI = {"weight_decay", "grad_clip", "hflip", "model_overrides"}     # set from Python only


def test_every_cli_field_defaults_to_not_given():
    for cls in (TrainConfig, DistillConfig):
        assert {f.name: f.default for f in fields(cls) if f.name not in NOT_CLI and f.default is not None} == {}
        assert given(cls()) == {}


def test_defaults_are_the_documented_ones():
    t = with_defaults(TrainConfig(), "train")
    assert (t.data, t.seed, t.weighting, t.precision, t.grad_accum, t.checkpoint_every, t.keep_last, t.log_every,
            t.workers, t.label_dropout, t.normalize, t.lr_final_frac, t.ema_warmup, t.class_cond) == (
        "digits", 0, "snr_trunc", "fp32", 1, 1000, 3, 25, 0, 0.1, "standard", 0.02, True, False)
    assert t.schedule == {"kind": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0}
    d = with_defaults(DistillConfig(), "distill")
    assert (d.final_steps, d.ema_decay, d.checkpoint_every, d.guided, d.grad_clip) == (1, 0.0, 200, False, 1.0)
    assert d.last_rounds_factor is None      # by the teacher: 1 for own teachers, 3 for imported ones (distill_config)
    assert with_defaults(TrainConfig(seed=7, lr=0.1), "train").seed == 7
    assert DEFAULTS["train"]["schedule"] is not with_defaults(TrainConfig(), "train").schedule   # never shared


def test_resume_mutable_flags():
    assert set(RESUME_MUTABLE["train"]) == set(RESUME_MUTABLE["distill"]) | {"--iters"}
    assert {"--time-limit", "--workers", "--compile", "--log-every", "--checkpoint-every",
            "--keep-last"} == set(RESUME_MUTABLE["distill"])


def test_seeds_are_checked():
    for bad in (-1, 2 ** 32, 1.5):
        with pytest.raises(UserError, match="--seed"):
            TrainConfig(seed=bad).validate()
        with pytest.raises(UserError, match="--seed"):
            DistillConfig(seed=bad).validate()


def test_the_resume_rule():
    saved = with_defaults(TrainConfig(data="toy:gmm", iters=8, lr=0.001, batch_size=64, workers=2, time_limit=5.0,
                                      log_every=4), "train")
    out = Path("runs/t")
    with pytest.raises(UserError, match=r"^--resume: runs/t was made with --lr 0.001; drop --lr 0.0003 or start a new "
                                        r"run$"):
        resume_config(saved, TrainConfig(lr=0.0003), "train", out)
    with pytest.raises(UserError, match="made with no --class-cond; drop --class-cond"):
        resume_config(saved, TrainConfig(class_cond=True), "train", out)
    with pytest.raises(UserError, match="--logsnr-shift 0; drop --logsnr-shift 1"):
        resume_config(saved, TrainConfig(schedule={**saved.schedule, "logsnr_shift": 1.0}), "train", out)
    same = resume_config(saved, TrainConfig(lr=0.001, data="toy:gmm", schedule={**saved.schedule, "logsnr_shift": 0.0}),
                         "train", out)
    assert same.workers is None and same.time_limit is None and same.log_every == 4   # session options: the command's
    more = resume_config(saved, TrainConfig(iters=20, log_every=1, workers=1), "train", out)
    assert (more.iters, more.log_every, more.workers) == (20, 1, 1)
    d = with_defaults(DistillConfig(teacher="/abs/t", iters_per_round=3, ema_decay=0.0), "distill")
    with pytest.raises(UserError, match="made with --student-ema 0; drop --student-ema 0.9"):
        resume_config(d, DistillConfig(ema_decay=0.9), "distill", out)
    with pytest.raises(UserError, match="--iters-per-round"):
        resume_config(d, DistillConfig(iters_per_round=4), "distill", out)
    assert resume_config(d, DistillConfig(teacher="t"), "distill", out, compare={"teacher": lambda v: "/abs/" + v})
