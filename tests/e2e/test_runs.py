"""End-to-end runs on tiny budgets: training, sampling, resume, DDP, distillation and its folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from progdistill import cli
from progdistill.pipeline import load
from progdistill.store.card import CARD, read_json
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / WEIGHTS))


def _assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def _toy_cfg(**kw) -> TrainConfig:
    base = dict(data="toy:gmm", iters=8, batch_size=64, log_every=2, checkpoint_every=4)
    base.update(kw)
    return TrainConfig(**base)


def test_digits_run_lowers_loss_and_writes_grid(tmp_path):
    out = tmp_path / "digits"
    code = cli.main(["train", "--data", "digits", "--out", str(out), "--iters", "60", "--batch-size", "32",
                     "--sample-steps", "4", "--log-every", "10", "--no-progress"])
    assert code == 0
    losses = _losses(out)
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    assert (out / "samples-ddim4.png").is_file()
    for p in ["config.json", CARD, "model/" + WEIGHTS, "ema/" + WEIGHTS, "model/config.json"]:
        assert (out / p).is_file(), p
    card = read_json(out / CARD)
    assert card["iteration"] == 60 and card["data"]["shape"] == [1, 8, 8] and card["param"] in ("x", "v")
    x = load(out).sample(num=3, steps=2, seed=1)
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1.0


def test_toy_run_lowers_loss_and_writes_scatter(tmp_path):
    out = tmp_path / "toy"
    code = cli.main(["train", "--data", "toy:moons", "--out", str(out), "--iters", "150", "--batch-size", "256",
                     "--sample-steps", "8", "--log-every", "25", "--no-progress"])
    assert code == 0
    losses = _losses(out)
    assert sum(losses[-2:]) < 0.97 * sum(losses[:2])
    assert (out / "samples-ddim8.png").is_file()


def test_per_sample_seeds_do_not_depend_on_batch_size(tmp_path):
    out = train(_toy_cfg(), tmp_path / "r", progress=False)
    model = load(out)
    a = model.sample(num=10, steps=4, seed=3, batch_size=10)
    b = model.sample(num=10, steps=4, seed=3, batch_size=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    c = model.sample(num=10, steps=4, seed=3, sampler="ancestral", logvar_frac=0.5, batch_size=4)
    d = model.sample(num=10, steps=4, seed=3, sampler="ancestral", logvar_frac=0.5, batch_size=10)
    torch.testing.assert_close(c, d, rtol=0, atol=1e-6)
    assert not torch.allclose(a, model.sample(num=10, steps=4, seed=4))


def test_interrupted_training_resumes_exactly(tmp_path):
    full = train(_toy_cfg(), tmp_path / "full", progress=False)
    part = tmp_path / "part"
    train(_toy_cfg(time_limit=1e-9), part, progress=False)       # stops after one step
    assert read_json(part / CARD)["iteration"] == 1
    for _ in range(20):
        if read_json(part / CARD)["iteration"] >= 8:
            break
        train(_toy_cfg(time_limit=1e-9), part, resume=True, progress=False)
    assert read_json(part / CARD)["iteration"] == 8
    _assert_same_weights(full / "model", part / "model")
    _assert_same_weights(full / "ema", part / "ema")
    assert len(list((part / "state").glob("state-*.pt"))) == 3      # rotation keeps the last 3


def test_existing_run_needs_resume(tmp_path):
    train(_toy_cfg(iters=2), tmp_path / "r", progress=False)
    assert cli.main(["train", "--data", "toy:gmm", "--out", str(tmp_path / "r"), "--iters", "2"]) == 2


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not installed")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = ["train", "--data", "toy:gmm", "--iters", "6", "--batch-size", "64", "--no-progress",
            "--checkpoint-every", "3", "--sample-steps", "2"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", "-m", "progdistill.cli", *args,
                        "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", atol=1e-5)
    _assert_same_weights(tmp_path / "one" / "ema", tmp_path / "two" / "ema", atol=1e-5)
    # distillation under torchrun too: same students as one process
    dargs = ["distill", "--teacher", str(tmp_path / "one"), "--start-steps", "4", "--final-steps", "2",
             "--iters-per-round", "3", "--batch-size", "64", "--no-progress"]
    assert cli.main(dargs + ["--out", str(tmp_path / "d1")]) == 0
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29518", "-m", "progdistill.cli", *dargs,
                        "--out", str(tmp_path / "d2")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_weights(tmp_path / "d1" / "steps-0002" / "model", tmp_path / "d2" / "steps-0002" / "model", atol=1e-5)


def _distill_cfg(teacher: Path, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), start_steps=8, final_steps=1, iters_per_round=4, batch_size=64,
                checkpoint_every=2, log_every=2)
    base.update(kw)
    return DistillConfig(**base)


def test_distillation_writes_a_model_per_round_and_resumes_exactly(tmp_path):
    teacher = train(_toy_cfg(iters=20), tmp_path / "teacher", progress=False)
    full = distill(_distill_cfg(teacher), tmp_path / "full", progress=False)
    run_card = read_json(full / CARD)
    assert run_card["latest"] == "steps-0001" and [r["steps"] for r in run_card["rounds"]] == [4, 2, 1]
    for n in (4, 2, 1):
        card = read_json(full / f"steps-{n:04d}" / CARD)
        assert card["steps"] == n and card["kind"] == "student" and card["weights"] == "model"
    # rotation of training states never deletes a steps-* folder
    assert len(list((full / "state").glob("state-*.pt"))) <= 3 and (full / "steps-0004").is_dir()
    # --model RUN2 means the last finished round
    assert load(full).card.steps == 1
    with pytest.warns(UserWarning, match="distilled for 1 steps"):
        load(full).sample(num=2, steps=2)

    part = tmp_path / "part"
    distill(_distill_cfg(teacher, time_limit=1e-9), part, progress=False)
    for _ in range(30):
        if read_json(part / CARD).get("latest") == "steps-0001":
            break
        distill(_distill_cfg(teacher, time_limit=1e-9), part, resume=True, progress=False)
    for n in (4, 2, 1):
        _assert_same_weights(full / f"steps-{n:04d}" / "model", part / f"steps-{n:04d}" / "model")


def test_eps_teacher_distils_into_v_student(tmp_path):
    teacher = train(_toy_cfg(iters=4, param="eps"), tmp_path / "teacher", progress=False)
    out = distill(_distill_cfg(teacher, start_steps=4, final_steps=2, iters_per_round=2), tmp_path / "d",
                  progress=False)
    card = read_json(out / "steps-0002" / CARD)
    assert card["param"] == "v"
    # the student starts as a copy of the teacher's weights (same channels for eps and v)
    assert load(out).sample(num=4, steps=2).isfinite().all()


def test_logsnr_shift_is_carried_from_the_cli_through_distillation(tmp_path):
    """`train --logsnr-shift` lands in the card; the student and the loaded model sample on that schedule."""
    out = tmp_path / "t"
    assert cli.main(["train", "--data", "toy:gmm", "--out", str(out), "--iters", "2", "--logsnr-shift", "-1.5",
                     "--no-progress", "--sample-steps", "2"]) == 0
    assert read_json(out / CARD)["schedule"]["logsnr_shift"] == -1.5
    d = distill(_distill_cfg(out, start_steps=4, final_steps=2, iters_per_round=2), tmp_path / "d", progress=False)
    assert read_json(d / "steps-0002" / CARD)["schedule"]["logsnr_shift"] == -1.5
    assert load(d).card.schedule.logsnr_shift == -1.5
    assert cli.main(["train", "--data", "toy:gmm", "--out", str(out), "--iters", "3", "--resume",
                     "--logsnr-shift", "2"]) == 2     # --resume keeps the run's schedule


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "toy:gmm", "--out", "O", "--logsnr-shift", "30"], "logsnr shift"),
    (["distill", "--teacher", "T", "--out", "O", "--start-steps", "12"], "power of two"),
    (["distill", "--teacher", "T", "--out", "O", "--start-steps", "4", "--final-steps", "8"], "smaller than"),
    (["distill", "--teacher", "/nonexistent", "--out", "O"], "not found"),
    (["sample", "--model", "/nonexistent", "--out", "x.png"], "not found"),
    (["train", "--data", "toy:nope", "--out", "O"], "toy"),
    (["train", "--data", "npz:/nonexistent.npz", "--out", "O", "--preset", "digits"], "does not exist"),
    (["train", "--data", "folder:/tmp", "--out", "O"], "preset"),
    (["train", "--data", "digits", "--out", "O", "--preset", "nope"], "unknown preset"),
    (["train", "--data", "digits", "--out", "O", "--preset", "lsun128"], "nearest valid: 16"),   # 5 levels: 16 | side
])
def test_bad_input_gives_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err and "Traceback" not in err


def test_sample_with_impossible_steps(tmp_path, capsys):
    out = train(_toy_cfg(iters=2), tmp_path / "r", progress=False)
    assert cli.main(["sample", "--model", str(out), "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = train(_toy_cfg(iters=4), tmp_path / "one", progress=False)
    acc = train(_toy_cfg(iters=4, grad_accum=4), tmp_path / "acc", progress=False)
    _assert_same_weights(one / "model", acc / "model", atol=1e-5)


def test_bf16_autocast_trains_and_distils(tmp_path):
    t = train(_toy_cfg(iters=3, precision="bf16"), tmp_path / "t", progress=False)
    d = distill(_distill_cfg(t, start_steps=4, final_steps=2, iters_per_round=2, precision="bf16"), tmp_path / "d",
                progress=False)
    assert load(d).sample(num=4).isfinite().all()


def test_class_conditional_digits_and_npz_vectors(tmp_path):
    out = tmp_path / "cond"
    assert cli.main(["train", "--data", "digits", "--class-cond", "--out", str(out), "--iters", "2", "--batch-size", "16",
                     "--sample-steps", "2", "--no-progress"]) == 0
    card = read_json(out / CARD)
    assert card["model"]["num_classes"] == 10
    assert load(out).sample(num=3, steps=2, class_label=7).shape == (3, 1, 8, 8)
    assert cli.main(["sample", "--model", str(out), "--steps", "2", "--num", "4", "--class", "12",
                     "--out", str(tmp_path / "x.png")]) == 2
    import numpy as np
    np.savez(tmp_path / "v.npz", x=np.random.default_rng(0).normal(size=(500, 3)).astype("float32"))
    vec = tmp_path / "vec"
    assert cli.main(["train", "--data", f"npz:{tmp_path / 'v.npz'}", "--out", str(vec), "--iters", "2",
                     "--batch-size", "32", "--sample-steps", "2", "--no-progress"]) == 0
    assert read_json(vec / CARD)["model"]["kind"] == "mlp" and load(vec).sample(num=2, steps=2).shape == (2, 3)
