"""Vector data in any units trains like unit-scale data: the normaliser is fitted once, stored in the
card, applied in training and distillation and inverted in sampling (issue: teachers that reach the data)."""

import json

import numpy as np
import pytest
import torch

from progdistill.data.toy import gmm_mode_share, sample_toy
from progdistill.errors import UserError
from progdistill.pipeline import load
from progdistill.store.card import CARD
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train

SCALE, SHIFT = 0.01, torch.tensor([5.0, -3.0])
SMALL = {"hidden": 128, "depth": 3}


within_3sigma = gmm_mode_share


def _npz(path, x):
    np.savez(path, x=x.numpy())
    return f"npz:{path}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("norm")
    unit = sample_toy("gmm", 4000, torch.Generator().manual_seed(0))
    specs = {"unit": _npz(root / "unit.npz", unit), "scaled": _npz(root / "scaled.npz", unit * SCALE + SHIFT)}
    out = {}
    for name, normalize in [("unit", "standard"), ("scaled", "standard"), ("raw", "none")]:
        spec = specs["unit" if name == "unit" else "scaled"]
        train(TrainConfig(data=spec, iters=1000, batch_size=256, model_overrides=SMALL, normalize=normalize,
                          log_every=100, checkpoint_every=500), root / name, progress=False)
        out[name] = root / name
    return out


def test_scaled_and_shifted_data_train_to_the_same_model(runs):
    unit, scaled = load(runs["unit"]), load(runs["scaled"])
    card = json.loads((runs["scaled"] / CARD).read_text())["normalizer"]
    assert card["kind"] == "standard" and card["shift"] == pytest.approx(SHIFT.tolist(), abs=0.1 * SCALE)
    x_unit = unit.sample(num=1000, steps=32, seed=3)
    x_scaled = scaled.sample(num=1000, steps=32, seed=3)             # in the data's own units
    assert (x_scaled.mean(0) - SHIFT).abs().max() < 0.2 * SCALE
    torch.testing.assert_close((x_scaled - SHIFT) / SCALE, x_unit, atol=2e-3, rtol=0)
    assert within_3sigma(x_unit) > 0.4          # a short run (the default recipe reaches ~0.95)


def test_without_normalisation_the_scaled_data_is_learnt_badly(runs):
    """Negative control: the same x0.01 data fed raw (--normalize none) gives far fewer samples on the modes."""
    good = within_3sigma((load(runs["scaled"]).sample(num=1000, steps=32, seed=3) - SHIFT) / SCALE)
    raw = within_3sigma((load(runs["raw"]).sample(num=1000, steps=32, seed=3) - SHIFT) / SCALE)
    assert raw < good - 0.3, (raw, good)


def test_resume_and_distillation_reuse_the_teachers_normaliser(runs, tmp_path):
    """Distillation encodes with the teacher card's normaliser (never refits): its student samples in data units."""
    out = tmp_path / "d"
    distill(DistillConfig(teacher=str(runs["scaled"]), start_steps=8, final_steps=4, iters_per_round=20,
                          batch_size=128, log_every=10), out, progress=False)
    teacher_card = json.loads((runs["scaled"] / CARD).read_text())
    student_card = json.loads((out / "steps-0004" / CARD).read_text())
    assert student_card["normalizer"] == teacher_card["normalizer"]
    x4 = load(out).sample(num=500, seed=0)
    assert (x4.mean(0) - SHIFT).abs().max() < 0.3 * SCALE


def test_bad_normalize_option_is_refused_on_load():
    with pytest.raises(UserError, match="--normalize"):
        TrainConfig(data="toy:gmm", normalize="zscore").validate()
