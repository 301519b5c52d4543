"""Flags count only when typed (only those reach the run configs), and flags that cannot apply are refused
in one line before any work."""

from pathlib import Path

import pytest

from progdistill import cli
from progdistill.cli.main import build_parser
from progdistill.cli.training import distill_given, train_given


def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_train_passes_only_typed_flags():
    assert train_given(_parse("train", "--out", "X")) == {}          # no data, no defaults: the config fills them
    assert train_given(_parse("train", "--out", "X", "--no-ema-warmup")) == {"ema_warmup": False}
    assert train_given(_parse("train", "--out", "X", "--data", "toy:gmm", "--seed", "3", "--class-cond",
                              "--weighting", "snr", "--keep-last", "1")) == {
        "data": "toy:gmm", "seed": 3, "class_cond": True, "weighting": "snr", "keep_last": 1}
    assert train_given(_parse("train", "--out", "X", "--logsnr-shift", "0")) == {
        "schedule": {"kind": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0, "logsnr_shift": 0.0}}


def test_distill_passes_only_typed_flags_and_resume_needs_no_teacher():
    assert distill_given(_parse("distill", "--out", "X", "--resume")) == {}
    assert distill_given(_parse("distill", "--out", "X", "--resume", "--time-limit", "2")) == {"time_limit": 2.0}
    assert distill_given(_parse("distill", "--teacher", "T", "--out", "X", "--student-ema", "0.9",
                                "--round-iters", "3,2", "--guided", "--w-max", "2")) == {
        "teacher": "T", "ema_decay": 0.9, "round_iters": [3, 2], "guided": True, "w_max": 2.0}


def _one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_distill_without_teacher_or_resume_is_one_line(capsys):
    assert "--teacher" in _one_line_error(["distill", "--out", "X"], capsys)


# Guidance flags without --guided: refused by distill once it knows the teacher (tests/e2e/test_resume_rule.py).


@pytest.mark.parametrize("sampler", [[], ["--sampler", "ddim"], ["--sampler", "stochastic"], ["--sampler", "dpmpp2m"]])
def test_logvar_frac_is_refused_unless_ancestral(sampler, capsys):
    err = _one_line_error(["sample", "--model", "/nonexistent", "--logvar-frac", "0.3", "--out", "x.png", *sampler],
                          capsys)
    assert "--logvar-frac" in err and "ancestral" in err


def test_ancestral_only_eval_flags_are_refused_without_ancestral(capsys):
    err = _one_line_error(["eval", "--model", "/nonexistent", "--sampler", "pd,ddim", "--ancestral-grid", "0,1"],
                          capsys)
    assert "--ancestral-grid" in err


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
@pytest.mark.parametrize("argv", [["sample", "--model", "/nonexistent", "--out", "x.png"],
                                  ["eval", "--model", "/nonexistent"], ["eval-guided", "--model", "/nonexistent"],
                                  ["report", "/nonexistent"], ["demo", "--out", "/nonexistent/demo"],
                                  ["train", "--out", "/nonexistent/t"],
                                  ["distill", "--teacher", "/nonexistent", "--out", "/nonexistent/d"]])
def test_out_of_range_seed_is_one_line(argv, seed, capsys):
    assert "--seed" in _one_line_error([*argv, "--seed", seed], capsys)


def test_the_demo_passes_its_budgets_and_default_folders(monkeypatch):
    from progdistill.demo import guided, plain
    calls = []
    monkeypatch.setattr(plain, "run_demo", lambda **kw: calls.append(("plain", kw)))
    monkeypatch.setattr(guided, "run_guided_demo", lambda **kw: calls.append(("guided", kw)))
    assert cli.main(["demo"]) == 0 and cli.main(["demo", "--guided", "--teacher-iters", "7"]) == 0
    assert cli.main(["demo", "--guided", "--out", "runs/demo", "--quick", "--iters-per-round", "2",
                     "--last-rounds-factor", "3", "--num-eval", "0", "--seed", "5"]) == 0
    none = {"num_eval": None, "teacher_iters": None, "iters_per_round": None, "last_rounds_factor": None}
    assert calls == [
        ("plain", {"out": Path("runs/demo"), "quick": False, "seed": 0, **none}),
        ("guided", {"out": Path("runs/demo-guided"), "quick": False, "seed": 0, **none, "teacher_iters": 7}),
        ("guided", {"out": Path("runs/demo"), "quick": True, "seed": 5, "num_eval": 0, "teacher_iters": None,
                    "iters_per_round": 2, "last_rounds_factor": 3.0})]
