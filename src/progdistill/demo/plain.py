"""`progdistill demo`: the whole method on the built-in digits, in about ten minutes on 2 CPU cores.

Train a teacher (or reuse a finished one), distil it 256 -> 1 step, write teacher-DDIM vs student
grids from the same seeds for every step count, evaluate quickly and write the report.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from progdistill.data.images import side_by_side
from progdistill.eval.report import demo_evaluation
from progdistill.pipeline import load
from progdistill.store.card import CARD, read_json, steps_folder_name
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train


@dataclasses.dataclass(frozen=True)
class DemoBudget:
    """Iteration budgets, with wall-clock limits (minutes) as a safety net on slower machines."""

    teacher_iters: int
    teacher_batch: int
    iters_per_round: int
    last_rounds_factor: float
    distill_batch: int
    num_eval: int
    teacher_minutes: float | None
    distill_minutes: float | None
    grid: int = 64          # samples per grid
    start_steps: int = 256


FULL = DemoBudget(teacher_iters=2000, teacher_batch=64, iters_per_round=100, last_rounds_factor=3.0,
                  distill_batch=64, num_eval=1000, teacher_minutes=4.0, distill_minutes=4.5)
QUICK = DemoBudget(teacher_iters=120, teacher_batch=32, iters_per_round=12, last_rounds_factor=1.0,
                   distill_batch=32, num_eval=200, teacher_minutes=1.0, distill_minutes=1.0, grid=16,
                   start_steps=16)


def _finished(run: Path, iters: int) -> bool:
    p = run / CARD
    return p.is_file() and read_json(p).get("iteration", 0) >= iters and (run / "ema").is_dir()


def _distill_finished(run: Path, final_steps: int) -> bool:
    p = run / CARD
    return p.is_file() and read_json(p).get("latest") == steps_folder_name(final_steps)


def write_grids(teacher_dir: Path, distill_dir: Path, out: Path, budget: DemoBudget, seed: int) -> list[Path]:
    """For each step count: teacher DDIM-N | student PD-N | teacher DDIM-N0, from the same seeds."""
    teacher = load(teacher_dir, device="cpu")
    reference = teacher.sample(num=budget.grid, steps=budget.start_steps, seed=seed)
    nrow = int(budget.grid ** 0.5)
    paths = []
    n = budget.start_steps // 2
    while n >= 1:
        if not (distill_dir / steps_folder_name(n) / CARD).is_file():
            break   # stopped by the time limit: run the demo again to resume
        student = load(distill_dir / steps_folder_name(n), device="cpu")
        panels = [(f"teacher DDIM {n}", teacher.sample(num=budget.grid, steps=n, seed=seed)),
                  (f"distilled {n}", student.sample(num=budget.grid, steps=n, seed=seed)),
                  (f"teacher DDIM {budget.start_steps}", reference)]
        path = out / "grids" / f"steps-{n:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        side_by_side(panels, nrow).save(path)
        paths.append(path)
        n //= 2
    return paths


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, seed: int = 0, num_eval: int | None = None,
             teacher_iters: int | None = None, iters_per_round: int | None = None,
             last_rounds_factor: float | None = None) -> None:
    budget = QUICK if quick else FULL
    if num_eval is not None:
        budget = dataclasses.replace(budget, num_eval=num_eval)
    if teacher_iters is not None:      # explicit budgets (benchmarks) run to completion
        budget = dataclasses.replace(budget, teacher_iters=teacher_iters, teacher_minutes=None)
    if iters_per_round is not None:
        budget = dataclasses.replace(budget, iters_per_round=iters_per_round, distill_minutes=None)
    if last_rounds_factor is not None:
        budget = dataclasses.replace(budget, last_rounds_factor=last_rounds_factor)
    out = Path(out)
    t0 = time.time()
    teacher_dir, distill_dir = out / "teacher", out / "distill"
    if _finished(teacher_dir, budget.teacher_iters):
        print(f"[demo] reusing the finished teacher in {teacher_dir}")
    else:
        print(f"[demo] 1/4 training a teacher on digits ({budget.teacher_iters} iterations)")
        cfg = TrainConfig(data="digits", preset="digits", iters=budget.teacher_iters, batch_size=budget.teacher_batch,
                          seed=seed, checkpoint_every=500, time_limit=budget.teacher_minutes)
        train(cfg, teacher_dir, resume=(teacher_dir / "config.json").exists())
    t1 = time.time()
    if _distill_finished(distill_dir, 1):
        print(f"[demo] reusing the finished distillation in {distill_dir}")
    else:
        print(f"[demo] 2/4 distilling {budget.start_steps} -> 1 steps ({budget.iters_per_round} iterations per round)")
        cfg = DistillConfig(teacher=str(teacher_dir), start_steps=budget.start_steps, final_steps=1,
                            iters_per_round=budget.iters_per_round, last_rounds_factor=budget.last_rounds_factor,
                            batch_size=budget.distill_batch, seed=seed, time_limit=budget.distill_minutes)
        distill(cfg, distill_dir, resume=(distill_dir / "config.json").exists())
    t2 = time.time()
    print("[demo] 3/4 writing sample grids (same seeds: teacher DDIM | distilled | teacher 256 steps)")
    paths = write_grids(teacher_dir, distill_dir, out, budget, seed)
    print(f"[demo]     {len(paths)} grids in {out / 'grids'}")
    t3 = time.time()
    if budget.num_eval > 0:
        print(f"[demo] 4/4 evaluating ({budget.num_eval} samples per sampler) and writing the report")
        demo_evaluation(distill_dir, out, num=budget.num_eval, seed=seed, quick=quick)
    else:
        print("[demo] 4/4 evaluation skipped (--num-eval 0)")
    t4 = time.time()
    print(f"[demo] done in {t4 - t0:.0f} s (teacher {t1 - t0:.0f} s, distillation {t2 - t1:.0f} s, "
          f"grids {t3 - t2:.0f} s, evaluation {t4 - t3:.0f} s); outputs in {out}")
