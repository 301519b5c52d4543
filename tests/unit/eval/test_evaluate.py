"""progdistill.evaluate: every metric path against a known answer, record format, caches, errors."""

import json
import math

import numpy as np
import pytest
import torch
from gaussian import GaussianDenoiser

from progdistill import cli
from progdistill.data.datasets import load_data
from progdistill.data.toy import sample_toy, toy_log_density
from progdistill.diffusion.schedules import Schedule
from progdistill.errors import UserError
from progdistill.eval import evaluate as ev
from progdistill.eval import scoring
from progdistill.eval.likelihood import ode_nll
from progdistill.pipeline import load
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Tiny toy:gmm and digits teacher + distillation runs, built once for this file."""
    tmp = tmp_path_factory.mktemp("eval-runs")
    train(TrainConfig(data="toy:gmm", iters=8, batch_size=64), tmp / "t", progress=False)
    distill(DistillConfig(teacher=str(tmp / "t"), start_steps=8, final_steps=1, iters_per_round=4, batch_size=64),
            tmp / "d", progress=False)
    train(TrainConfig(data="digits", iters=4, batch_size=16), tmp / "dt", progress=False)
    distill(DistillConfig(teacher=str(tmp / "dt"), start_steps=4, final_steps=1, iters_per_round=2, batch_size=16),
            tmp / "dd", progress=False)
    return tmp


DIGIT_METRICS = ["fd_pixel", "fd_feature", "precision", "recall", "class_coverage", "class_entropy"]


def test_digits_metrics_known_answers():
    held = load_data("digits", split="heldout")
    scorer = scoring.Scorer("digits", "digits", DIGIT_METRICS, (1, 8, 8), num=500, seed=0, cache=ev.cache_dir(),
                       log=lambda s: None)
    same = scorer(held.x)                       # the reference against itself
    assert abs(same["fd_pixel"]) < 1e-6 and abs(same["fd_feature"]) < 1e-4
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["class_coverage"] == 1.0
    assert same["class_entropy"] == pytest.approx(math.log(10), abs=0.01)   # 50 digits of each class
    other = scorer(load_data("digits", split="train").x)   # another sample of the same distribution: small
    noise = scorer(torch.rand(500, 1, 8, 8) * 2 - 1)       # uniform noise: far
    assert 0 < other["fd_pixel"] < 0.1 * noise["fd_pixel"] and 0 < other["fd_feature"] < 0.1 * noise["fd_feature"]
    assert other["precision"] > 0.8 and noise["precision"] < 0.2
    ones = scorer(held.x[held.y == 1])                      # one class only
    assert ones["class_coverage"] == pytest.approx(0.1) and ones["class_entropy"] < 0.2


def test_toy_metrics_known_answers():
    scorer = scoring.Scorer("toy:gmm", "toy", ["sw", "energy", "xent_true"], (2,), num=2000, seed=0, cache=None)
    true = sample_toy("gmm", 2000, torch.Generator().manual_seed(123))   # a true sampler, other draw
    good, bad = scorer(true), scorer(true + 0.5)
    assert good["sw"] < 0.1 and abs(good["energy"]) < 0.01        # finite-sample noise only
    assert bad["sw"] == pytest.approx(0.5, abs=0.1) and bad["energy"] > 0.1   # shift v: SW2 = |v| / sqrt(2)
    # xent_true of true samples is the entropy of the mixture, -E log p(x): the reference's own value
    assert good["xent_true"] == pytest.approx(float(-toy_log_density("gmm", scorer.ref.double()).mean()), abs=0.05)
    assert bad["xent_true"] > good["xent_true"] + 1


def test_ode_nll_matches_gaussian_closed_form():
    s = 0.5
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * s
    nll, nfe = ode_nll(GaussianDenoiser(0.0, s), Schedule(), x)
    exact = 0.5 * (x.double() ** 2).sum(1).numpy() / s**2 + math.log(2 * math.pi * s**2)
    np.testing.assert_allclose(nll, exact, atol=2e-3)
    assert nfe > 10


def test_evaluate_toy_records_and_json(runs, tmp_path):
    recs = ev.evaluate(runs / "d", steps=[1, 2, 4], metrics=["sw", "energy", "xent_true", "psnr_teacher", "nll"],
                       num=64, seed=3, reference=True, ancestral_grid=(0.0, 1.0), tune_num=32, progress=False,
                       log=lambda s: None)
    pairs = [(r["method"], r["steps"]) for r in recs]
    assert pairs == [(m, n) for n in (1, 2, 4) for m in ("pd", "ddim", "ancestral", "dpmpp2m")] + [
        ("ddim", 8), ("teacher_ode", None)]
    for r in recs[:-1]:
        assert r["nfe"] == r["steps"] and r["num"] == 64 and r["seed"] == 3 and r["data"] == "toy:gmm"
        assert all(math.isfinite(r[k]) for k in ("sw", "energy", "xent_true", "psnr_teacher", "samples_per_s"))
        assert ("logvar_frac" in r) == (r["method"] == "ancestral")
    assert recs[-2]["psnr_teacher"] == ev.PSNR_CAP                      # the reference against itself
    assert all(r["psnr_teacher"] < ev.PSNR_CAP for r in recs[:-2])
    anc = [r for r in recs if r["method"] == "ancestral"]
    assert anc[0]["logvar_frac"] == 0.0 and all(r["logvar_frac"] in (0.0, 1.0) for r in anc)
    assert {"2", "4"} <= set(json.loads((runs / "d" / ev.TUNING_FILE).read_text()))
    ode = recs[-1]
    # nll_true: -mean log p_data of 64 true points ~ the mixture's entropy, 1 + log(2 pi 0.01) + log 8 = 0.31
    assert math.isfinite(ode["nll"]) and ode["nll_true"] == pytest.approx(0.31, abs=0.4) and ode["nfe"] > 0
    # the CLI writes the same records as JSON
    out = tmp_path / "e.json"
    code = cli.main(["eval", "--model", str(runs / "d"), "--steps", "1,2", "--sampler", "pd,ddim", "--num", "32",
                     "--json", str(out), "--no-progress"])
    data = json.loads(out.read_text())
    assert code == 0 and [(r["method"], r["steps"]) for r in data] == [("pd", 1), ("ddim", 1), ("pd", 2), ("ddim", 2)]
    assert {"sw", "energy", "xent_true", "psnr_teacher", "nfe", "num", "seed", "samples_per_s"} <= set(data[0])


def test_ref_num_subsets_the_teacher_match_and_drops_the_teacher_row(runs):
    recs = ev.evaluate(runs / "d", steps=[2], methods=["pd"], metrics=["sw", "psnr_teacher"], num=40, ref_num=12,
                       reference=True, progress=False, log=lambda s: None)
    full = ev.evaluate(runs / "d", steps=[2], methods=["pd"], metrics=["psnr_teacher"], num=12, progress=False)
    assert [(r["method"], r["steps"]) for r in recs] == [("pd", 2)]   # no ("ddim", 8) row on fewer samples
    assert recs[0]["psnr_num"] == 12 and recs[0]["num"] == 40
    assert recs[0]["psnr_teacher"] == pytest.approx(full[0]["psnr_teacher"], rel=1e-5)   # same first 12 seeds


def test_teacher_samples_cache_reused_and_extended(runs, monkeypatch):
    run = ev.resolve_run(runs / "d")
    teacher = load(run.teacher, device="cpu")
    x1, _ = ev.teacher_samples(run, teacher, num=20, seed=11, log=lambda s: None)
    calls = []
    real = ev.timed_generate
    monkeypatch.setattr(ev, "timed_generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    x2, _ = ev.teacher_samples(run, teacher, num=10, seed=11)
    assert calls == [] and torch.equal(x2, x1[:10])                   # served from the cache
    x3, _ = ev.teacher_samples(run, teacher, num=30, seed=11, log=lambda s: None)
    assert [(c["start"], c["num"]) for c in calls] == [(20, 10)]     # only the missing samples
    assert torch.equal(x3[:20], x1)
    direct = teacher.sample(num=30, steps=8, seed=11)
    torch.testing.assert_close(x3, direct)                           # same seeds as generating at once


def test_ancestral_tuning_uses_the_training_split(runs, monkeypatch):
    splits = []
    real = scoring.load_data
    monkeypatch.setattr(scoring, "load_data", lambda spec, **k: splits.append(k.get("split")) or real(spec, **k))
    run = ev.resolve_run(runs / "dd")
    teacher = load(run.teacher, device="cpu")
    frac = ev.tune_ancestral(run, teacher, 2, spec="digits", family="digits", grid=(0.0, 0.5), num=48, seed=0,
                             log=lambda s: None)
    assert splits and set(splits) == {"train"}
    entry = json.loads((runs / "dd" / ev.TUNING_FILE).read_text())["2"]
    assert entry["split"] == "train" and entry["logvar_frac"] == frac and len(entry["scores"]) == 2
    monkeypatch.setattr(ev, "timed_generate", lambda *a, **k: pytest.fail("tuning should come from the cache"))
    assert ev.tune_ancestral(run, teacher, 2, spec="digits", family="digits", grid=(0.0, 0.5), num=48,
                             seed=0) == frac


def test_evaluate_digits_end_to_end(runs):
    recs = ev.evaluate(runs / "dd", steps=[1, 2], methods=["pd", "ddim", "dpmpp2m"], num=80, progress=False,
                       log=lambda s: None)
    assert [(r["method"], r["steps"]) for r in recs] == [(m, n) for n in (1, 2) for m in ("pd", "ddim", "dpmpp2m")]
    for r in recs:
        assert set(DIGIT_METRICS + ["psnr_teacher", "samples_per_s"]) <= set(r)
        assert r["fd_pixel"] > 0 and r["fd_feature"] > 0 and 0 <= r["precision"] <= 1 and 0 < r["class_coverage"] <= 1
    # a steps-NNNN folder evaluates that student against the run's teacher
    one = ev.evaluate(runs / "dd" / "steps-0001", methods=["pd"], metrics=["fd_pixel"], num=80, progress=False)
    assert one[0]["fd_pixel"] == pytest.approx(recs[0]["fd_pixel"])


def test_fid_path_with_a_stand_in_detector(runs, tmp_path, monkeypatch):
    from progdistill.eval import fid

    class Detector(torch.nn.Module):   # the TorchScript detector's interface, random projection of uint8 pixels
        def __init__(self):
            super().__init__()
            self.w = torch.randn(3 * 64, 16, generator=torch.Generator().manual_seed(0))

        def forward(self, x, return_features=True):
            return (x.float().flatten(1) / 255) @ self.w

    asked = []
    monkeypatch.setattr(fid, "load_inception", lambda path, **k: asked.append(k.get("device")) or Detector())
    recs = ev.evaluate(runs / "dd", steps=[1], methods=["ddim"], metrics=["fid"], num=80, cache=tmp_path,
                       progress=False, device="cpu")
    assert recs[0]["fid"] > 0 and len(list(tmp_path.glob("digits-heldout-*.npz"))) == 1   # fid.reference_key
    # the detector is loaded on the model's device (on a GPU machine: features computed there)
    assert asked and all(d == torch.device("cpu") for d in asked)


@pytest.mark.parametrize("kw, match", [
    (dict(methods=["pd", "euler"]), "unknown method 'euler'"),
    (dict(metrics=["fd_pixel", "bogus"]), "unknown metric 'bogus'"),
    (dict(metrics=["fd_feature"]), "does not apply to toy:gmm"),
    (dict(steps=[2, 16]), r"no distilled model for steps 16 .*have: 1, 2, 4"),
    (dict(data="toy:moons", metrics=["xent_true"]), "needs a known density"),
])
def test_user_errors(runs, kw, match):
    with pytest.raises(UserError, match=match):
        ev.evaluate(runs / "d", num=16, progress=False, **kw)


def test_user_errors_teacher_run_and_fid_file(runs, tmp_path):
    with pytest.raises(UserError, match="teacher run: method pd"):
        ev.evaluate(runs / "t", methods=["pd"], num=16, progress=False)
    with pytest.raises(UserError, match="Inception detector not found"):
        ev.evaluate(runs / "dd", steps=[1], metrics=["fid"], inception=tmp_path / "missing.pt", num=16,
                    progress=False)
    assert cli.main(["eval", "--model", str(runs / "d"), "--sampler", "nope"]) == 2
