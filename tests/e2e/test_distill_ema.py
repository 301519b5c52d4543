"""Distillation details: the student EMA (--student-ema) is the round's model and resumes exactly; an
unfinished teacher is distilled with a one-line warning."""

import torch
from safetensors.torch import load_file

from progdistill.store.card import CARD, read_json
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _teacher(tmp_path, **kw):
    cfg = TrainConfig(**{**dict(data="toy:gmm", iters=6, batch_size=32, checkpoint_every=6, log_every=3), **kw})
    return train(cfg, tmp_path / "teacher", progress=False)


def _cfg(teacher, **kw) -> DistillConfig:
    return DistillConfig(**{**dict(teacher=str(teacher), start_steps=4, final_steps=1, iters_per_round=3,
                                   batch_size=32, checkpoint_every=2, log_every=3, ema_decay=0.9), **kw})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_ema_is_the_rounds_model_and_resumes_exactly(tmp_path, capsys):
    teacher = _teacher(tmp_path)
    full = distill(_cfg(teacher), tmp_path / "full", progress=False)
    assert "warning" not in capsys.readouterr().err                 # a finished teacher: no warning
    st = torch.load(full / "state" / "state-00000001-00000003.pt", weights_only=True)   # last round, last step
    saved = load_file(str(full / "steps-0001" / "model" / WEIGHTS))
    assert _same(saved, st["ema"]) and not _same(saved, st["net"])
    plain = distill(_cfg(teacher, ema_decay=0.0), tmp_path / "plain", progress=False)
    assert not _same(saved, load_file(str(plain / "steps-0001" / "model" / WEIGHTS)))

    part = tmp_path / "part"
    distill(_cfg(teacher, time_limit=1e-9), part, progress=False)   # one step per session
    for _ in range(10):
        if read_json(part / CARD).get("latest") == "steps-0001":
            break
        distill(_cfg(teacher, time_limit=1e-9), part, resume=True, progress=False)
    for n in ("steps-0002", "steps-0001"):
        assert _same(load_file(str(full / n / "model" / WEIGHTS)), load_file(str(part / n / "model" / WEIGHTS))), n


def test_unfinished_teacher_warns_in_one_line_and_distils(tmp_path, capsys):
    teacher = _teacher(tmp_path, time_limit=1e-9)                   # stops after one of 6 steps
    assert read_json(teacher / "timing.json")["finished"] is False
    capsys.readouterr()
    out = distill(_cfg(teacher, start_steps=2, iters_per_round=1, ema_decay=0.0), tmp_path / "d", progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "unfinished (1 of 6 iterations)" in err[0]
    assert read_json(out / CARD)["latest"] == "steps-0001"
