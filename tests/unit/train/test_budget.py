"""A distillation budget a user can state (issue 16, 2a): --budget E examples, or a fraction F of the teacher's
--teacher-examples E0, shared between rounds by weight (1; x --last-rounds-factor for the last two; x
--switch-factor for the first when the parameterisation switches); refusals in one line; the run records it."""

import itertools
import json

import pytest

from progdistill import cli
from progdistill.errors import UserError
from progdistill.train.config import DistillConfig, with_defaults
from progdistill.train.distill_config import distill_config, resolve_budget
from progdistill.train.rounds import budget_iters, plan_rounds, round_weights


def _cfg(**kw) -> DistillConfig:
    base = dict(teacher="T", data="toy:gmm", start_steps=256, final_steps=1, lr=1e-3, batch_size=64,
                iters_per_round=100, last_rounds_factor=1.0)   # (resolve_config fills it from the teacher)
    return with_defaults(DistillConfig(**{**base, **kw}), "distill").validate()


def _old_plan_rounds(start_steps, final_steps, iters_per_round, last_rounds_factor, round_iters=None):
    """plan_rounds before --switch-factor existed (the output existing runs and figures were made with)."""
    rounds, n = [], start_steps
    while n > final_steps:
        n //= 2
        rounds.append({"steps": n, "iters": iters_per_round})
    if round_iters is not None:
        return [dict(r, iters=int(k)) for r, k in zip(rounds, round_iters)]
    for r in rounds[-2:]:
        r["iters"] = int(round(iters_per_round * last_rounds_factor))
    return rounds


def test_default_switch_factor_leaves_plan_rounds_unchanged():
    for n0, n1, k, f in itertools.product((2, 4, 8, 256, 1024), (1, 2, 4), (1, 3, 100, 2500), (0.5, 1.0, 1.5, 2.0, 4.0)):
        if n1 < n0:
            assert plan_rounds(n0, n1, k, f) == plan_rounds(n0, n1, k, f, switch_factor=1.0) == \
                _old_plan_rounds(n0, n1, k, f)
    assert plan_rounds(8, 1, 5, 2.0, [7, 6, 5]) == _old_plan_rounds(8, 1, 5, 2.0, [7, 6, 5])


def test_switch_factor_multiplies_the_first_round_without_a_budget():
    assert [r["iters"] for r in plan_rounds(16, 1, 100, 2.0, switch_factor=3.0)] == [300, 100, 200, 200]
    assert [r["iters"] for r in plan_rounds(2, 1, 100, 2.0, switch_factor=1.5)] == [300]     # first and last
    assert [r["iters"] for r in plan_rounds(8, 1, 10, 1.0, [4, 5, 6], switch_factor=3.0)] == [4, 5, 6]   # explicit


def test_round_weights():
    assert round_weights(4, 1.0) == [1.0] * 4
    assert round_weights(4, 2.0) == [1.0, 1.0, 2.0, 2.0]
    assert round_weights(4, 2.0, 3.0) == [3.0, 1.0, 2.0, 2.0]
    assert round_weights(2, 2.0, 3.0) == [6.0, 2.0]
    assert round_weights(1, 2.0, 3.0) == [6.0]


@pytest.mark.parametrize("examples, batch, f, s", [(192_000, 64, 1.0, 1.0), (1_000_003, 48, 2.0, 1.0),
                                                   (500_000, 128, 2.0, 3.0), (8 * 64, 64, 1.0, 1.0),
                                                   (77_777, 32, 0.5, 4.0)])
def test_the_budget_split_spends_the_budget_by_weight(examples, batch, f, s):
    w = round_weights(8, f, s)
    iters = budget_iters(examples, batch, w)
    assert len(iters) == 8 and min(iters) >= 1
    assert examples - batch < sum(iters) * batch <= examples                # all of E, never more
    for k, wr in zip(iters, w):
        assert abs(k - examples * wr / sum(w) / batch) < 1


