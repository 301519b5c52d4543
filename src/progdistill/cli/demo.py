"""`progdistill demo [--guided]`: parser and handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from progdistill.cli.common import add_command, check_typed_seed, needs
from progdistill.errors import UserError

EXAMPLES = """examples:
  progdistill demo                       # digits: teacher, distil 256 -> 1 step, grids, table, report (~10 min)
  progdistill demo --quick --out runs/q  # a 2-minute smoke run
  progdistill demo --guided              # guided distillation of a class-conditional teacher (~10 min)"""
DEFAULT_OUT = {False: "runs/demo", True: "runs/demo-guided"}


def cmd_demo(a: argparse.Namespace) -> None:
    seed = check_typed_seed(a)
    guided = bool(a.guided)
    out = Path(a.out if a.out is not None else DEFAULT_OUT[guided])
    budgets = {"num_eval": a.num_eval, "teacher_iters": a.teacher_iters, "iters_per_round": a.iters_per_round,
               "last_rounds_factor": a.last_rounds_factor}
    if a.num_eval is not None and a.num_eval < 0:
        raise UserError(f"--num-eval must be 0 (skip evaluation) or a number of samples, got {a.num_eval}")
    with needs("demo"):
        if guided:
            from progdistill.demo.guided import run_guided_demo as run
        else:
            from progdistill.demo.plain import run_demo as run
    run(out=out, quick=bool(a.quick), seed=seed, **budgets)


def add_parsers(sub) -> None:
    d = add_command(sub, "demo", "the whole method on built-in digits: teacher, distillation, grids, table, report",
                    cmd_demo, EXAMPLES)
    d.add_argument("--out", default=None, help="output folder (a finished teacher there is reused; default runs/demo, "
                   "with --guided runs/demo-guided)")
    d.add_argument("--quick", action="store_true", default=None, help="tiny budgets (~2 minutes), for smoke tests")
    d.add_argument("--seed", type=int, default=None, help="default 0")
    d.add_argument("--num-eval", type=int, default=None, help="samples per evaluated sampler (0: skip evaluation)")
    d.add_argument("--teacher-iters", type=int, default=None, help="override the teacher budget (no time limit)")
    d.add_argument("--iters-per-round", type=int, default=None, help="override the distillation budget (no time limit)")
    d.add_argument("--last-rounds-factor", type=float, default=None)
    d.add_argument("--guided", action="store_true", default=None, help="guided distillation instead: class-conditional "
                   "teacher, stage 1 + 2 to 1 step, class x w grids, FD vs class accuracy per w (~10 min)")
