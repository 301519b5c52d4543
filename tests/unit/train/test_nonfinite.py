"""Non-finite values stop every process cleanly, saving nothing: NaN loss, NaN gradient behind a finite loss,
one process and two gloo processes (faults injected with $PROGDISTILL_FAULT)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from progdistill.errors import UserError
from progdistill.pipeline import load
from progdistill.store import faults
from progdistill.store.card import CARD, read_json
from progdistill.train.config import TrainConfig
from progdistill.train.teacher import train

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def fault(monkeypatch):
    def set_fault(text: str) -> None:
        monkeypatch.setenv(faults.ENV, text)
        faults.active.cache_clear()
    yield set_fault
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.active.cache_clear()


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(data="toy:gmm", iters=8, batch_size=32, log_every=2, checkpoint_every=2), **kw})


def test_fault_spec_is_parsed_and_checked():
    assert faults.parse("nan_loss@3:1, nan_grad@0,die@current-swapped#2") == [
        faults.Fault("nan_loss", step=3, rank=1), faults.Fault("nan_grad", step=0),
        faults.Fault("die", point="current-swapped", nth=2)]
    for bad in ("nan_loss", "nan_loss@x", "boom@3", "die@"):
        with pytest.raises(UserError, match="PROGDISTILL_FAULT"):
            faults.parse(bad)


@pytest.mark.parametrize("kind, message", [("nan_loss", "loss became non-finite at step 5"),
                                           ("nan_grad", "gradient norm became nan at step 5")])
def test_nan_stops_training_and_keeps_the_last_checkpoint(kind, message, fault, tmp_path):
    out = tmp_path / "r"
    fault(f"{kind}@5")
    with pytest.raises(UserError, match=message):
        train(_cfg(), out, progress=False)
    assert read_json(out / CARD)["iteration"] == 4          # steps 0-3 done, saved at 4; nothing newer
    assert sorted(p.name for p in (out / "state").glob("state-*.pt"))[-1] == "state-00000004.pt"
    assert not (out / "timing.json").exists()
    assert load(out).sample(num=2, steps=2).isfinite().all()
    fault("")
    train(_cfg(), out, resume=True, progress=False)         # resumes from the intact checkpoint
    assert read_json(out / CARD)["iteration"] == 8


@pytest.mark.slow
def test_nan_on_one_of_two_processes_stops_both(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", faults.ENV: "nan_loss@3:1"}
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29531", "-m", "progdistill.cli", "train",
                        "--data", "toy:gmm", "--iters", "6", "--batch-size", "32", "--checkpoint-every", "2",
                        "--no-progress", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    # both ranks print one `error:` line (they may share a terminal line) and exit 2; torchrun's own report follows
    assert r.stderr.count("error: the loss became non-finite at step 3") == 2, r.stderr[-3000:]
    assert "on this rank (nan)" in r.stderr and "on another rank" in r.stderr
    # (torchrun reports the first exit, 2, and may stop the other rank once it has printed its line)
    assert "exitcode  : 2" in r.stderr and "progdistill/training.py" not in r.stderr
    assert read_json(out / CARD)["iteration"] == 2
    assert load_file(str(out / "ema" / WEIGHTS)) and load(out).sample(num=2, steps=2).isfinite().all()
