"""Issue 15 on tiny budgets: one resume rule for teacher training, distillation and guided stage 1 (a changed
flag stops the command in one line and writes nothing; `--resume` needs no flag the run records), and
w-conditioned teachers (a guidance-distilled model distilled further trains every round with w, with or
without --guided; its card's range is the only one)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from progdistill import cli
from progdistill.errors import UserError
from progdistill.store.card import CARD, read_json
from progdistill.store.guided import check_guidable
from progdistill.store.load import load_card
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train

TINY = {"block_out_channels": (8, 16), "norm_num_groups": 8, "attention_levels": ()}
WEIGHTS = "diffusion_pytorch_model.safetensors"
ROUND = dict(start_steps=4, final_steps=2, iters_per_round=2, batch_size=16, checkpoint_every=2, log_every=2)


def _snapshot(folder: Path) -> dict:
    """Every path under `folder` with its modification time (links not followed)."""
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _refused(argv: list[str], capsys, *words: str, run: Path | None = None) -> str:
    """`argv` exits 2 with one `error:` line holding `words`; `run` (if given) is left exactly as it was."""
    before = _snapshot(run) if run is not None else None
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err
    if run is not None:
        assert _snapshot(run) == before
    return err


def _same(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A toy teacher and its distillation; a class-conditional digits teacher and its finished guided run."""
    root = tmp_path_factory.mktemp("resume")
    toy = train(TrainConfig(data="toy:gmm", iters=2, batch_size=32, checkpoint_every=2, log_every=2), root / "toy",
                progress=False)
    plain = distill(DistillConfig(teacher=str(toy), start_steps=2, iters_per_round=1, batch_size=32,
                                  checkpoint_every=1), root / "plain", progress=False)
    cond = train(TrainConfig(data="digits", class_cond=True, iters=2, batch_size=16, model_overrides=TINY, param="eps",
                             checkpoint_every=2, log_every=2), root / "cond", progress=False)
    guided = distill(DistillConfig(teacher=str(cond), guided=True, guided_iters=2, **ROUND), root / "guided",
                     progress=False)
    return {"root": root, "toy": toy, "plain": plain, "cond": cond, "guided": guided}


@pytest.mark.parametrize("flag, value", [("--lr", "0.00123"), ("--batch-size", "16"), ("--seed", "1"),
                                         ("--data", "toy:moons")])
def test_train_resume_with_a_changed_flag_stops_in_one_line_and_writes_nothing(runs, flag, value, capsys):
    toy = runs["toy"]
    err = _refused(["train", "--out", str(toy), "--resume", "--no-progress", flag, value], capsys,
                   "--resume", f"{flag} {value}", "start a new run", run=toy)
    assert str(toy) in err


def test_train_resume_may_extend_the_budget(runs, tmp_path):
    run = tmp_path / "t"
    shutil.copytree(runs["toy"], run, symlinks=True)
    assert cli.main(["train", "--out", str(run), "--resume", "--iters", "3", "--lr", "0.001", "--batch-size", "32",
                     "--sample-steps", "1", "--no-progress"]) == 0     # typed, but equal to the run's: fine
    assert read_json(run / CARD)["iteration"] == 3 and read_json(run / "config.json")["iters"] == 3


def test_distill_resume_with_a_changed_flag_or_teacher_stops_and_writes_nothing(runs, capsys):
    plain, toy = runs["plain"], runs["toy"]
    _refused(["distill", "--out", str(plain), "--resume", "--iters-per-round", "5"], capsys,
             "--resume", "was made with --iters-per-round 1", "drop --iters-per-round 5", run=plain)
    other = runs["root"] / "toy-copy"
    shutil.copytree(toy, other, symlinks=True)
    _refused(["distill", "--out", str(plain), "--resume", "--teacher", str(other)], capsys,
             f"--teacher {toy}", f"drop --teacher {other}", run=plain)


def test_guided_stage1_resume_with_a_changed_w_max_stops_then_resumes_with_no_flag(runs, tmp_path, capsys):
    part = tmp_path / "part"
    distill(DistillConfig(teacher=str(runs["cond"]), guided=True, guided_iters=2, time_limit=1e-9, **ROUND), part,
            progress=False)                                    # stops after one stage-1 step
    assert not (part / "guided").exists() and (part / "state-guided").is_dir()
    _refused(["distill", "--out", str(part), "--resume", "--guided", "--w-max", "3"], capsys,
             "was made with --w-max 4", "drop --w-max 3", run=part)
    for _ in range(6):                                         # `--resume --out X`: no flag the run records
        if read_json(part / CARD).get("latest") == "steps-0002":
            break
        assert cli.main(["distill", "--out", str(part), "--resume", "--no-progress"]) == 0
    for sub in ("guided", "steps-0002"):
        _same(runs["guided"] / sub / "model", part / sub / "model")


def test_a_w_conditioned_teacher_is_distilled_with_its_w_draws(runs, tmp_path, capsys):
    """Finding 1: without --guided the rounds draw w from the teacher's card, exactly as stage 2 of a guided run."""
    w_teacher = runs["guided"] / "guided"
    out = distill(DistillConfig(teacher=str(w_teacher), **ROUND), tmp_path / "w", progress=False)
    assert "no guidance stage 1" in capsys.readouterr().out
    _same(runs["guided"] / "steps-0002" / "model", out / "steps-0002" / "model")
    assert read_json(out / "steps-0002" / CARD)["guidance"] == {"w_min": 0.0, "w_max": 4.0}
    assert read_json(out / "config.json")["guided"] is True


def test_guided_flag_with_a_w_conditioned_teacher_works(runs, tmp_path):
    """Finding 6: --guided on a guidance-distilled model skips stage 1 (no "plainly distilled" refusal)."""
    out = tmp_path / "g"
    assert cli.main(["distill", "--teacher", str(runs["guided"] / "guided"), "--guided", "--out", str(out),
                     "--start-steps", "4", "--final-steps", "2", "--iters-per-round", "2", "--batch-size", "16",
                     "--no-progress"]) == 0
    assert not (out / "guided").exists() and not (out / "state-guided").exists()
    _same(runs["guided"] / "steps-0002" / "model", out / "steps-0002" / "model")


def test_guidance_options_that_cannot_apply_are_refused_in_one_line(runs, tmp_path, capsys):
    w_teacher = str(runs["guided"] / "guided")
    err = _refused(["distill", "--teacher", w_teacher, "--guided", "--guided-iters", "3", "--out",
                    str(tmp_path / "a")], capsys, "guidance-distilled", "drop --guided-iters 3")
    assert "plainly" not in err and not (tmp_path / "a").exists()
    _refused(["distill", "--teacher", w_teacher, "--guided", "--w-max", "3", "--out", str(tmp_path / "b")], capsys,
             "guidance-distilled", "w in [0, 4]", "drop --w-max 3")
    _refused(["distill", "--teacher", str(runs["toy"]), "--w-max", "3", "--out", str(tmp_path / "c")], capsys,
             "--w-max is for guided distillation", "is an unconditional teacher")
    _refused(["distill", "--teacher", str(runs["cond"]), "--guided-iters", "2", "--out", str(tmp_path / "d")], capsys,
             "--guided-iters is for guided distillation")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    with pytest.raises(UserError, match="guidance-distilled") as e:
        check_guidable(load_card(w_teacher), w_teacher)
    assert "plainly" not in str(e.value)
