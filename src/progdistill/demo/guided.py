"""`progdistill demo --guided`: guided distillation on the built-in digits in about ten minutes on 2 CPU cores.

A class-conditional digits teacher with label dropout 0.1; stage 1 (guidance distillation, w ~ U[0, 4])
into OUT/distill/guided; stage 2 from N0 = 64 guided-teacher steps down to 1; class x w grids, the
conditional table at w in {0, 0.5, 1, 2, 4} and N in {1, 2, 4} (500 samples per cell, the guided
teacher's 64-step DDIM as the reference) and OUT/report-guided.md. Each stage has a wall-clock limit
as a safety net; run the command again to resume where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from progdistill.eval.guided import evaluate_guided, table, write_guided_report
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, read_json, steps_folder_name
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train


@dataclasses.dataclass(frozen=True)
class GuidedBudget:
    teacher_iters: int
    guided_iters: int
    iters_per_round: int
    last_rounds_factor: float
    batch: int
    start_steps: int
    num_eval: int
    ref_steps: int
    ws: tuple
    steps: tuple
    minutes: tuple          # wall-clock limits: teacher, guided distillation (stage 1 + 2); None: none
    model_overrides: dict = dataclasses.field(default_factory=dict)


FULL = GuidedBudget(teacher_iters=2000, guided_iters=300, iters_per_round=80, last_rounds_factor=2.0, batch=64,
                    start_steps=64, num_eval=500, ref_steps=64, ws=(0.0, 0.5, 1.0, 2.0, 4.0), steps=(1, 2, 4),
                    minutes=(3.5, 3.7))
QUICK = GuidedBudget(teacher_iters=40, guided_iters=6, iters_per_round=3, last_rounds_factor=1.0, batch=16,
                     start_steps=4, num_eval=40, ref_steps=4, ws=(0.0, 2.0), steps=(1, 2), minutes=(1.0, 1.0),
                     model_overrides={"block_out_channels": (8, 16), "norm_num_groups": 8, "attention_levels": ()})


def choose_budget(quick: bool = False, budget: GuidedBudget | None = None, *, num_eval: int | None = None,
                  teacher_iters: int | None = None, iters_per_round: int | None = None,
                  last_rounds_factor: float | None = None) -> GuidedBudget:
    """FULL / QUICK (or `budget`) with the demo's overrides; explicit budgets run to completion (no time
    limit on that stage), as in the plain demo."""
    b = budget or (QUICK if quick else FULL)
    if num_eval is not None:
        b = dataclasses.replace(b, num_eval=num_eval)
    if teacher_iters is not None:
        b = dataclasses.replace(b, teacher_iters=teacher_iters, minutes=(None, b.minutes[1]))
    if iters_per_round is not None:
        b = dataclasses.replace(b, iters_per_round=iters_per_round, minutes=(b.minutes[0], None))
    if last_rounds_factor is not None:
        b = dataclasses.replace(b, last_rounds_factor=last_rounds_factor)
    return b


def run_guided_demo(out: Path = Path("runs/demo-guided"), quick: bool = False, seed: int = 0,
                    num_eval: int | None = None, budget: GuidedBudget | None = None, *,
                    teacher_iters: int | None = None, iters_per_round: int | None = None,
                    last_rounds_factor: float | None = None) -> list[dict]:
    """Teacher, stage 1 + 2, grids, table and report into `out`; finished stages are reused.
    `budget` replaces FULL / QUICK (benchmarks/guided.py's quick mode distils from 16 steps); the keyword
    overrides are the plain demo's (`num_eval` 0 skips evaluation and the report)."""
    b = choose_budget(quick, budget, num_eval=num_eval, teacher_iters=teacher_iters, iters_per_round=iters_per_round,
                      last_rounds_factor=last_rounds_factor)
    out, t0 = Path(out), time.time()
    teacher_dir, distill_dir = out / "teacher", out / "distill"
    card = read_json(teacher_dir / CARD) if (teacher_dir / CARD).is_file() else {}
    if card.get("iteration", 0) >= b.teacher_iters and (teacher_dir / "ema").is_dir():
        print(f"[demo] reusing the finished teacher in {teacher_dir}")
    else:
        print(f"[demo] 1/4 training a class-conditional digits teacher, label dropout 0.1 ({b.teacher_iters} iterations)")
        train(TrainConfig(data="digits", preset="digits", class_cond=True, label_dropout=0.1, iters=b.teacher_iters,
                          batch_size=b.batch, seed=seed, checkpoint_every=500, time_limit=b.minutes[0],
                          model_overrides=b.model_overrides), teacher_dir, resume=(teacher_dir / "config.json").exists())
    t1 = time.time()
    done = (distill_dir / CARD).is_file() and read_json(distill_dir / CARD).get("latest") == steps_folder_name(1)
    if done:
        print(f"[demo] reusing the finished guided distillation in {distill_dir}")
    else:
        print(f"[demo] 2/4 guided distillation: stage 1 ({b.guided_iters} iterations, w ~ U[0, 4]), then "
              f"{b.start_steps} -> 1 steps ({b.iters_per_round} iterations per round)")
        resume = (distill_dir / "config.json").exists()
        cfg = DistillConfig(teacher=str(teacher_dir), guided=True, guided_iters=b.guided_iters,
                            start_steps=b.start_steps, final_steps=1, iters_per_round=b.iters_per_round,
                            last_rounds_factor=b.last_rounds_factor, batch_size=b.batch, seed=seed,
                            time_limit=b.minutes[1])
        distill(cfg, distill_dir, resume=resume)
        if read_json(distill_dir / CARD).get("latest") != steps_folder_name(1):
            print("[demo] time limit reached: run the same command again to resume")
            return []
    t2 = time.time()
    if b.num_eval < 1:
        print(f"[demo] 3/4 evaluation and report skipped (--num-eval 0); done in {t2 - t0:.0f} s, guided "
              f"distillation in {distill_dir}")
        return []
    print(f"[demo] 3/4 evaluating: w in {list(b.ws)}, N in {list(b.steps)}, {b.num_eval} samples per cell, "
          f"guided teacher DDIM {b.ref_steps} as the reference")
    records = evaluate_guided(distill_dir, ws=b.ws, steps=b.steps, num=b.num_eval, seed=seed, ref_steps=b.ref_steps)
    write_json(out / "eval-guided.json", records)
    print(table(records))
    t3 = time.time()
    print("[demo] 4/4 grids (rows = class, columns = w) and report")
    path = write_guided_report(out, distill_dir, records, ws=b.ws, ref_steps=b.ref_steps, seed=seed)
    print(f"[demo] done in {time.time() - t0:.0f} s (teacher {t1 - t0:.0f} s, guided distillation {t2 - t1:.0f} s, "
          f"evaluation {t3 - t2:.0f} s); report {path}")
    return records
