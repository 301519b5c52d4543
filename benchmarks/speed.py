"""Speed figures for the `digits` preset on this machine (issues 2 and 3), from one run.

    .venv/bin/python benchmarks/speed.py [--batch-size 128] [--iters 30] [--threads N] [--json out.json]
    .venv/bin/python benchmarks/speed.py --demo runs/demo      # also the demo's measured cost ratios

Prints: teacher training it/s; DDIM sampling images/s; one training step / a bare forward+backward
(framework overhead); one distillation step / one teacher step (limit ~1.67: two teacher forwards
plus one student forward+backward; target <= 1.7); and, given a finished demo or distillation run,
distillation-to-4-steps optimizer steps and wall time over the teacher's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from progdistill.data.datasets import load_data
from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.schedules import Schedule
from progdistill.nets.build import build_network
from progdistill.nets.presets import PRESETS
from progdistill.pipeline import generate
from progdistill.store.card import CARD, ModelCard, read_json
from progdistill.train.distill import distill_batch, distillation_loss, init_student
from progdistill.train.loop import EMA
from progdistill.train.teacher import diffusion_loss, teacher_batch


def _time(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--demo", type=Path, default=None, help="a demo folder (teacher/, distill/) or distillation run")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = PRESETS["digits"]
    schedule = Schedule()
    data = load_data("digits")
    B = a.batch_size
    dev = torch.device("cpu")
    sl = slice(0, B)

    net = build_network(preset.model, preset.param)
    teacher = Denoiser(net, schedule=schedule, param=preset.param)
    ema = EMA(net, 0.999)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    step = [0]

    def train_step():
        batch = teacher_batch(data, step=step[0], seed=0, batch_size=B, hflip=False, label_dropout=0.0, device=dev)
        loss = diffusion_loss(teacher, batch, sl, schedule=schedule, weighting="snr_trunc", class_cond=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net, step[0])
        step[0] += 1

    x = torch.randn(B, 1, 8, 8)
    tau = torch.rand(B) * 1023

    def bare_step():
        net(x, tau).sample.pow(2).mean().backward()
        net.zero_grad(set_to_none=True)

    frozen = Denoiser(build_network(preset.model, preset.param), schedule=schedule, param=preset.param).eval()
    frozen.requires_grad_(False)
    student_net = init_student(frozen.net, ModelCard(model=preset.model, param=preset.param, schedule=schedule,
                                                     data={"kind": "image"}), preset.param)
    student = Denoiser(student_net, schedule=schedule, param=preset.param)
    sopt = torch.optim.AdamW(student_net.parameters(), lr=1e-4)

    def distill_step():
        batch = distill_batch(data, seed=0, round_idx=0, step=step[0], batch_size=B, num_steps=4, device=dev)
        loss = distillation_loss(student, frozen, batch, sl, num_steps=4, schedule=schedule, weighting="snr_trunc",
                                 class_cond=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_net.parameters(), 1.0)
        sopt.step()
        sopt.zero_grad(set_to_none=True)
        step[0] += 1

    t_train = _time(train_step, a.iters)
    t_bare = _time(bare_step, a.iters)
    t_distill = _time(distill_step, a.iters)
    mcard = ModelCard(model=preset.model, param=preset.param, schedule=schedule,
                      data={"kind": "image", "shape": [1, 8, 8], "spec": "digits"})
    t_sample = _time(lambda: generate(teacher.eval(), mcard, steps=16, num=500, seed=0), 3, warmup=1)

    res = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "batch_size": B,
        "teacher_it_per_s": 1.0 / t_train,
        "teacher_examples_per_s": B / t_train,
        "ddim_images_per_s_per_step": 500 * 16 / t_sample,
        "ddim_16step_images_per_s": 500 / t_sample,
        "train_step_over_bare_fwd_bwd": t_train / t_bare,
        "distill_step_over_teacher_step": t_distill / t_train,
    }
    if a.demo is not None:
        root = a.demo
        dist_dir = root / "distill" if (root / "distill" / CARD).is_file() else root
        run = read_json(dist_dir / CARD)
        teacher_dir = Path(run["teacher"])
        t_iters = read_json(teacher_dir / CARD)["iteration"]
        t_secs = read_json(teacher_dir / "timing.json").get("seconds_total")
        to4 = [r for r in run["rounds"] if r["steps"] >= 4]
        d_iters = sum(r["iters"] for r in to4)
        d_secs = sum(r["seconds"] for r in to4)
        res.update(distill_to4_iters=d_iters, teacher_iters=t_iters, cost_ratio_steps=d_iters / t_iters,
                   cost_ratio_wall=(d_secs / t_secs) if t_secs else None)

    print(f"machine: {res['machine']}, batch {B}")
    print(f"teacher training:            {res['teacher_it_per_s']:.2f} it/s ({res['teacher_examples_per_s']:.0f} examples/s)")
    print(f"DDIM sampling:               {res['ddim_16step_images_per_s']:.1f} images/s at 16 steps "
          f"({res['ddim_images_per_s_per_step']:.0f} network evaluations/s)")
    print(f"train step / bare fwd+bwd:   {res['train_step_over_bare_fwd_bwd']:.2f}")
    r = res["distill_step_over_teacher_step"]
    print(f"distill step / teacher step: {r:.2f}  (limit ~1.67, target <= 1.7: {'PASS' if r <= 1.7 else 'MISS'})")
    if "cost_ratio_steps" in res:
        c = res["cost_ratio_steps"]
        print(f"distillation to 4 steps / teacher training: {c:.2f} in optimizer steps "
              f"({res['distill_to4_iters']} / {res['teacher_iters']}; target <= 1: {'PASS' if c <= 1 else 'MISS'})")
        if res["cost_ratio_wall"] is not None:
            print(f"                                             {res['cost_ratio_wall']:.2f} in wall time")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
