"""The issue-8 figures on the built-in digits: guided distillation (Meng et al. 2023) against the guided teacher.

    .venv/bin/python benchmarks/guided.py                             # <= 30 min: demo --guided run + 2 x 500 samples
    .venv/bin/python benchmarks/guided.py --out runs/demo-guided      # reuse `progdistill demo --guided` output
    .venv/bin/python benchmarks/guided.py --distill runs/gd           # an existing guided distillation run
    .venv/bin/python benchmarks/guided.py --teacher runs/cond         # distil this teacher (demo budgets) into OUT
    .venv/bin/python benchmarks/guided.py --quick --threads 1         # a 2-3 minute smoke run (tiny models)

The run: `--distill RUN2` (a guided distillation run or a demo folder), else OUT/distill when it is a finished
guided distillation (e.g. `progdistill demo --guided --out OUT`), else it is made with the demo's budgets
(demo.guided.FULL, about 500 s: teacher with label dropout 0.1, stage 1, rounds 64 -> 1; `--teacher RUN`
distils that teacher instead). Then, for each seed set, eval.guided.evaluate_guided scores `--num` samples per
(method, N, w), w in {0, 0.5, 1, 2, 4}: the guided student (N-step DDIM and stochastic), the guided
teacher's DDIM and DPM-Solver++(2M) at equal NFE (N/2 guided steps of 2 evaluations; N steps at w = 0) and
the guided teacher's 256-step DDIM (512 NFE; 256 at w = 0, conditional) as the reference, cached per w and
seed in RUN2/eval-cache so that reruns are cheap. The reference is the expensive part: its cost is
estimated from the teacher's measured evaluations/s, and its sample count alone is cut (printed) when the
--budget-min budget demands it. Sample i requests class i mod 10; class accuracy is the share the digits
classifier (trained on the training digits only) assigns to the requested class. Seed sets are pooled for
class accuracy; FD ratios are averaged over seed sets (per-seed values printed). Prints every figure with
its target and PASS/MISS, one table per metric (rows method x NFE, columns w), and writes OUT/guided_bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from progdistill.demo.guided import FULL, QUICK, run_guided_demo
from progdistill.errors import UserError
from progdistill.eval.evaluate import cache_dir, resolve_run
from progdistill.eval.guided import METRICS as SCORED
from progdistill.eval.guided import NAMES, STEPS, WS, evaluate_guided, teacher_steps
from progdistill.eval.report import locate
from progdistill.eval.scoring import Scorer
from progdistill.pipeline import load
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, read_json, steps_folder_name
from progdistill.train.config import DistillConfig
from progdistill.train.distill import distill

QUICK_BUDGET = dataclasses.replace(QUICK, start_steps=16)   # tiny models, but students at 8, 4, 2 and 1 steps
METRICS = ["fd_feature", "fd_pixel", "precision", "recall", "class_acc", "psnr_teacher"]
ORDER = ["gd", "gd_stochastic", "ddim", "dpmpp2m", "reference"]


def figure(name: str, value: float, target: str, ok: bool | None, extra: str = "") -> dict:
    verdict = "" if ok is None else ("PASS" if ok else "MISS")
    print(f"{name:<58} {value:>9.3f}   target {target:<12} {verdict:<4} {extra}")
    return {"name": name, "value": value, "target": target, "pass": ok, "detail": extra}


def finished(distill_dir: Path) -> bool:
    return (distill_dir / CARD).is_file() and read_json(distill_dir / CARD).get("latest") == steps_folder_name(1)


def obtain_run(a, budget) -> tuple[Path, str]:
    """(the guided distillation run, how it was obtained), training and distilling what is missing."""
    out = Path(a.out)
    if a.distill:
        return locate(a.distill)[1], f"given ({a.distill})"
    distill_dir = out / "distill"
    if finished(distill_dir):
        return distill_dir, f"reused {distill_dir}"
    for attempt in range(4):      # each stage has a wall-clock safety net; running again resumes
        if a.teacher:
            cfg = DistillConfig(teacher=str(a.teacher), guided=True, guided_iters=budget.guided_iters,
                                start_steps=budget.start_steps, final_steps=1, iters_per_round=budget.iters_per_round,
                                last_rounds_factor=budget.last_rounds_factor, batch_size=budget.batch, seed=0,
                                time_limit=budget.minutes[1])
            distill(cfg, distill_dir, resume=(distill_dir / "config.json").exists())
        else:
            run_guided_demo(out, budget=budget)
        if finished(distill_dir):
            return distill_dir, (f"distilled {a.teacher} with the demo's budgets" if a.teacher
                                 else "made by progdistill demo --guided" + (" (quick budgets, from 16 steps)"
                                                                            if a.quick else ""))
        print(f"[bench] not finished after attempt {attempt + 1}: resuming")
    raise UserError(f"{distill_dir} did not finish in 4 attempts")


def cached_reference(run, teacher, *, steps: int, seed: int, w: float) -> int:
    """How many reference samples evaluate.teacher_samples has cached for (steps, seed, w) (its file name)."""
    path = run.root / "eval-cache" / f"teacher-ddim{steps:04d}-seed{seed}-w{w:g}.npz"
    try:
        with np.load(path) as z:
            return len(z["x"]) if int(z["iteration"]) == teacher.card.iteration else 0
    except Exception:
        return 0


def plan_reference(a, run, teacher, *, seeds, steps, t_start: float) -> tuple[int, dict]:
    """The reference's sample count: --num unless the time budget demands fewer (multiples of 10, >= 100)."""
    n_probe = min(a.num, 500)
    t0 = time.perf_counter()
    x = teacher.sample(num=n_probe, steps=2, guidance=1.0, seed=10_000)      # 2 guided steps = 4 NFE per sample
    nfe_s = 4 * n_probe / (time.perf_counter() - t0)
    scorer = Scorer("digits", "digits", SCORED, teacher.card.data["shape"], num=n_probe, seed=0, cache=cache_dir(),
                    log=lambda *_: None)
    t0 = time.perf_counter()
    scorer(x), scorer.clf.predict(x)
    score_s = (time.perf_counter() - t0) * a.num / n_probe        # one cell's scoring at --num samples
    ref_nfe = {w: a.ref_steps * (2 if w > 0 else 1) for w in WS}
    cached = {(s, w): cached_reference(run, teacher, steps=a.ref_steps, seed=s, w=w) for s in seeds for w in WS}

    def ref_seconds(n):
        return sum(max(0, n - cached[s, w]) * ref_nfe[w] for s in seeds for w in WS) / nfe_s

    students = [n for n in steps if n in run.students]
    per_w = {w: sum(students) + sum(n for n in students if n >= 2)
             + sum(2 * n for n in steps if teacher_steps(n, w) is not None) for w in WS}
    cells = len(seeds) * sum(1 + len(students) + sum(n >= 2 for n in students)
                             + 2 * sum(teacher_steps(n, w) is not None for n in steps) for w in WS)
    other = len(seeds) * a.num * sum(per_w.values()) / nfe_s + cells * score_s
    left = 60 * a.budget_min - (time.time() - t_start) - other - 30      # 30 s: loading, tables, JSON
    ref_num, note = a.num, "full"
    if a.ref_num:
        ref_num, note = min(a.ref_num, a.num), "--ref-num"
    elif ref_seconds(a.num) > left:
        fit = [n for n in range(a.num - a.num % 10, 99, -10) if ref_seconds(n) <= left]
        ref_num = fit[0] if fit else min(100, a.num)
        note = (f"cut from {a.num} to fit the {a.budget_min:g}-minute budget" if fit else
                f"cut to {ref_num}, and even that overruns the {a.budget_min:g}-minute budget")
    plan = {"nfe_per_s": nfe_s, "score_s_per_cell": score_s, "reference_s_full": ref_seconds(a.num),
            "reference_s": ref_seconds(ref_num), "other_s": other, "seconds_left_for_reference": left,
            "ref_num": ref_num, "ref_num_note": note,
            "reference_cached": {f"seed{s}-w{w:g}": c for (s, w), c in cached.items()}}
    print(f"[bench] teacher guided DDIM: {nfe_s:,.0f} network evaluations/s; reference ({a.ref_steps} steps) at "
          f"{a.num} samples: {plan['reference_s_full']:.0f} s (cache counted), other cells ~{other:.0f} s, "
          f"{max(left, 0):.0f} s left for the reference -> {ref_num} reference samples per (w, seed) ({note})")
    return ref_num, plan