def test_resolve_budget_count_fraction_and_switch():
    rounds = 8    # 256 -> 1
    cfg = resolve_budget(_cfg(budget=1_000_000.0), switch=False)
    assert cfg.round_iters == [1954] + [1953] * (rounds - 1)     # 15,625 iterations: the one left goes first
    frac = resolve_budget(_cfg(budget=0.5, teacher_examples=2_000_000, last_rounds_factor=2.0), switch=False)
    assert frac.round_iters == resolve_budget(_cfg(budget=1e6, last_rounds_factor=2.0), switch=False).round_iters
    assert frac.round_iters == budget_iters(1e6, 64, [1.0] * 6 + [2.0] * 2)                # last two rounds x 2
    assert frac.round_iters[0] in (1562, 1563) and frac.round_iters[-1] in (3125, 3126)
    sw = resolve_budget(_cfg(budget=1e6, switch_factor=3.0), switch=True).round_iters
    assert sw == budget_iters(1e6, 64, [3.0] + [1.0] * 7) and sw[0] in (4687, 4688) and sw[1] in (1562, 1563)
    assert resolve_budget(_cfg(budget=1e6, switch_factor=3.0), switch=False).round_iters == cfg.round_iters
    # the resolved plan is the run's round_iters (config.json); resolving again changes nothing
    assert resolve_budget(cfg, switch=True) is cfg
    assert plan_rounds(256, 1, 100, 1.0, cfg.round_iters, switch_factor=3.0)[0]["iters"] == cfg.round_iters[0]


@pytest.mark.parametrize("kw, message", [
    (dict(budget=1000.5), "must be whole"),
    (dict(budget=0.0), "--budget must be positive"),
    (dict(budget=-3.0, teacher_examples=100), "--budget must be positive"),
    (dict(budget=0.5, teacher_examples=0), "--teacher-examples must be a positive integer"),
    (dict(budget=0.5, teacher_examples=2.5), "--teacher-examples must be a positive integer"),
    (dict(teacher_examples=1000), "give --budget F too"),
    (dict(switch_factor=0.0), "--switch-factor must be positive"),
])
def test_bad_budget_values_are_refused(kw, message):
    with pytest.raises(UserError, match=message):
        DistillConfig(**kw).validate()


def test_a_budget_with_iteration_flags_is_refused(tmp_path):
    for kw, flag in ((dict(iters_per_round=10), "--iters-per-round"), (dict(round_iters=[1, 2]), "--round-iters")):
        with pytest.raises(UserError, match=f"--budget and {flag} both set"):
            distill_config(DistillConfig(teacher="T", budget=1000.0, **kw), tmp_path / "o", resume=False)
    with pytest.raises(UserError, match="drop --switch-factor"):
        distill_config(DistillConfig(teacher="T", round_iters=[1, 2], switch_factor=2.0), tmp_path / "o", resume=False)


def test_a_budget_under_one_batch_per_round_is_refused():
    with pytest.raises(UserError, match=r"too small: 8 rounds need at least one batch each \(8 x 64 = 512\)"):
        resolve_budget(_cfg(budget=511.0), switch=False)
    with pytest.raises(UserError, match="0.001 x 1000"):
        resolve_budget(_cfg(budget=0.001, teacher_examples=1000), switch=False)
    assert resolve_budget(_cfg(budget=512.0), switch=False).round_iters == [1] * 8


def _one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_budget_run_records_examples_and_a_changed_budget_is_refused_on_resume(tmp_path, capsys):
    t, d = tmp_path / "t", tmp_path / "d"
    assert cli.main(["train", "--data", "toy:gmm", "--out", str(t), "--iters", "2", "--batch-size", "32",
                     "--no-progress", "--sample-steps", "2"]) == 0
    capsys.readouterr()
    argv = ["distill", "--teacher", str(t), "--out", str(d), "--start-steps", "4", "--batch-size", "16",
            "--budget", "0.75", "--teacher-examples", "128", "--last-rounds-factor", "1", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "96 examples (--budget 0.75 x --teacher-examples 128)" in out
    assert "the teacher trained on 64 (2 iters x batch 32)" in out
    config = json.loads((d / "config.json").read_text())
    assert config["budget"] == 0.75 and config["teacher_examples"] == 128 and config["switch_factor"] == 1.0
    assert config["round_iters"] == [3, 3]                   # 96 examples / 2 rounds / batch 16
    card = json.loads((d / "progdistill.json").read_text())
    assert [r["examples"] for r in card["rounds"]] == [48, 48] and card["examples"] == 96
    err = _one_line_error(["distill", "--out", str(d), "--resume", "--budget", "1"], capsys)
    assert "--budget 0.75" in err
    err = _one_line_error(["distill", "--teacher", str(t), "--out", str(tmp_path / "e"), "--budget", "1000",
                           "--iters-per-round", "3"], capsys)
    assert "--budget and --iters-per-round" in err
    err = _one_line_error(["distill", "--teacher", str(t), "--out", str(tmp_path / "e"), "--budget", "1000.5"], capsys)
    assert "must be whole" in err
