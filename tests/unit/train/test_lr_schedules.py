"""Learning-rate schedules of the training loop (pure functions of the step)."""

import math

import pytest

from progdistill.errors import UserError
from progdistill.train.config import TrainConfig
from progdistill.train.loop import lr_linear_decay, lr_warmup_constant, lr_warmup_cosine


def test_warmup_then_constant():
    lr = lr_warmup_constant(1e-3, 10)
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3) and lr(5000) == pytest.approx(1e-3)


def test_warmup_then_cosine_to_the_final_fraction():
    lr = lr_warmup_cosine(1e-3, 10, 110, 0.02)
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)                                   # decay starts after warm-up
    assert lr(60) == pytest.approx(1e-3 * (0.02 + 0.98 * 0.5))              # half way: cos(pi/2) = 0
    assert lr(110) == pytest.approx(2e-5) and lr(500) == pytest.approx(2e-5)
    steps = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))                   # monotone
    assert lr(35) == pytest.approx(1e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi / 4))))


def test_linear_decay_reaches_zero():
    lr = lr_linear_decay(1e-3, 100)
    assert lr(0) == pytest.approx(1e-3) and lr(50) == pytest.approx(5e-4) and lr(100) == 0.0


def test_bad_decay_options_are_refused():
    with pytest.raises(UserError, match="--lr-decay"):
        TrainConfig(lr_decay="step").validate()
    with pytest.raises(UserError, match="--lr-final-frac"):
        TrainConfig(lr_final_frac=1.5).validate()