# ------------------------------------------------------------------------------------ pooling
def row_key(r) -> tuple[str, int]:
    return r["method"], (r["steps"] if r["method"] == "reference" else r["nfe"])


def row_label(method: str, n: int, ref_steps: int) -> str:
    if method == "reference":
        return f"teacher DDIM {ref_steps} steps ({2 * ref_steps} NFE; w=0: {ref_steps})"
    if method in ("ddim", "dpmpp2m"):
        m = max(n // 2, 1)
        return f"{NAMES[method].replace('teacher guided ', 'teacher ')} {n} NFE ({m} step{'s' * (m > 1)}; w=0: {n})"
    return f"{NAMES[method].replace('guided student ', 'student ')} {n} step{'s' * (n > 1)}"


def pool(records: list[dict]) -> dict:
    """(method, N) -> w -> pooled values: class accuracy over all samples, the rest averaged over seed sets."""
    cells: dict = {}
    for r in records:
        cells.setdefault(row_key(r), {}).setdefault(r["w"], []).append(r)
    out = {}
    for key, by_w in cells.items():
        out[key] = {}
        for w, rs in by_w.items():
            n = sum(r["num"] for r in rs)
            p = sum(r["class_acc"] * r["num"] for r in rs) / n
            v = {"class_acc": p, "class_acc_se": math.sqrt(p * (1 - p) / n), "n": n, "seeds": len(rs)}
            for m in METRICS:
                if m != "class_acc" and all(r.get(m) is not None for r in rs):
                    v[m] = float(np.mean([r[m] for r in rs]))
            out[key][w] = v
    return out


def per_seed(records, method, n, w, metric) -> list[float]:
    return [r[metric] for r in sorted(records, key=lambda r: r["seed"]) if row_key(r) == (method, n) and r["w"] == w]


def print_tables(pooled: dict, ref_steps: int) -> dict:
    tables = {}
    keys = sorted(pooled, key=lambda k: (ORDER.index(k[0]), k[1]))
    for m in METRICS:
        rows = {row_label(*k, ref_steps): {f"{w:g}": pooled[k].get(w, {}).get(m) for w in WS} for k in keys}
        rows = {lab: vals for lab, vals in rows.items() if any(v is not None for v in vals.values())}
        if m == "class_acc":
            for k in keys:
                tables.setdefault("class_acc_se", {})[row_label(*k, ref_steps)] = {
                    f"{w:g}": pooled[k].get(w, {}).get("class_acc_se") for w in WS}
        tables[m] = rows
        print(f"\n{m} (mean over seed sets{'; pooled samples' if m == 'class_acc' else ''})")
        print(f"{'method':<58}" + "".join(f"{'w=' + format(w, 'g'):>10}" for w in WS))
        for lab, vals in rows.items():
            cols = "".join(f"{'-' if v is None else format(v, '.4f' if m == 'class_acc' else '.3f'):>10}"
                           for v in vals.values())
            print(f"{lab:<58}{cols}")
    return tables


# ------------------------------------------------------------------------------------ figures
def judge(records: list[dict], pooled: dict, students: list[int], ref_steps: int, *, num: int,
          ref_num: int) -> list[dict]:
    figs = []
    ref = ("reference", ref_steps)
    ref_name = f"teacher-{ref_steps}"

    def mean_ratio(num_key, den_key, w, metric="fd_feature", num_metric=None):
        v = [x / y for x, y in zip(per_seed(records, *num_key, w, num_metric or metric),
                                   per_seed(records, *den_key, w, metric))]
        return float(np.mean(v)), "seeds: " + ", ".join(f"{x:.2f}" for x in v)

    print(f"\n(a) guided student at 4 steps against the guided {ref_name} (accuracy: seed sets pooled)")
    s4 = ("gd", 4)
    for w in WS:
        s, t = pooled[s4][w], pooled[ref][w]
        diff = s["class_acc"] - t["class_acc"]
        se = math.hypot(s["class_acc_se"], t["class_acc_se"])
        tol = max(0.02, 2 * se)
        figs.append(figure(f"w={w:g}: accuracy student-4 - {ref_name}", diff, f"|d| <= {tol:.3f}", abs(diff) <= tol,
                           f"{s['class_acc']:.4f} vs {t['class_acc']:.4f} (n {s['n']} / {t['n']}; "
                           f"2 SE of the difference {2 * se:.3f})"))
    at_n = "fd_feature_at_ref_num" if ref_num < num else None
    if at_n:
        print(f"    NOTE: the reference has {ref_num} samples per seed set, the student {num}; FD grows as n falls, "
              f"so the student's FD in these ratios is taken on its first {ref_num} samples (same n)")
    for w in WS:
        v, detail = mean_ratio(s4, ref, w, num_metric=at_n)
        s_fd = float(np.mean(per_seed(records, *s4, w, at_n or "fd_feature")))
        figs.append(figure(f"w={w:g}: FD feature student-4 / {ref_name}", v, "<= 1.5", v <= 1.5,
                           f"{s_fd:.2f} vs {pooled[ref][w]['fd_feature']:.2f} (n {ref_num}); {detail}"))

    nfe = 8 if 8 in students else 4
    print(f"\n(b) equal NFE {nfe}: the {nfe}-step guided student against the teacher's {nfe // 2} guided steps "
          f"(2 evaluations each)")
    if nfe != 8:
        print("    NOTE: the run has no 8-step student (steps-0008), so this compares at NFE 4, not the issue's NFE 8")
    sn = ("gd", nfe)
    for w in (1.0, 2.0):
        for method, target in (("dpmpp2m", 2.0), ("ddim", 3.0)):
            v, detail = mean_ratio((method, nfe), sn, w)
            short = "DPM++(2M)" if method == "dpmpp2m" else "DDIM"
            figs.append(figure(f"NFE {nfe}, w={w:g}: FD feature teacher {short} / student", v, f">= {target:g}",
                               v >= target, f"{pooled[(method, nfe)][w]['fd_feature']:.2f} vs "
                               f"{pooled[sn][w]['fd_feature']:.2f}; {detail}"))

    print("\n(c) guidance is real: accuracy rises with w (the digits classifier saturates near 100%)")
    for key, name in ((ref, ref_name), (s4, "student-4")):
        acc = [pooled[key][w]["class_acc"] for w in WS]
        accs = ", ".join(f"w={w:g} {a:.4f}" for w, a in zip(WS, acc))
        gain = acc[WS.index(1.0)] - acc[WS.index(0.0)]
        figs.append(figure(f"{name}: accuracy(w=1) - accuracy(w=0)", gain, ">= 0.010", gain >= 0.01 - 1e-12, accs))
        drop = min(b - a for a, b in zip(acc, acc[1:]))
        figs.append(figure(f"{name}: smallest step in accuracy between consecutive w", drop, ">= -0.010",
                           drop >= -0.01 - 1e-12))
    ps = per_seed(records, "gd", 4, 0.0, "psnr_teacher")
    figs.append(figure(f"w=0: teacher-match PSNR student-4 vs conditional {ref_name}, dB", float(np.mean(ps)), ">= 30",
                       float(np.mean(ps)) >= 30, "seeds: " + ", ".join(f"{x:.1f}" for x in ps)))

    print("\n(d) stochastic against deterministic (DDIM) student sampling (the paper: stochastic better at 4+ steps)")
    for n in (4, 8):
        if n not in students:
            print(f"    no {n}-step student in this run")
            continue
        better_fd = better_acc = 0
        for w in WS:
            d, s = pooled[("gd", n)][w], pooled[("gd_stochastic", n)][w]
            better_fd += s["fd_feature"] < d["fd_feature"]
            better_acc += s["class_acc"] > d["class_acc"]
            figs.append(figure(f"N={n}, w={w:g}: FD feature stochastic / DDIM", s["fd_feature"] / d["fd_feature"],
                               "report", None, f"FD {s['fd_feature']:.2f} vs {d['fd_feature']:.2f}; accuracy "
                               f"{s['class_acc']:.4f} vs {d['class_acc']:.4f}"))
        verdict = ("holds" if better_fd == len(WS) else "does not hold" if better_fd == 0 else "holds partly")
        line = (f"N={n}: stochastic has the lower FD at {better_fd}/{len(WS)} w and the higher accuracy at "
                f"{better_acc}/{len(WS)}: the paper's finding {verdict} here")
        print("    " + line)
        figs.append({"name": f"N={n}: stochastic better (FD)", "value": better_fd, "target": "report", "pass": None,
                     "detail": line})
    return figs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/guided-bench", help="output folder (and the demo run when made here)")
    p.add_argument("--seeds", default="0,1", help="comma list of seed sets (default 0,1)")
    p.add_argument("--num", type=int, default=None, help="samples per (method, N, w) and seed set (default 500; "
                                                          "quick 50)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny demo budgets (from 16 steps), 50 samples, "
                                                         "a 16-step reference")
    p.add_argument("--teacher", default=None, help="distil this class-conditional teacher (label dropout) into OUT")
    p.add_argument("--distill", default=None, help="an existing guided distillation run (or demo folder) to measure")
    p.add_argument("--ref-steps", type=int, default=None, help="reference guided DDIM steps (default 256; quick 16)")
    p.add_argument("--ref-num", type=int, default=None, help="reference samples per (w, seed) (default: --num, cut "
                                                              "only when the budget demands)")
    p.add_argument("--budget-min", type=float, default=30.0, help="minutes for the whole run (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on busy shared cores)")
    a = p.parse_args(argv)
    if a.teacher and a.distill:
        p.error("give --teacher or --distill, not both")
    a.num = a.num or (50 if a.quick else 500)
    a.ref_steps = a.ref_steps or (16 if a.quick else 256)
    if a.threads:
        torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    t_start = time.time()
    out = Path(a.out)

    distill_dir, how = obtain_run(a, QUICK_BUDGET if a.quick else FULL)
    t_setup = time.time() - t_start
    run = resolve_run(distill_dir)
    students = sorted(run.students)
    print(f"[bench] guided distillation {distill_dir} ({how}, {t_setup:.0f} s): students at {students} steps")
    if 4 not in students:
        sys.exit(f"error: {distill_dir} has no 4-step guided student (steps-0004)")
    teacher = load(run.teacher)
    steps = list(STEPS)       # teacher rows at N = 1 exist at w = 0 only (half a guided step otherwise)
    ref_num, plan = plan_reference(a, run, teacher, seeds=seeds, steps=steps, t_start=t_start)

    records, t_eval = [], {}
    for s in seeds:
        t0 = time.time()
        records += evaluate_guided(distill_dir, ws=WS, steps=steps, num=a.num, seed=s, ref_steps=a.ref_steps,
                                   ref_num=ref_num)
        t_eval[s] = time.time() - t0
        print(f"[bench] seed set {s}: {t_eval[s]:.0f} s")

    pooled = pool(records)
    t_cards = read_json(run.teacher / CARD)
    d_card = read_json(run.root / CARD)
    print(f"\nrun {run.root}: teacher {t_cards.get('iteration', 0)} iterations, stage 1 "
          f"{(d_card.get('guided') or {}).get('iters')} iterations, N0 = {run.start_steps}; seeds {seeds} x {a.num} "
          f"samples per cell (reference: {ref_num}, {plan['ref_num_note']}); FD against the 500 held-out digits")
    tables = print_tables(pooled, a.ref_steps)
    print()
    figs = judge(records, pooled, students, a.ref_steps, num=a.num, ref_num=ref_num)
    seconds = time.time() - t_start
    misses = [f["name"] for f in figs if f["pass"] is False]
    print(f"\n{sum(f['pass'] is True for f in figs)} PASS, {len(misses)} MISS"
          + (": " + "; ".join(misses) if misses else ""))
    print(f"done in {seconds:.0f} s (run {t_setup:.0f} s, evaluation {sum(t_eval.values()):.0f} s; "
          f"{torch.get_num_threads()} threads)")
    dest = out / "guided_bench.json"
    write_json(dest, {"run": str(run.root), "how": how, "quick": a.quick, "seeds": seeds, "num": a.num,
                      "ref_steps": a.ref_steps, "ref_num": ref_num, "students": students, "ws": list(WS),
                      "equal_nfe": 8 if 8 in students else 4, "seconds": seconds, "seconds_run": t_setup,
                      "seconds_eval": {str(s): v for s, v in t_eval.items()}, "threads": torch.get_num_threads(),
                      "plan": plan, "figures": figs, "tables": tables, "records": records})
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
