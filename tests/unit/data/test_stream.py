"""Streaming data: `prepare` round trips, per-batch reads equal in-memory batches, and runs give the
same weights streamed or in memory, in one process or two."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_data import _cifar_dir

from progdistill import cli
from progdistill.data import datasets as D
from progdistill.data.datasets import load_data
from progdistill.data.prepare import prepare
from progdistill.data.stream import HEADER, IMAGES, NOISE_CHUNK, PreparedImages, StepLoader, chunk_noise
from progdistill.errors import UserError
from progdistill.eval import fid
from progdistill.eval import metrics as M
from progdistill.eval.scoring import Scorer
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill, distill_batch, distill_plan
from progdistill.train.guided import guidance_batch
from progdistill.train.teacher import teacher_batch, train

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _all(ds) -> torch.Tensor:
    return torch.cat(list(ds.batches(100)))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return prepare("digits", tmp_path_factory.mktemp("prep") / "digits", progress=False, log=lambda *_: None)


# ------------------------------------------------------------------------------ prepare
def test_prepare_digits_round_trips_exactly(digits_dir):
    mem, st = load_data("digits"), load_data(f"prepared:{digits_dir}")
    assert st.x is None and st.stream is not None and len(st) == 1297 and st.shape == (1, 8, 8)
    assert torch.equal(_all(st), mem.x) and torch.equal(st.y, mem.y)
    assert st.num_classes == 10 and st.class_names == mem.class_names and st.kind == "image"
    head = json.loads((digits_dir / HEADER).read_text())
    assert head["count"] == 1297 and head["shape"] == [1, 8, 8] and head["levels"] == 16
    assert head["source"] == "digits" and head["split"] == "train"
    assert (digits_dir / IMAGES).stat().st_size == 1297 * 64
    held = prepare("digits", digits_dir.parent / "held", split="test", progress=False, log=lambda *_: None)
    assert torch.equal(_all(load_data(f"prepared:{held}", split="heldout")), load_data("digits", split="heldout").x)
    with pytest.raises(UserError, match="not 'heldout'"):
        load_data(f"prepared:{digits_dir}", split="heldout")
    with pytest.raises(UserError, match="prepare it again with --resolution"):
        load_data(f"prepared:{digits_dir}", resolution=16)
    with pytest.raises(UserError, match="already exists"):
        prepare("digits", digits_dir, progress=False)


def test_prepare_converts_shape_like_the_loaders(tmp_path):
    lines = []
    out = prepare("digits", tmp_path / "d", resolution=16, channels=3, progress=False, log=lines.append)
    st, mem = load_data(f"prepared:{out}"), load_data("digits", resolution=16, channels=3)
    assert st.shape == (3, 16, 16)
    assert (_all(st) - mem.x).abs().max() <= 1 / 127.5 / 2 + 1e-6      # the same conversion, quantised to uint8
    assert lines[0] == f"data: {mem.note}, quantised to uint8"


def test_prepare_npz_uint8_channels_last_and_float(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 5, 5, 3), dtype=np.uint8)         # channels last, converted per chunk
    y = rng.integers(0, 4, size=10)
    np.savez(tmp_path / "u.npz", x=x, y=y)
    out = prepare(f"npz:{tmp_path / 'u.npz'}", tmp_path / "u", progress=False, log=lambda *_: None)
    mem, st = load_data(f"npz:{tmp_path / 'u.npz'}"), load_data(f"prepared:{out}")
    assert st.shape == (3, 5, 5) and torch.equal(_all(st), mem.x) and torch.equal(st.y, mem.y)
    assert st.num_classes == 4
    f = rng.uniform(-1, 1, size=(7, 6, 6)).astype(np.float32)             # float (n, H, W): quantised, said so
    np.savez(tmp_path / "f.npz", f)
    lines = []
    out = prepare(f"npz:{tmp_path / 'f.npz'}", tmp_path / "f", progress=False, log=lines.append)
    st = load_data(f"prepared:{out}")
    assert st.shape == (1, 6, 6) and st.y is None and "quantised to uint8 (lossy)" in lines[0]
    assert (_all(st) - load_data(f"npz:{tmp_path / 'f.npz'}").x).abs().max() <= 1 / 255 + 1e-6
    np.savez(tmp_path / "v.npz", x=np.zeros((4, 3)))
    with pytest.raises(UserError, match="vector data as npz: directly"):
        prepare(f"npz:{tmp_path / 'v.npz'}", tmp_path / "v", progress=False)
    with pytest.raises(UserError, match="vector data needs no preparing"):
        prepare("toy:moons", tmp_path / "t", progress=False)


def test_prepare_cifar10_splits(tmp_path):
    root, batches = _cifar_dir(tmp_path)
    for split in ("train", "heldout"):
        out = prepare(f"cifar10:{root}", tmp_path / split, split=split, progress=False, log=lambda *_: None)
        mem, st = load_data(f"cifar10:{root}", split=split), load_data(f"prepared:{out}", split=split)
        assert torch.equal(_all(st), mem.x) and torch.equal(st.y, mem.y)
        assert st.class_names == mem.class_names and st.class_names[0] == "plane" and st.num_classes == 10


def _png(path: Path, rgb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, np.uint8)).save(path)


def test_prepare_folder_colour_gray_and_lazy(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for k in range(5):      # colour images in class folders, two sizes (resized and centre-cropped)
        _png(tmp_path / "c" / ("cats" if k % 2 else "dogs") / f"{k}.png", rng.integers(0, 256, (8 + 4 * (k % 2), 8, 3)))
    for k in range(3):      # RGB files without colour: one channel, as the folder: loader decides
        _png(tmp_path / "g" / f"{k}.png", np.repeat(rng.integers(0, 256, (6, 6, 1)), 3, axis=2))
    quiet = dict(progress=False, log=lambda *_: None)
    for name, shape in (("c", (3, 8, 8)), ("g", (1, 6, 6))):
        out = prepare(f"folder:{tmp_path / name}", tmp_path / f"p{name}", **quiet)
        mem, st = load_data(f"folder:{tmp_path / name}"), load_data(f"prepared:{out}")
        assert st.shape == shape and torch.equal(_all(st), mem.x)
        assert (st.y is None) == (mem.y is None) and st.class_names == mem.class_names
    gray = prepare(f"folder:{tmp_path / 'c'}", tmp_path / "c1", channels=1, resolution=4, **quiet)
    assert torch.equal(_all(load_data(f"prepared:{gray}")), load_data(f"folder:{tmp_path / 'c'}", channels=1,
                                                                        resolution=4).x)
    # a folder too large to hold is decoded per batch, with the same pixels
    monkeypatch.setattr(D, "LAZY_FOLDER_BYTES", 0)
    lazy = load_data(f"folder:{tmp_path / 'c'}")
    assert lazy.x is None and lazy.shape == (3, 8, 8) and lazy.class_names == ["cats", "dogs"]
    lazy_x = _all(lazy)
    monkeypatch.setattr(D, "LAZY_FOLDER_BYTES", 2 << 30)
    assert torch.equal(lazy_x, load_data(f"folder:{tmp_path / 'c'}").x)
    assert len(pickle.dumps(lazy.stream)) < 2000
    # a broken image stops prepare and leaves neither the folder nor its temporary
    (tmp_path / "c" / "cats" / "broken.png").write_bytes(b"\x89PNG no")
    with pytest.raises(UserError, match="broken.png"):
        prepare(f"folder:{tmp_path / 'c'}", tmp_path / "bad", **quiet)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_cli_prepare(tmp_path, capsys):
    assert cli.main(["prepare", "--data", "digits", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "--data prepared:" in capsys.readouterr().out
    assert cli.main(["prepare", "--data", "digits", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------ readers
def test_pread_and_mmap_readers_agree_and_pickle_small(digits_dir):
    head = json.loads((digits_dir / HEADER).read_text())
    pr = PreparedImages(digits_dir, head["shape"], head["count"], 16)
    mm = PreparedImages(digits_dir, head["shape"], head["count"], 16, reader="mmap")
    idx = np.array([5, 0, 1296, 5, 17])
    assert np.array_equal(pr.read(idx), mm.read(idx))
    pr.read([0])                                   # opens the file; a pickled copy carries no descriptor or data
    blob = pickle.dumps(pr)
    assert len(blob) < 1000 and np.array_equal(pickle.loads(blob).read(idx), pr.read(idx))
    with pytest.raises(IndexError):
        pr.read([1297])


def test_chunk_noise_does_not_depend_on_the_split():
    whole = chunk_noise((3, 7), slice(None), 40, (1, 2, 2))
    assert whole.shape == (40, 1, 2, 2)
    for parts in (2, 4, 5, 8, 40):
        b = 40 // parts
        cat = torch.cat([chunk_noise((3, 7), slice(k * b, (k + 1) * b), 40, (1, 2, 2)) for k in range(parts)])
        assert torch.equal(cat, whole)
    assert not torch.equal(chunk_noise((3, 8), slice(None), 40, (1, 2, 2)), whole)
    assert NOISE_CHUNK == 16


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_batches_equal_in_memory_and_split(digits_dir, workers):
    mem, st = load_data("digits"), load_data(f"prepared:{digits_dir}")
    kw = dict(seed=1, batch_size=32, hflip=True, label_dropout=0.3, device=torch.device("cpu"))
    for step in (0, 5):
        whole = teacher_batch(mem, step=step, **kw)
        parts = [teacher_batch(st, step=step, part=slice(8 * k, 8 * k + 8), **kw) for k in range(4)]
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key
    # the loader reads exactly the plan's examples for each (step, micro), in worker processes too
    plan = lambda step: distill_plan(len(st), seed=0, round_idx=1, step=step, batch_size=32, num_steps=4)["idx"]
    part = lambda micro: slice(16 * micro, 16 * micro + 16)
    loader = StepLoader(st, plan, part, start=2, iters=4, grad_accum=2, device=torch.device("cpu"), workers=workers)
    dk = dict(seed=0, round_idx=1, batch_size=32, num_steps=4, device=torch.device("cpu"), hflip=True)
    for step in (2, 3):
        whole = distill_batch(mem, step=step, **dk)
        for micro in (0, 1):
            got = distill_batch(st, step=step, part=part(micro), read=lambda i: loader(step, micro, i), **dk)
            for key in whole:
                assert torch.equal(got[key], whole[key][part(micro)]), key
    loader.close()


def test_guidance_batches_streamed_and_split_equal_in_memory(digits_dir):
    mem, st = load_data("digits"), load_data(f"prepared:{digits_dir}")
    kw = dict(seed=2, step=4, batch_size=32, w_min=0.0, w_max=4.0, device=torch.device("cpu"), hflip=True)
    whole = guidance_batch(mem, **kw)
    parts = [guidance_batch(st, part=slice(8 * k, 8 * k + 8), **kw) for k in range(4)]
    for key in whole:
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key


def test_distillation_flip_has_its_own_generator():
    mem = load_data("digits")
    kw = dict(seed=0, round_idx=0, step=3, batch_size=64, num_steps=8, device=torch.device("cpu"))
    plain, flipped = distill_batch(mem, **kw), distill_batch(mem, hflip=True, **kw)
    assert torch.equal(plain["i"], flipped["i"]) and torch.equal(plain["eps"], flipped["eps"])
    flip = distill_plan(len(mem), seed=0, round_idx=0, step=3, batch_size=64, num_steps=8, hflip=True)["flip"]
    assert 0 < int(flip.sum()) < 64
    assert torch.equal(flipped["x"][flip], plain["x"][flip].flip(-1)) and torch.equal(flipped["x"][~flip], plain["x"][~flip])


def test_streamed_reference_statistics_equal_in_memory(digits_dir):
    mem, st = load_data("digits"), load_data(f"prepared:{digits_dir}")
    acc = M.GaussianAccumulator()
    for chunk in st.batches(300):
        acc.add(chunk.reshape(len(chunk), -1))
    mu, sigma = M.gaussian_stats(mem.x.reshape(len(mem), -1))
    np.testing.assert_allclose(acc.stats()[0], mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(acc.stats()[1], sigma, rtol=0, atol=1e-12)
    scorer = Scorer(f"prepared:{digits_dir}", "image", ["fd_pixel"], (1, 8, 8), split="train", num=0, seed=0,
                    cache=digits_dir.parent)
    assert scorer.ref is None and np.allclose(scorer.ref_pixel[1], sigma, rtol=0, atol=1e-12)
    detector = lambda b, return_features: b[:, :, 2:6, 2:6].float().reshape(len(b), -1)   # 48 "features"
    whole = fid.reference_stats("whole", lambda: mem.x, detector, digits_dir.parent / "stats")
    chunked = fid.reference_stats("chunked", lambda: st.batches(300), detector, digits_dir.parent / "stats")
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------ runs
def _train(data: str, out: Path, **kw) -> Path:
    cfg = TrainConfig(data=data, preset="digits", width=8, iters=3, batch_size=32, log_every=1, checkpoint_every=3,
                      hflip=True, class_cond=True, **kw)
    return train(cfg, out, progress=False)


def test_streamed_runs_give_the_same_weights(tmp_path, digits_dir):
    mem = _train("digits", tmp_path / "mem")
    st = _train(f"prepared:{digits_dir}", tmp_path / "st", workers=1)
    _same_weights(mem / "model", st / "model")
    _same_weights(mem / "ema", st / "ema")
    dk = dict(teacher=str(mem), start_steps=4, final_steps=2, iters_per_round=2, batch_size=32, log_every=1)
    d_mem = distill(DistillConfig(data="digits", **dk), tmp_path / "dmem", progress=False)
    d_st = distill(DistillConfig(data=f"prepared:{digits_dir}", **dk), tmp_path / "dst", progress=False)
    _same_weights(d_mem / "steps-0002" / "model", d_st / "steps-0002" / "model")
    assert json.loads((d_st / "config.json").read_text())["hflip"] is True     # as the teacher trained


@pytest.mark.slow
def test_two_processes_streaming_match_one_in_memory(tmp_path, digits_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    args = ["train", "--preset", "digits", "--width", "8", "--iters", "3", "--batch-size", "32", "--no-progress",
            "--class-cond", "--sample-steps", "2", "--log-every", "1", "--dropout", "0"]
    assert cli.main(args + ["--data", "digits", "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29541", "-m", "progdistill.cli", *args,
                        "--data", f"prepared:{digits_dir}", "--grad-accum", "2", "--out", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # every step's loss agrees (it depends on the step's examples and on all earlier updates); the weights
    # agree to Adam's step size: conv biases before a GroupNorm have zero true gradient, so Adam turns
    # summation-order round-off into steps of up to lr (1e-5..3e-5 here) there
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-6)
    _same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", atol=1e-4)
    dargs = ["distill", "--teacher", str(tmp_path / "one"), "--start-steps", "4", "--final-steps", "2",
             "--iters-per-round", "2", "--batch-size", "32", "--no-progress", "--log-every", "1"]
    assert cli.main(dargs + ["--out", str(tmp_path / "d1")]) == 0
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29542", "-m", "progdistill.cli", *dargs,
                        "--data", f"prepared:{digits_dir}", "--out", str(tmp_path / "d2")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "d2"), _losses(tmp_path / "d1"), rtol=1e-6)
    _same_weights(tmp_path / "d1" / "steps-0002" / "model", tmp_path / "d2" / "steps-0002" / "model", atol=5e-4)
