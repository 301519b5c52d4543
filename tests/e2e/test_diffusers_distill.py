"""Distilling, sampling and evaluating a teacher trained elsewhere (`diffusers:PATH`), end to end on tiny budgets."""

import json
import os

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import progdistill
from progdistill import cli
from progdistill.diffusion.schedules import Schedule, default_start_steps, linear_betas
from progdistill.eval.evaluate import evaluate
from progdistill.store.card import CARD

T = 64


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A random-init eps UNet2DModel with a T = 64 linear DDPM scheduler, saved as a DDPMPipeline."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    path = tmp_path_factory.mktemp("pipe") / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(path)
    return path


def _listing(path):
    return sorted((p, os.path.getmtime(os.path.join(p, f))) for p, _, fs in os.walk(path) for f in fs)


def test_default_start_steps_is_the_largest_power_of_two_up_to_T():
    assert default_start_steps(Schedule(kind="discrete", betas=linear_betas(1000))) == 512
    assert default_start_steps(Schedule(kind="discrete", betas=linear_betas(64))) == 64
    assert default_start_steps(Schedule()) == 1024


def test_distil_an_imported_teacher_then_sample_and_evaluate(pipe_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROGDISTILL_CACHE", str(tmp_path / "cache"))
    before = _listing(pipe_dir)
    out = tmp_path / "d"
    spec = f"diffusers:{pipe_dir}"
    args = ["distill", "--teacher", spec, "--data", "digits", "--out", str(out), "--final-steps", "16",
            "--iters-per-round", "2", "--batch-size", "8", "--no-progress"]
    assert cli.main(args) == 0
    run = json.loads((out / CARD).read_text())
    assert run["teacher_spec"] == spec and run["start_steps"] == T      # default N0 = T for T = 64
    assert [r["steps"] for r in run["rounds"]] == [32, 16]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["last_rounds_factor"] == 3.0 and [r["iters"] for r in run["rounds"]] == [6, 6]   # imported: last two 3x
    card = json.loads((out / "steps-0016" / CARD).read_text())
    assert card["format"] == 2 and card["param"] == "v"                 # eps teacher -> v student
    assert card["network"]["class_name"] == "UNet2DModel" and card["null_class"] is False
    assert card["data"]["spec"] == "digits" and card["clip"] is True
    student = progdistill.load(out, device="cpu")
    x = student.sample(num=4, seed=0)
    assert x.shape == (4, 1, 8, 8) and bool(torch.isfinite(x).all())
    teacher = progdistill.load(spec, device="cpu")
    assert teacher.sample(num=2, steps=16, seed=0).shape == (2, 1, 8, 8)
    recs = evaluate(out, steps=[16], methods=["pd", "ddim"], metrics=["fd_pixel", "psnr_teacher"], num=8,
                    progress=False, log=lambda s: None)
    assert {(r["method"], r["steps"]) for r in recs} == {("pd", 16), ("ddim", 16)}
    assert (out / "eval-cache").is_dir()                                 # caches live in the run ...
    assert _listing(pipe_dir) == before                                  # ... never in the user's folder


def test_evaluate_an_imported_teacher_needs_data_and_caches_elsewhere(pipe_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROGDISTILL_CACHE", str(tmp_path / "cache"))
    before = _listing(pipe_dir)
    with pytest.raises(progdistill.errors.UserError, match="--data is required"):
        evaluate(f"diffusers:{pipe_dir}", steps=[2], methods=["ddim"], metrics=["fd_pixel"], num=4, progress=False)
    recs = evaluate(f"diffusers:{pipe_dir}", data="digits", steps=[2], methods=["ddim"],
                    metrics=["fd_pixel", "psnr_teacher"], num=4, progress=False, log=lambda s: None)
    assert recs[0]["method"] == "ddim" and recs[0]["fd_pixel"] > 0
    assert _listing(pipe_dir) == before
    assert (tmp_path / "cache" / "imported").is_dir()


@pytest.mark.parametrize("extra, message", [
    ([], "--data is required"),
    (["--data", "toy:gmm"], "has shape"),
])
def test_distil_errors_are_one_line_and_write_nothing(pipe_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "d"
    code = cli.main(["distill", "--teacher", f"diffusers:{pipe_dir}", "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("T, start", [(1000, None), (1000, 64), (200, None), (200, 32)])
def test_the_imported_unet_and_its_students_only_see_whole_timesteps(tmp_path, monkeypatch, T, start):
    """docs/method.md §10: with a T-entry table every grid (distillation targets, the students' inputs,
    sampling at N not dividing T) lands on whole timesteps 0 <= tau <= T - 1."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    path = tmp_path / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(path)
    seen, forward = [], UNet2DModel.forward

    def spy(self, sample, timestep, *args, **kwargs):
        seen.append(torch.as_tensor(timestep).detach().double().reshape(-1))
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", spy)
    n0 = start or default_start_steps(Schedule(kind="discrete", betas=linear_betas(T)))
    out = tmp_path / "d"
    args = ["distill", "--teacher", f"diffusers:{path}", "--data", "digits", "--out", str(out), "--final-steps",
            str(n0 // 4), "--iters-per-round", "2", "--batch-size", "8", "--no-progress"]
    assert cli.main(args + ([] if start is None else ["--start-steps", str(start)])) == 0
    progdistill.load(out).sample(num=2, seed=0)                                  # the last student, n0/4 steps
    progdistill.load(f"diffusers:{path}").sample(num=2, steps=48, seed=0)        # 48 divides neither T
    tau = torch.cat(seen)
    assert len(seen) > 8 and torch.equal(tau, tau.round()) and tau.min() >= 0 and tau.max() <= T - 1
    assert json.loads((out / CARD).read_text())["grid"] == "timesteps"


def test_start_steps_beyond_the_table_are_refused_in_one_line(pipe_dir, tmp_path, capsys):
    out = tmp_path / "d"
    code = cli.main(["distill", "--teacher", f"diffusers:{pipe_dir}", "--data", "digits", "--out", str(out),
                     "--start-steps", str(2 * T), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "exceed the teacher's 64 timesteps" in err and "\n" not in err and not out.exists()
