"""`progdistill eval`, `progdistill report` and `progdistill eval-guided`: parsers and handlers.

The evaluation modules are imported only inside the handlers; their method, metric and default lists are
spelled out in the help here (tests/unit/cli checks them against the modules)."""

from __future__ import annotations

import argparse
from pathlib import Path

from progdistill.cli.common import add_command, check_typed_seed, needs, typed, value
from progdistill.errors import UserError

METHODS = ("pd", "ddim", "ancestral", "dpmpp2m")       # eval.evaluate.METHODS
METRICS = ("fd_pixel", "fd_feature", "precision", "recall", "class_coverage", "class_entropy", "fid", "sw",
           "energy", "xent_true", "nll", "psnr_teacher")  # eval.evaluate.METRICS
ANCESTRAL_GRID = "0,0.25,0.5,0.75,1"                  # eval.evaluate.ANCESTRAL_GRID
GUIDED_WS, GUIDED_STEPS = "0,0.5,1,2,4", "1,2,4,8"     # eval.guided.WS, eval.guided.STEPS

EVAL_DESCRIPTION = "`progdistill eval`: sample quality against NFE for distilled students and the teacher's samplers."
EVAL_EXAMPLES = """examples:
  progdistill eval --model runs/demo/distill --steps 1,2,4,8 --num 1000
  progdistill eval --model runs/gmm-distill --data toy:gmm --metric sw,energy,nll
  progdistill eval --model runs/c10-distill --metric fid --inception inception.pt"""
REPORT_DESCRIPTION = ("`progdistill report RUN`: a self-contained HTML page (images inlined) and a Markdown file "
                      "about a distillation.")
GUIDED_DESCRIPTION = ("`progdistill eval-guided`: conditional evaluation of a guided distillation (Meng et al. "
                      "2023's trade-off).")
GUIDED_EXAMPLES = "example:\n  progdistill eval-guided --model runs/gd --num 500 --ref-steps 64"


