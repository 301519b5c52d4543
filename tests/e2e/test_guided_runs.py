"""Guided distillation end to end on tiny budgets: stage 1 + 2, resume mid-stage-1, sampling, the errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from progdistill import cli
from progdistill.pipeline import load
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, read_json
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train

TINY = {"block_out_channels": (8, 16), "norm_num_groups": 8, "attention_levels": ()}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _teacher(out, **kw):
    base = dict(data="digits", class_cond=True, iters=4, batch_size=16, model_overrides=TINY, param="eps",
                log_every=2, checkpoint_every=4)
    return train(TrainConfig(**{**base, **kw}), out, progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("guided") / "teacher")


def _cfg(teacher, **kw):
    base = dict(teacher=str(teacher), guided=True, guided_iters=4, start_steps=4, final_steps=1, iters_per_round=2,
                batch_size=16, checkpoint_every=2, log_every=2)
    return DistillConfig(**{**base, **kw})


def _same(a, b):
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_teacher_card_records_label_dropout_and_samples_guided(teacher, tmp_path, capsys):
    assert read_json(teacher / CARD)["provenance"]["label_dropout"] == 0.1
    m = load(teacher)
    a = m.sample(num=4, steps=2, guidance=0.0, class_label=3)
    torch.testing.assert_close(a, m.sample(num=4, steps=2, class_label=3), rtol=0, atol=0)   # w = 0: conditional
    for sampler in ("ddim", "ancestral", "dpmpp2m"):
        assert m.sample(num=4, steps=2, guidance=2.0, sampler=sampler).isfinite().all()
    assert cli.main(["sample", "--model", str(teacher), "--steps", "2", "--num", "4", "--guidance", "1.5",
                     "--out", str(tmp_path / "g.png")]) == 0


def test_guided_distillation_stage1_and_2_then_sampling(teacher, tmp_path):
    out = distill(_cfg(teacher), tmp_path / "gd", progress=False)
    run = read_json(out / CARD)
    assert run["guided"]["iters"] == 4 and run["latest"] == "steps-0001" and [r["steps"] for r in run["rounds"]] == [2, 1]
    g = read_json(out / "guided" / CARD)
    assert g["guidance"] == {"w_min": 0.0, "w_max": 4.0} and g["network"]["class_name"] == "GuidedNet"
    assert g["param"] == "v" and g["steps"] is None and g["provenance"]["label_dropout"] == 0.1
    for n in (2, 1):
        c = read_json(out / f"steps-{n:04d}" / CARD)
        assert c["guidance"] == g["guidance"] and c["network"]["class_name"] == "GuidedNet" and c["param"] == "v"
    stage1 = load(out / "guided")
    for steps in (1, 3, 8):                      # a complete model: any step count, any w
        assert stage1.sample(num=2, steps=steps, guidance=1.3).isfinite().all()
    s2 = load(out / "steps-0002")
    a = s2.sample(num=6, guidance=2.0, sampler="stochastic", seed=4, batch_size=6)
    torch.testing.assert_close(a, s2.sample(num=6, guidance=2.0, sampler="stochastic", seed=4, batch_size=4),
                               rtol=0, atol=1e-5)        # per-sample seeds, also for the re-noising
    assert not torch.equal(a, s2.sample(num=6, guidance=2.0, seed=4))                     # stochastic != ddim
    assert not torch.equal(s2.sample(num=2, guidance=0.0), s2.sample(num=2, guidance=4.0))   # w is an input
    with pytest.warns(UserWarning, match="extrapolates"):
        s2.sample(num=2, guidance=6.0)
    assert cli.main(["sample", "--model", str(out), "--guidance", "1", "--sampler", "stochastic", "--num", "4",
                     "--out", str(tmp_path / "s.png")]) == 0


def test_guided_distillation_resumes_exactly_mid_stage1(teacher, tmp_path):
    full = distill(_cfg(teacher, final_steps=2), tmp_path / "full", progress=False)
    part = tmp_path / "part"
    distill(_cfg(teacher, final_steps=2, time_limit=1e-9), part, progress=False)     # stops after 1 stage-1 step
    assert not (part / "guided").exists() and len(list((part / "state-guided").glob("*.pt"))) == 1
    for _ in range(20):
        if read_json(part / CARD).get("latest") == "steps-0002":
            break
        distill(_cfg(teacher, final_steps=2, time_limit=1e-9), part, resume=True, progress=False)
    _same(full / "guided" / "model", part / "guided" / "model")
    _same(full / "steps-0002" / "model", part / "steps-0002" / "model")


def test_guided_distillation_under_bf16_autocast(teacher, tmp_path):
    out = distill(_cfg(teacher, final_steps=2, precision="bf16"), tmp_path / "bf16", progress=False)
    fp32 = distill(_cfg(teacher, final_steps=2), tmp_path / "fp32", progress=False)
    a = load(out).sample(num=4, guidance=2.0, seed=1)
    b = load(fp32).sample(num=4, guidance=2.0, seed=1)
    assert a.isfinite().all() and (a - b).abs().max() < 0.2         # the same training, to bf16's precision


@pytest.mark.slow
def test_guided_distillation_two_processes_match_one(teacher, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    args = ["distill", "--teacher", str(teacher), "--guided", "--guided-iters", "3", "--start-steps", "4",
            "--final-steps", "2", "--iters-per-round", "2", "--batch-size", "16", "--no-progress"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29521", "-m", "progdistill.cli", *args,
                        "--out", str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # Stage 1 and stage 2 (w drawn per example, not per rank) give the same models. Compared by their samples:
    # conv biases in front of a one-channel-per-group GroupNorm have a gradient of exactly zero up to float
    # round-off, which Adam scales up to +-lr per step, so those weights differ by ~1e-4 where the outputs do not.
    for sub in ("guided", "steps-0002"):
        a = load(tmp_path / "one" / sub).sample(num=8, steps=2, guidance=2.0, seed=3)
        b = load(tmp_path / "two" / sub).sample(num=8, steps=2, guidance=2.0, seed=3)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=sub)
    wa = load_file(str(tmp_path / "one" / "guided" / "model" / WEIGHTS))
    wb = load_file(str(tmp_path / "two" / "guided" / "model" / WEIGHTS))
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa if not k.endswith(".bias"))


def _err(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    return err


def test_refusals_are_one_line(teacher, tmp_path, capsys):
    uncond = train(TrainConfig(data="digits", iters=2, batch_size=16, model_overrides=TINY, checkpoint_every=2),
                   tmp_path / "u", progress=False)
    assert "unconditional" in _err(["distill", "--teacher", str(uncond), "--guided", "--out", str(tmp_path / "d1")], capsys)
    assert "unconditional" in _err(["sample", "--model", str(uncond), "--steps", "2", "--guidance", "1",
                                    "--out", str(tmp_path / "x.png")], capsys)
    nodrop = _teacher(tmp_path / "nd", label_dropout=0.0, iters=2, checkpoint_every=2)
    assert "without label dropout" in _err(["distill", "--teacher", str(nodrop), "--guided",
                                            "--out", str(tmp_path / "d2")], capsys)
    card = read_json(nodrop / CARD)
    card["provenance"].pop("label_dropout")
    write_json(nodrop / CARD, card)
    assert "does not record label dropout" in _err(["sample", "--model", str(nodrop), "--steps", "2", "--guidance", "1",
                                                    "--out", str(tmp_path / "x.png")], capsys)
    assert "--w-max" in _err(["distill", "--teacher", str(teacher), "--guided", "--w-min", "3", "--w-max", "2",
                              "--out", str(tmp_path / "d3")], capsys)
    assert ">= 0" in _err(["sample", "--model", str(teacher), "--steps", "2", "--guidance", "-1",
                           "--out", str(tmp_path / "x.png")], capsys)
    plain = distill(DistillConfig(teacher=str(teacher), start_steps=2, final_steps=1, iters_per_round=1, batch_size=16),
                    tmp_path / "plain", progress=False)
    assert "plainly distilled" in _err(["sample", "--model", str(plain), "--guidance", "1",
                                        "--out", str(tmp_path / "x.png")], capsys)
    guided = distill(_cfg(teacher, guided_iters=1, final_steps=2, iters_per_round=1), tmp_path / "g", progress=False)
    assert "guidance-distilled" in _err(["export", str(guided), "--out", str(tmp_path / "exp")], capsys)
    assert json.loads((guided / CARD).read_text())["guided"]["iters"] == 1


def test_conditional_evaluation_helpers():
    from progdistill.eval.guided import class_accuracy, requested_classes, teacher_steps
    assert requested_classes(12, 10).tolist() == list(range(10)) + [0, 1]
    p, se = class_accuracy(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0, 0]))
    assert p == 0.75 and abs(se - (0.75 * 0.25 / 4) ** 0.5) < 1e-12
    assert teacher_steps(8, 2.0) == 4 and teacher_steps(8, 0.0) == 8 and teacher_steps(1, 1.0) is None


def test_quick_guided_demo_writes_table_plot_grids_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["--threads", "1", "demo", "--guided", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert read_json(out / "distill" / CARD)["latest"] == "steps-0001" and "done in" in text
    records = read_json(out / "eval-guided.json")
    methods = {(r["method"], r["nfe"], r["w"]) for r in records}
    assert {("gd", 1, 0.0), ("gd", 2, 2.0), ("gd_stochastic", 2, 2.0), ("ddim", 2, 2.0), ("dpmpp2m", 2, 0.0),
            ("reference", 8, 2.0), ("reference", 4, 0.0)} <= methods
    assert all(0 <= r["class_acc"] <= 1 and r["fd_feature"] > 0 for r in records)
    assert next(r for r in records if r["method"] == "ddim" and r["w"] == 2.0)["steps"] == 1   # 2 NFE = 1 guided step
    for p in ("guided-tradeoff.png", "report-guided.md", "grids-guided/teacher.png", "grids-guided/student-1.png"):
        assert (out / p).is_file(), p
