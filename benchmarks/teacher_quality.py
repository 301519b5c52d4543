"""How close a digits teacher comes to the data: its 256-step DDIM against the real-data floor.

    .venv/bin/python benchmarks/teacher_quality.py runs/teacher              # 2 seed sets x 1,297 samples
    .venv/bin/python benchmarks/teacher_quality.py runs/teacher --num 200 --seeds 0   # a smoke run

RUN is a digits teacher run (or a demo folder holding teacher/). For each seed set, 1,297 samples (the
training split's size, so that the floor and the teacher use the same n: FD depends on n) of the
teacher's `--steps`-step DDIM are scored against the 500 held-out digits, in pixels and in the digits
classifier's features (trained on the 1,297 training digits only). The floor is the FD of the 1,297
training digits against the held-out 500. Targets (issue 10): pixel FD <= 1.2 x floor, feature FD <=
1.5 x floor, both seed sets.

The floor is met trivially by memorising the training set, so it also prints a memorisation guard:
for each sample, the distance to its nearest training digit divided by the distance to its nearest
held-out digit, with both reference sets of 500 (a fixed random subset of the training digits), so
that set size does not bias the ratio. A model that generalises gives a median near 1 (target >= 0.9);
one that copies training digits gives a median near 0. Writes RUN/teacher_quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from progdistill.data.datasets import load_data
from progdistill.eval.evaluate import cache_dir
from progdistill.eval.scoring import Scorer
from progdistill.pipeline import load

N_SAMPLES = 1297            # the training split's size
PIXEL_TARGET, FEATURE_TARGET, MEMO_TARGET = 1.2, 1.5, 0.9


def nn_distance(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Euclidean distance (pixels) from each row of x to its nearest row of ref."""
    return torch.cdist(x.reshape(len(x), -1).double(), ref.reshape(len(ref), -1).double()).min(1).values


def memorisation_ratio(x: torch.Tensor, train: torch.Tensor, held: torch.Tensor, seed: int = 0) -> float:
    """Median over samples of d(sample, nearest of 500 training digits) / d(sample, nearest held-out digit)."""
    g = torch.Generator().manual_seed(seed)
    sub = train[torch.randperm(len(train), generator=g)[:len(held)]]
    return float((nn_distance(x, sub) / nn_distance(x, held).clamp_min(1e-12)).median())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="teacher run folder, or a demo folder with teacher/")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--num", type=int, default=N_SAMPLES, help=f"samples per seed set (default {N_SAMPLES})")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.run)
    if (run / "teacher").is_dir():
        run = run / "teacher"
    t0 = time.time()
    train, held = load_data("digits", split="train").x, load_data("digits", split="heldout").x
    scorer = Scorer("digits", "digits", ["fd_pixel", "fd_feature"], (1, 8, 8), num=N_SAMPLES, seed=0,
                    cache=cache_dir())
    floor = scorer(train)
    teacher = load(run, device="cpu")
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        x = teacher.sample(num=a.num, steps=a.steps, seed=seed, progress=True)
        r = scorer(x)
        r.update(seed=seed, memorisation=memorisation_ratio(x, train, held, seed=seed))
        rows.append(r)
        print(f"seed {seed}: fd_pixel {r['fd_pixel']:.4f} ({r['fd_pixel'] / floor['fd_pixel']:.2f} x floor)  "
              f"fd_feature {r['fd_feature']:.3f} ({r['fd_feature'] / floor['fd_feature']:.2f} x floor)  "
              f"memorisation median {r['memorisation']:.3f}")
    px = [r["fd_pixel"] / floor["fd_pixel"] for r in rows]
    ft = [r["fd_feature"] / floor["fd_feature"] for r in rows]
    memo = [r["memorisation"] for r in rows]
    checks = [("teacher pixel FD / floor", max(px), f"<= {PIXEL_TARGET}", max(px) <= PIXEL_TARGET),
              ("teacher feature FD / floor", max(ft), f"<= {FEATURE_TARGET}", max(ft) <= FEATURE_TARGET),
              ("memorisation guard: median NN ratio (min)", min(memo), f">= {MEMO_TARGET}", min(memo) >= MEMO_TARGET)]
    print(f"\nfloor (1,297 training vs 500 held-out digits): fd_pixel {floor['fd_pixel']:.4f}  "
          f"fd_feature {floor['fd_feature']:.3f}")
    for name, v, target, ok in checks:
        print(f"{name:<44} {v:>7.3f}  target {target:<7} {'PASS' if ok else 'MISS'}  (worst seed set)")
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").is_file() else {}
    out = {"run": str(run), "steps": a.steps, "num": a.num, "floor": floor, "seeds": rows,
           "checks": [{"name": n, "value": v, "target": t, "pass": ok} for n, v, t, ok in checks],
           "teacher_train_seconds": timing.get("seconds_total"), "seconds": time.time() - t0}
    (run / "teacher_quality.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"wrote {run / 'teacher_quality.json'} ({time.time() - t0:.0f} s; teacher training "
          f"{timing.get('seconds_total', float('nan')):.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
