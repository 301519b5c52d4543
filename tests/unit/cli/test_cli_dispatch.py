"""The command line's shape: every subcommand carries one handler, every flag defaults to None (given only
when typed), and a command whose module fails to import says why in one line instead of vanishing."""

import argparse
import dataclasses
import sys

import pytest

from progdistill import cli
from progdistill.cli.main import build_parser

COMMANDS = {"demo", "prepare", "train", "distill", "sample", "eval", "report", "eval-guided", "export", "presets"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_is_there_with_one_handler():
    subs = _subparsers(build_parser())
    assert set(subs) == COMMANDS
    for name, p in subs.items():
        assert callable(p.get_default("func")), name


def test_every_flag_defaults_to_none_so_given_means_typed():
    for name, p in _subparsers(build_parser()).items():
        for action in p._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.default is None, f"{name} {action.option_strings[0]} defaults to {action.default!r}"


@pytest.mark.parametrize("argv, module", [
    (["eval", "--model", "M"], "progdistill.eval.evaluate"),
    (["report", "R"], "progdistill.eval.report"),
    (["eval-guided", "--model", "M"], "progdistill.eval.guided"),
    (["demo", "--guided", "--out", "O"], "progdistill.demo.guided"),
    (["train", "--out", "O"], "progdistill.train.teacher"),
    (["export", "M", "--out", "O"], "progdistill.interop.export"),
])
def test_a_command_whose_module_fails_to_import_says_why_in_one_line(argv, module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)     # `import module` now raises ImportError
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: progdistill {argv[0]} needs {module}:"), err
    assert "scripts/setup.sh" in err and "\n" not in err


def test_help_lists_match_the_evaluation_modules():
    from progdistill.cli import evaluation as ce
    from progdistill.eval import evaluate as ev
    from progdistill.eval import guided as eg
    assert ce.METHODS == ev.METHODS and ce.METRICS == tuple(ev.METRICS)
    assert [float(v) for v in ce.ANCESTRAL_GRID.split(",")] == list(ev.ANCESTRAL_GRID)
    assert [float(v) for v in ce.GUIDED_WS.split(",")] == list(eg.WS)
    assert [int(v) for v in ce.GUIDED_STEPS.split(",")] == list(eg.STEPS)


def test_config_field_maps_name_real_fields():
    from progdistill.cli.training import DISTILL_FIELDS, TRAIN_FIELDS
    from progdistill.train.config import DistillConfig, TrainConfig
    assert set(TRAIN_FIELDS.values()) | {"schedule"} <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(DISTILL_FIELDS.values()) | {"round_iters"} <= {f.name for f in dataclasses.fields(DistillConfig)}


def test_resume_help_states_the_training_codes_rule():
    from progdistill.cli.common import RESUME_MUTABLE
    from progdistill.train import config
    rule = getattr(config, "RESUME_MUTABLE", None)
    if rule is None:
        pytest.skip("train.config has no RESUME_MUTABLE yet")
    assert {k: set(v) for k, v in RESUME_MUTABLE.items()} == {k: set(rule[k]) for k in RESUME_MUTABLE}
    for kind in ("train", "distill"):
        text = " ".join(_subparsers(build_parser())[kind].format_help().split())
        assert all(flag in text.split("on --resume:")[1] for flag in (*rule[kind], "--no-progress"))
