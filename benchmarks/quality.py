"""The issue-4 figures on the built-in digits: progressive distillation against the teacher and its samplers.

    .venv/bin/python benchmarks/quality.py runs/demo                 # 2 seed sets x 2,000 samples (<= 30 min)
    .venv/bin/python benchmarks/quality.py runs/demo --seeds 0 --num 200 --threads 1   # a smoke run

RUN is a demo folder (teacher/ + distill/) or a distillation run. Every FD is against the 500 held-out
digits, in pixels and in the digits classifier's features (trained on the 1,297 training digits only).
For each seed set, PD-1/PD-4 (the run's students), DDIM-4 and DPM-Solver++(2M)-4 (the teacher) and the
teacher's N0-step DDIM (cached in RUN's eval-cache, so reruns are cheap) are scored with `--num` samples
each; ratios are averaged over the seed sets (the per-seed range is printed too). The floor is the FD of
the 1,297 training digits against the held-out 500; the teacher's absolute check uses 1,297 samples
too (FD depends on n). Prints each figure with its target and PASS/MISS, and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from progdistill.data.datasets import load_data
from progdistill.eval.evaluate import cache_dir, evaluate, resolve_run, teacher_samples
from progdistill.eval.report import locate
from progdistill.eval.scoring import Scorer
from progdistill.pipeline import load
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, read_json

TEACHER_FLOOR_N = 1297   # the training split's size: floor and teacher check use the same n


def figure(name: str, value: float, target: str, ok: bool | None, extra: str = "") -> dict:
    verdict = "" if ok is None else ("PASS" if ok else "MISS")
    print(f"{name:<50} {value:>9.3f}   target {target:<10} {verdict:<4} {extra}")
    return {"name": name, "value": value, "target": target, "pass": ok, "detail": extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="demo folder (teacher/ + distill/) or distillation run")
    p.add_argument("--seeds", default="0,1", help="comma list of seed sets (default 0,1)")
    p.add_argument("--num", type=int, default=2000, help="samples per sampler and seed set (default 2000)")
    p.add_argument("--json", default=None, help="output (default RUN/quality.json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on busy shared cores)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out, distill = locate(a.run)
    run = resolve_run(distill)
    n0, seeds = run.start_steps, [int(s) for s in a.seeds.split(",")]
    missing = [n for n in (1, 4) if n not in run.students]
    if missing:
        sys.exit(f"error: {distill} has no steps-{missing[0]:04d} student")
    t_start = time.time()
    scorer = Scorer("digits", "digits", ["fd_pixel", "fd_feature"], (1, 8, 8), num=a.num, seed=0, cache=cache_dir())

    # floor and the teacher's absolute quality, both with 1,297 samples
    floor = scorer(load_data("digits", split="train").x)
    teacher = load(run.teacher)
    x_t, _ = teacher_samples(run, teacher, num=max(TEACHER_FLOOR_N, a.num), seed=seeds[0])
    t_abs = scorer(x_t[:TEACHER_FLOOR_N])

    per_seed = []
    for s in seeds:
        recs = evaluate(distill, steps=[1, 4], methods=["pd", "ddim", "dpmpp2m"],
                        metrics=["fd_pixel", "fd_feature", "psnr_teacher"], num=a.num, seed=s, reference=True)
        per_seed.append({(r["method"], r["steps"]): r for r in recs})

    def ratio(num_key, den_key, metric):
        v = [d[num_key][metric] / d[den_key][metric] for d in per_seed]
        return float(np.mean(v)), f"seeds: {', '.join(f'{x:.2f}' for x in v)}"

    T, PD4, PD1, DD4, DP4 = ("ddim", n0), ("pd", 4), ("pd", 1), ("ddim", 4), ("dpmpp2m", 4)
    card = read_json(distill / CARD)
    t_iters = read_json(run.teacher / CARD).get("iteration", 0)
    d_iters = sum(r["iters"] for r in card.get("rounds", []) if r["steps"] >= 4)
    psnr4 = [d[PD4]["psnr_teacher"] for d in per_seed]

    print(f"\nrun {out}: teacher {t_iters} iterations, N0 = {n0}; seeds {seeds} x {a.num} samples; "
          f"FD against the 500 held-out digits")
    figs = [figure("floor FD pixel (train 1297 vs held-out)", floor["fd_pixel"], "-", None),
            figure("floor FD feature (train 1297 vs held-out)", floor["fd_feature"], "-", None),
            figure(f"teacher-{n0} FD pixel, 1297 samples", t_abs["fd_pixel"], "-", None),
            figure(f"teacher-{n0} FD pixel / floor", t_abs["fd_pixel"] / floor["fd_pixel"], "<= 1.2",
                   t_abs["fd_pixel"] / floor["fd_pixel"] <= 1.2),
            figure(f"teacher-{n0} FD feature / floor", t_abs["fd_feature"] / floor["fd_feature"], "-", None)]
    for name, (n, d), metric, target, ok in [
            (f"PD-4 / teacher-{n0} (pixel)", (PD4, T), "fd_pixel", "<= 1.2", lambda v: v <= 1.2),
            (f"PD-4 / teacher-{n0} (feature)", (PD4, T), "fd_feature", "<= 1.5", lambda v: v <= 1.5),
            (f"PD-1 / teacher-{n0} (pixel)", (PD1, T), "fd_pixel", "<= 1.5", lambda v: v <= 1.5),
            (f"PD-1 / teacher-{n0} (feature)", (PD1, T), "fd_feature", "<= 3", lambda v: v <= 3),
            ("DDIM-4 / PD-4 (feature)", (DD4, PD4), "fd_feature", ">= 3", lambda v: v >= 3),
            ("DDIM-4 / PD-4 (pixel)", (DD4, PD4), "fd_pixel", "-", None),
            ("DPM++-4 / PD-4 (feature)", (DP4, PD4), "fd_feature", ">= 2", lambda v: v >= 2),
            ("DPM++-4 / PD-4 (pixel)", (DP4, PD4), "fd_pixel", "-", None)]:
        v, detail = ratio(n, d, metric)
        figs.append(figure(name, v, target, ok(v) if ok else None, detail))
    figs.append(figure("teacher-match PSNR of PD-4, dB", float(np.mean(psnr4)), ">= 30", float(np.mean(psnr4)) >= 30,
                       f"seeds: {', '.join(f'{x:.1f}' for x in psnr4)}"))
    figs.append(figure("distillation to 4 steps / teacher optimizer steps", d_iters / max(t_iters, 1), "<= 1",
                       d_iters <= t_iters, f"{d_iters} / {t_iters}"))
    seconds = time.time() - t_start
    print(f"done in {seconds:.0f} s ({torch.get_num_threads()} threads)")
    dest = Path(a.json) if a.json else out / "quality.json"
    write_json(dest, {"run": str(out), "seeds": seeds, "num": a.num, "start_steps": n0, "seconds": seconds,
                      "figures": figs, "floor": floor, "teacher_1297": t_abs,
                      "records": [list(d.values()) for d in per_seed]})
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
