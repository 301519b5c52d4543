"""How a fixed distillation budget should be split across rounds (issue 10): the student against the
teacher's DDIM, DPM-Solver++(2M) and tuned ancestral samplers at 1, 2, 4 and 8 steps.

    .venv/bin/python benchmarks/round_budgets.py runs/recipes/base --out runs/budgets
    .venv/bin/python benchmarks/round_budgets.py T --out O --splits late,equal --num 300 --seeds 0   # smoke

TEACHER is a digits teacher run. Each split distils it from N0 = --start-steps down to 1 step with the
same total number of optimizer steps (--total, default 1,200 = the demo's 6 x 100 + 2 x 300), batch 64:
  late   the demo's default: equal rounds, the last two 3x (100 x 6, 300 x 2)
  equal  the same number of iterations in every round
  early  more for the early rounds (decreasing linearly, 2:1 from first to last)
  ramp   more for the later rounds (increasing linearly, 1:3 from first to last)
Every split is scored with `--num` samples per seed set (feature FD against the 500 held-out digits, the
digits classifier's features); the teacher's samplers are scored once (ancestral: log-variance fraction
tuned per N on the training split, cached in the first split's run). Prints, per split and N, PD's FD
and PD / best baseline (target: < 1 at every N, <= 0.95 at N = 8, on each seed set), and writes
OUT/round_budgets.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from progdistill.eval.evaluate import evaluate

STEPS = (1, 2, 4, 8)
BASELINES = ("ddim", "dpmpp2m", "ancestral")


def split_iters(name: str, rounds: int, total: int) -> list[int]:
    """Per-round iterations (N0/2 first) summing to `total` (up to rounding, fixed on the last round)."""
    if name == "late":
        base = total / (rounds + 4)           # rounds - 2 at 1x, two at 3x
        its = [base] * (rounds - 2) + [3 * base] * 2
    elif name == "equal":
        its = [total / rounds] * rounds
    elif name in ("early", "ramp"):
        lo, hi = (2.0, 1.0) if name == "early" else (1.0, 3.0)
        w = [lo + (hi - lo) * k / (rounds - 1) for k in range(rounds)]
        its = [total * x / sum(w) for x in w]
    else:
        raise SystemExit(f"error: unknown split {name!r}: use late, equal, early or ramp")
    its = [max(1, round(v)) for v in its]
    its[-1] += total - sum(its)
    return its


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher")
    p.add_argument("--out", default="runs/budgets")
    p.add_argument("--splits", default="late,equal,early,ramp")
    p.add_argument("--total", type=int, default=1200)
    p.add_argument("--start-steps", type=int, default=256)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out, seeds = Path(a.out), [int(s) for s in a.seeds.split(",")]
    rounds = a.start_steps.bit_length() - 1
    results, t0 = {"splits": {}, "baselines": {}}, time.time()
    for name in a.splits.split(","):
        its = split_iters(name, rounds, a.total)
        run = out / name
        if not (run / "steps-0001").is_dir():
            subprocess.run([sys.executable, "-m", "progdistill.cli", "--threads", "1", "distill", "--teacher",
                            a.teacher, "--out", str(run), "--start-steps", str(a.start_steps), "--batch-size", "64",
                            "--round-iters", ",".join(map(str, its)), "--no-progress"], check=True)
        recs = [r for s in seeds for r in evaluate(run, steps=list(STEPS), methods=["pd"],
                                                   metrics=["fd_feature", "fd_pixel"], num=a.num, seed=s,
                                                   progress=False)]
        results["splits"][name] = {"round_iters": its, "records": recs}
        if not results["baselines"]:
            results["baselines"] = [r for s in seeds for r in evaluate(
                run, steps=list(STEPS), methods=list(BASELINES), metrics=["fd_feature", "fd_pixel"], num=a.num,
                seed=s, progress=False)]
        print(f"[{time.time() - t0:.0f} s] {name}: round iterations {its}")
    base = {(r["method"], r["steps"], r["seed"]): r["fd_feature"] for r in results["baselines"]}
    print(f"\nfeature FD (mean over seed sets {seeds}); PD / best baseline per seed set")
    print(f"{'split':<8}" + "".join(f"{'N=' + str(n):>26}" for n in STEPS))
    for n in STEPS:
        best = [min(base[(m, n, s)] for m in BASELINES) for s in seeds]
        results.setdefault("best_baseline", {})[n] = best
    print(f"{'best bl':<8}" + "".join(f"{sum(results['best_baseline'][n]) / len(seeds):>26.2f}" for n in STEPS))
    for name, d in results["splits"].items():
        pd = {(r["steps"], r["seed"]): r["fd_feature"] for r in d["records"]}
        cells = []
        for n in STEPS:
            ratios = [pd[(n, s)] / results["best_baseline"][n][k] for k, s in enumerate(seeds)]
            cells.append(f"{sum(pd[(n, s)] for s in seeds) / len(seeds):.2f} ({'/'.join(f'{r:.2f}' for r in ratios)})")
        print(f"{name:<8}" + "".join(f"{c:>26}" for c in cells))
    (out / "round_budgets.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {out / 'round_budgets.json'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
