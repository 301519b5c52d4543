"""How close the `mlp` teacher comes to the 2-D toy distributions (issue 10 item 2), for one recipe.

    .venv/bin/python benchmarks/toy_teachers.py --tag default                       # today's preset recipe
    .venv/bin/python benchmarks/toy_teachers.py --tag long --iters 6000 --lr-decay cosine
    .venv/bin/python benchmarks/toy_teachers.py --tag smoke --iters 50 --num 500 --toys gmm   # a smoke run

For each toy set (default gmm, checkerboard, rings) the recipe trains an `mlp` teacher (`progdistill
train --data toy:NAME` with the options given; unset options are the preset's), then draws `--num`
samples per seed set with `--steps`-step DDIM and scores them against a fresh draw of the true
distribution of the same size: energy distance (V-statistic, so it has a finite-n floor, printed: the
energy distance between two independent true draws) and sliced W2; on gmm also the share of samples
within 3 standard deviations of a mode (target >= 0.97; true draws 1 - e^-4.5 = 0.989) and the mean
true log-density of the samples (data: its negative entropy). Training seconds are printed beside the
figures. Writes OUT/TAG/toy_teachers.json; teachers stay in OUT/TAG/NAME for reuse (`--reuse`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from progdistill.data.toy import gmm_mode_share, sample_toy, toy_log_density
from progdistill.eval.metrics import energy_distance, sliced_wasserstein
from progdistill.pipeline import load
from progdistill.train.config import TrainConfig
from progdistill.train.teacher import train

MODE_SHARE_TARGET = 0.97


def score(name: str, x: torch.Tensor, seed: int) -> dict:
    """Energy distance and sliced W2 against a fresh true draw of the same size; gmm: mode share, log p."""
    ref = sample_toy(name, len(x), torch.Generator().manual_seed(10_000 + seed))
    out = {"energy": energy_distance(x, ref), "sw": sliced_wasserstein(x, ref, seed=seed)}
    if name == "gmm":
        out["mode_share"] = gmm_mode_share(x)
        out["log_p"] = float(toy_log_density("gmm", x.double()).mean())
    return out


def floor(name: str, n: int, seed: int) -> dict:
    """The same scores for a true draw: what a perfect teacher gets at this n."""
    return score(name, sample_toy(name, n, torch.Generator().manual_seed(20_000 + seed)), seed)


def recipe(a: argparse.Namespace, name: str) -> TrainConfig:
    return TrainConfig(data=f"toy:{name}", preset="mlp", iters=a.iters, batch_size=a.batch_size, lr=a.lr,
                       lr_decay=a.lr_decay, ema_decay=a.ema_decay, ema_warmup=not a.no_ema_warmup, width=a.width,
                       depth=a.depth, weighting=a.weighting, log_every=100, checkpoint_every=10_000)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True, help="recipe name: results go to OUT/TAG")
    p.add_argument("--out", default="runs/toy-teachers")
    p.add_argument("--toys", default="gmm,checkerboard,rings")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--num", type=int, default=5000, help="samples per seed set (default 5000)")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--reuse", action="store_true", help="score existing teachers in OUT/TAG instead of training")
    p.add_argument("--threads", type=int, default=None)
    for flag, kind in (("--iters", int), ("--batch-size", int), ("--lr", float), ("--ema-decay", float),
                       ("--width", int), ("--depth", int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--lr-decay", choices=["constant", "cosine"], default=None)
    p.add_argument("--no-ema-warmup", action="store_true")
    p.add_argument("--weighting", default="snr_trunc")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.out) / a.tag
    seeds = [int(s) for s in a.seeds.split(",")]
    results = {"recipe": {k: v for k, v in vars(a).items() if k not in ("out", "threads", "reuse")}, "toys": {}}
    for name in a.toys.split(","):
        run, secs = root / name, None
        if not a.reuse:
            t0 = time.time()
            train(recipe(a, name), run, progress=False)
            secs = time.time() - t0
        teacher = load(run, device="cpu")
        rows = [{"seed": s, **score(name, teacher.sample(num=a.num, steps=a.steps, seed=s), s)} for s in seeds]
        floors = [floor(name, a.num, s) for s in seeds]
        mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "seed"}
        fl = {k: statistics.fmean(f[k] for f in floors) for k in floors[0]}
        results["toys"][name] = {"train_seconds": secs, "per_seed": rows, "mean": mean, "floor": fl}
        line = "  ".join(f"{k} {mean[k]:.4f} (true draw {fl[k]:.4f})" for k in mean)
        print(f"[{a.tag}] toy:{name}: {line}" + (f"  train {secs:.0f} s" if secs is not None else ""))
        if name == "gmm":
            worst = min(r["mode_share"] for r in rows)
            print(f"[{a.tag}] toy:gmm within-3σ share, worst seed: {worst:.3f}   target >= {MODE_SHARE_TARGET}   "
                  f"{'PASS' if worst >= MODE_SHARE_TARGET else 'MISS'}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "toy_teachers.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