def csv(text: str | None, cast, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers, got {text!r}") from None


def cmd_eval(a: argparse.Namespace) -> None:
    seed = check_typed_seed(a)
    steps, grid = csv(a.steps, int, "--steps"), csv(a.ancestral_grid, float, "--ancestral-grid")
    methods, metrics = csv(a.sampler, str, "--sampler"), csv(a.metric, str, "--metric")
    if methods is not None and "ancestral" not in methods and typed(a, "ancestral_grid", "tune_num"):
        raise UserError(f"{', '.join(typed(a, 'ancestral_grid', 'tune_num'))} only apply to the ancestral sampler: "
                        f"add ancestral to --sampler or drop them")
    num = value(a.num, 50_000 if metrics and "fid" in metrics else 1000)
    with needs("eval"):
        from progdistill.eval.evaluate import ANCESTRAL_GRID as grid_default
        from progdistill.eval.evaluate import evaluate, format_records, resolve_run
        from progdistill.store.atomic import write_json
    records = evaluate(a.model, data=a.data, steps=steps, methods=methods, metrics=metrics, num=num, seed=seed,
                       reference=bool(a.reference), ref_num=a.ref_num, ancestral_grid=value(grid, grid_default),
                       tune_num=a.tune_num, inception=a.inception, batch_size=value(a.batch_size, 500),
                       device=a.device, guidance=a.guidance, progress=not a.no_progress)
    print(format_records(records))
    out = Path(a.json) if a.json else resolve_run(a.model).root / "eval.json"
    write_json(out, records)
    print(f"wrote {out}")


def cmd_report(a: argparse.Namespace) -> None:
    seed = check_typed_seed(a)
    num, quick = value(a.num, 500), bool(a.quick)
    with needs("report"):
        from progdistill.eval.evaluate import resolve_run
        from progdistill.eval.report import compact_table, locate, run_evaluation, write_report
        from progdistill.store.card import read_json
    out, distill = locate(a.run)
    path = out / "eval.json"
    if path.is_file() and not a.reevaluate:
        records = read_json(path, "evaluation records")
        if not isinstance(records, list) or not all(isinstance(r, dict) and "method" in r for r in records):
            raise UserError(f"{path} does not hold evaluation records; delete it or pass --reevaluate")
    else:
        why = "re-evaluating" if path.is_file() else f"{path} not found"
        print(f"{why}: running a {'quick ' if quick else ''}evaluation ({num} samples)")
        records = run_evaluation(distill, out, num=num, seed=seed, quick=quick)
    print(compact_table(records, resolve_run(distill).start_steps))
    html_path, md_path = write_report(out, distill, records, seed=records[0]["seed"] if records else seed)
    print(f"wrote {html_path} and {md_path}")


def cmd_eval_guided(a: argparse.Namespace) -> None:
    seed = check_typed_seed(a)
    ws, steps = csv(value(a.w, GUIDED_WS), float, "--w"), csv(value(a.steps, GUIDED_STEPS), int, "--steps")
    num, ref_steps = value(a.num, 500), value(a.ref_steps, 64)
    if num < 1:
        raise UserError(f"--num must be a positive integer, got {num}")
    with needs("eval-guided"):
        from progdistill.eval.evaluate import resolve_run
        from progdistill.eval.guided import evaluate_guided, table, write_guided_report
        from progdistill.store.atomic import write_json
    records = evaluate_guided(a.model, ws=ws, steps=steps, num=num, seed=seed, ref_steps=ref_steps,
                              batch_size=value(a.batch_size, 500))
    out = Path(a.out) if a.out else resolve_run(a.model).root
    write_json(out / "eval-guided.json", records)
    print(table(records))
    report = write_guided_report(out, a.model, records, ws=ws, ref_steps=ref_steps, seed=seed)
    print(f"wrote {out / 'eval-guided.json'} and {report}")


def add_eval_parser(sub) -> None:
    e = add_command(sub, "eval", "sample quality per step count: distilled students vs the teacher's samplers",
                    cmd_eval, EVAL_EXAMPLES, description=EVAL_DESCRIPTION)
    e.add_argument("--model", required=True, help="distillation run, its steps-NNNN folder, a teacher run, "
                   "or diffusers:PATH (then --data is required)")
    e.add_argument("--data", default=None, help="reference data spec (default: the teacher's)")
    e.add_argument("--steps", default=None, help="comma list, e.g. 1,2,4,8 (default: the run's distilled steps)")
    e.add_argument("--sampler", default=None, help=f"comma list of methods from {','.join(METHODS)} (default: all)")
    e.add_argument("--metric", default=None, help=f"comma list from {','.join(METRICS)} (default: per data)")
    e.add_argument("--num", type=int, default=None, help="samples per (method, steps); default 50,000 with fid, "
                                                         "else 1,000")
    e.add_argument("--seed", type=int, default=None, help="default 0")
    e.add_argument("--json", default=None, help="write the records here (default: RUN/eval.json)")
    e.add_argument("--inception", default=None, help="path of inception-2015-12-05.pt (for --metric fid)")
    e.add_argument("--reference", action="store_true", default=None, help="also evaluate the teacher's N0-step DDIM")
    e.add_argument("--ancestral-grid", default=None,
                   help=f"ancestral: log-variance fractions tuned per N (default {ANCESTRAL_GRID})")
    e.add_argument("--ref-num", type=int, default=None, help="teacher-match reference samples (default: --num)")
    e.add_argument("--tune-num", type=int, default=None,
                   help="ancestral: samples per tuned fraction (default min(num, 500))")
    e.add_argument("--batch-size", type=int, default=None, help="default 500")
    e.add_argument("--device", default=None)
    e.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance w for every method (class-conditional teachers, --guided students)")
    e.add_argument("--no-progress", action="store_true", default=None)


def add_report_parser(sub) -> None:
    r = add_command(sub, "report", "HTML + Markdown report of a distillation run (table, plot, grids, cost)",
                    cmd_report, description=REPORT_DESCRIPTION)
    r.add_argument("run", help="distillation run, or a demo folder with teacher/ and distill/")
    r.add_argument("--num", type=int, default=None, help="samples per sampler if eval.json must be computed "
                                                         "(default 500)")
    r.add_argument("--seed", type=int, default=None, help="default 0")
    r.add_argument("--quick", action="store_true", default=None,
                   help="quick evaluation (steps 1,2,4; 2-point ancestral grid)")
    r.add_argument("--reevaluate", action="store_true", default=None, help="recompute eval.json even if present")


def add_eval_guided_parser(sub) -> None:
    e = add_command(sub, "eval-guided", "conditional evaluation of a guided distillation: FD vs class accuracy per w",
                    cmd_eval_guided, GUIDED_EXAMPLES, description=GUIDED_DESCRIPTION)
    e.add_argument("--model", required=True, help="a guided distillation run (distill --guided)")
    e.add_argument("--w", default=None, help=f"comma list of guidance strengths (default {GUIDED_WS})")
    e.add_argument("--steps", default=None, help=f"comma list of student step counts (NFE; default {GUIDED_STEPS})")
    e.add_argument("--num", type=int, default=None, help="default 500")
    e.add_argument("--seed", type=int, default=None, help="default 0")
    e.add_argument("--ref-steps", type=int, default=None, help="guided teacher DDIM steps of the reference (default 64)")
    e.add_argument("--out", default=None, help="folder for eval-guided.json and report-guided.md (default: the run)")
    e.add_argument("--batch-size", type=int, default=None, help="default 500")


def add_parsers(sub) -> None:
    add_eval_parser(sub)
    add_report_parser(sub)
    add_eval_guided_parser(sub)
