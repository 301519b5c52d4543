"""Issue 7 item 5 / issue 16: progressive distillation of a teacher trained elsewhere (diffusers' own recipe),
in parts that each fit 30 minutes on this 2-core machine with `--threads 2`, plus a lever study.

    P=".venv/bin/python benchmarks/diffusers_teacher.py --out runs/diffusers-bench --threads 2"
    $P --part teacher      # train (279 s) + score the teacher's baselines (~800 s, DDPM-1000 ~770 of it): ~18 min
    $P --part distill      # distil with --budget 1 (<= the teacher's 192,000 examples; ~340-700 s), export the
                           # 1/2/4/8-step students, score them (~60 s; baselines come from scores.json): ~8-13 min
    $P --part levers --levers budget-0.25,budget-0.5,budget-1,grid    # 1.75 budgets (~20 min) + grid (~4 min)
    $P --part levers --levers n0-64,n0-128                            # 2 budgets: ~23 min
    $P --part levers --levers switch-1,switch-3                       # 2 budgets: ~23 min
    $P                     # --part all: everything above in one process (~100 min)
    .venv/bin/python benchmarks/diffusers_teacher.py --out /tmp/dq --quick --threads 1 --part all   # smoke (~5 min)

Expected split, from the single-run README figure (teacher 279 s, distillation 342 s for 1,560 iterations,
i.e. ~0.22 s per iteration at batch 64, evaluation 827 s of which DDPM-1000 ~770 s for 2 x 1,000
samples): a budget-1 distillation spends the teacher's 192,000 examples = 3,000 iterations, ~11 min.
Every part reuses OUT/teacher-pipeline (trained once; retrained only when OUT/teacher_train.json does not
match --train-steps/--batch-size/--lr/--warmup) and OUT/scores.json, a cache of every score keyed by
(sampler, steps, seed set, num), so later parts and reruns never re-sample a baseline.

1. `--part teacher` trains a digits teacher as diffusers' `examples/unconditional_image_generation/
   train_unconditional.py` does (progdistill only supplies the 1,297 training digits in [-1, 1]): the
   UNet2DModel of UNET_CONFIG below (1,112,801 parameters), DDPMScheduler(1000, "linear", "epsilon"),
   `add_noise`, MSE on the noise, AdamW (betas (0.95, 0.999), weight decay 1e-6, eps 1e-8), gradient-norm
   clip 1, cosine schedule with warmup (`get_scheduler`), EMAModel (inv_gamma 1, power 3/4, max decay
   0.9999, EMA warmup). Batches are epochs of a seeded permutation (partial last batch dropped); t and the
   noise come from the same torch.Generator. lr: 2e-3 rather than the example's 1e-4 (see LR_NOTE). The
   EMA UNet and the scheduler are saved as a DDPMPipeline in OUT/teacher-pipeline/. It then scores the
   teacher's diffusers baselines: DDPMScheduler at 1000 steps; DDIMScheduler (trailing, set_alpha_to_one,
   steps_offset 0; eta 0, use_clipped_model_output) and DPMSolverMultistepScheduler (dpmsolver++, order 2,
   trailing, final_sigmas_type "zero") at 1, 2, 4, 8 and 50 steps.
2. `--part distill` runs `progdistill --threads K distill --teacher diffusers:OUT/teacher-pipeline --data
   digits --out OUT/distill --final-steps 1 --budget 1 --teacher-examples E0` (E0 = the teacher's recorded
   examples; progdistill's defaults otherwise: N0 = 512 for T = 1000), exports the 1, 2, 4 and 8-step
   students (`progdistill export`), scores them through `DiffusionPipeline.from_pretrained` (DDIMPipeline,
   eta 0, use_clipped_model_output=True) and the 4-step one also through progdistill (cross-check), and
   prints the targets: student-4 feature FD <= 1.5 x DDPM-1000; distillation examples <= the teacher's;
   the student below the teacher's DDIM and DPM-Solver++(2M) at equal NFE (1, 2, 4, 8) on each seed set.
3. `--part levers` runs the variants of LEVERS (`--levers NAME,NAME` picks some): each a `progdistill
   distill ... --final-steps 4 --teacher-examples E0 ARGS` into OUT/levers/NAME (kept and reused while its
   command is unchanged), scored at 4 steps with progdistill's sampler (`load(RUN/steps-0004).sample(noise=z)`)
   and reported as feature FD and FD / the teacher's DDPM-1000 (from scores.json; run --part teacher first);
   `grid` samples the teacher with progdistill's DDIM on the 512- and 500-step (and 256- and 250-step)
   whole-timestep grids from the same 400 noises and reports the PSNR between them. Results merge into
   OUT/levers.json; OUT/levers.png plots student-4 FD / DDPM-1000 against the budget fraction, one line per N0.
Seed rule (all samplers): batch b (of `--batch` samples) of seed set s uses torch.Generator().manual_seed(
1000 * s + b), so deterministic samplers start from identical noise. Scores: progdistill's Scorer (FD
against the 500 held-out digits, digits-classifier features and pixels), mean ± half-range over seed sets.
`--quick`: 60 teacher steps, N0 = 16 for the distill part, 64 samples per sampler, DDPM-1000 on 16 and the
grid study on 32 noises (labelled so); its figures only show that every stage runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
EXAMPLE = dict(adam_betas=(0.95, 0.999), weight_decay=1e-6, adam_eps=1e-8, ema_inv_gamma=1.0, ema_power=0.75,
               ema_max_decay=0.9999, grad_clip=1.0, lr_scheduler="cosine")
LR_NOTE = ("lr 2e-3, not the example's 1e-4: 3,000 steps are far fewer than the example's budgets; 800-step trials "
           "(warmup 100, seed 0) gave DDIM-50 feature FD / pixel FD on 1,000 samples of 108.3 / 9.06 at 1e-4, "
           "54.6 / 1.96 at 3e-4, 34.3 / 0.95 at 1e-3 and 28.2 / 0.78 at 2e-3")
TEACHER_KEYS = ("steps", "batch_size", "lr", "warmup", "seed")     # teacher_train.json fields that must match
BASELINE_STEPS = (1, 2, 4, 8, 50)                                   # teacher DDIM / DPM-Solver++(2M)
STUDENT_STEPS = (1, 2, 4, 8)
DDIM, DPM, DDPM, STUDENT, STUDENT_PD = ("DDIM teacher", "DPM++(2M) teacher", "DDPM teacher",
                                       "student (diffusers)", "student (progdistill)")
GRID = "grid"                                                        # the LEVERS row that is not a distillation
# The lever study: (name, extra `progdistill distill` args after `--final-steps 4 --teacher-examples E0`).
# Default N0 for T = 1000 is 512, so budget-1 is also the N0 = 512 point, and the default --switch-factor is 1,
# so switch-1 repeats budget-1 (kept explicit in case the default changes); add rows here to study more.
LEVERS = [
    ("budget-0.25", ["--budget", "0.25"]),
    ("budget-0.5", ["--budget", "0.5"]),
    ("budget-1", ["--budget", "1"]),
    ("n0-64", ["--budget", "1", "--start-steps", "64"]),
    ("n0-128", ["--budget", "1", "--start-steps", "128"]),
    ("switch-1", ["--budget", "1", "--switch-factor", "1"]),
    ("switch-3", ["--budget", "1", "--switch-factor", "3"]),
    ("budget-1-seed1", ["--budget", "1", "--seed", "1"]),   # run-to-run spread of the same recipe
    ("budget-0.5-seed1", ["--budget", "0.5", "--seed", "1"]),
    ("late-3", ["--budget", "1", "--last-rounds-factor", "3"]),
    ("late-6", ["--budget", "1", "--last-rounds-factor", "6"]),
    ("clip", ["--budget", "1", "--target-clip"]),
    ("n0-64-clip", ["--budget", "1", "--start-steps", "64", "--target-clip"]),
    ("n0-64-clip-switch-3", ["--budget", "1", "--start-steps", "64", "--target-clip", "--switch-factor", "3"]),
    ("v-teacher", []),                      # eps teacher fine-tuned into v first (V_STEPS), no switch
    ("v-teacher-n0-64", ["--start-steps", "64"]),
    (GRID, []),
]


@dataclass
class Bench:
    """What every part shares: the output folder, sampling settings, the score cache and the problem log."""
    out: Path
    threads: int
    seeds: list[int]
    num: int
    num_ddpm: int
    num_grid: int
    batch: int
    quick: bool
    log: list[str] = field(default_factory=list)
    _scorer: object = None

    @property
    def teacher_dir(self) -> Path:
        return (self.out / "teacher-pipeline").resolve()

    @property
    def scorer(self):
        if self._scorer is None:
            from progdistill.eval.evaluate import cache_dir
            from progdistill.eval.scoring import Scorer
            self._scorer = Scorer("digits", "digits", ["fd_pixel", "fd_feature"], (1, 8, 8), num=self.num, seed=0,
                                  cache=cache_dir())
        return self._scorer

    def problem(self, text: str) -> None:
        self.log.append(text)
        print(f"problem: {text}", flush=True)


class ScoreCache:
    """OUT/scores.json: {"teacher": the teacher's training record, "scores": {"sampler|steps|seed|num": metrics}};
    emptied when the teacher changes. Each sampler's first 64 samples of its first seed set go to OUT/samples/."""

    def __init__(self, out: Path, teacher: dict):
        self.path, self.samples, self.teacher = out / "scores.json", out / "samples", {k: teacher[k] for k in TEACHER_KEYS}
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.scores = data.get("scores", {}) if data.get("teacher") == self.teacher else {}

    @staticmethod
    def key(sampler: str, steps: int, seed: int, num: int) -> str:
        return f"{sampler}|{steps}|{seed}|{num}"

    def get(self, sampler, steps, seed, num):
        return self.scores.get(self.key(sampler, steps, seed, num))

    def put(self, sampler, steps, seed, num, metrics: dict) -> None:
        self.scores[self.key(sampler, steps, seed, num)] = metrics
        self.path.write_text(json.dumps({"teacher": self.teacher, "scores": self.scores}, indent=1))

    def drop(self, sampler: str) -> None:
        """Forget a sampler whose model was re-made (a student after a new distillation)."""
        self.scores = {k: v for k, v in self.scores.items() if not k.startswith(sampler + "|")}
        for f in self.samples.glob(f"{safe(sampler)}-*.pt"):
            f.unlink()
        self.path.write_text(json.dumps({"teacher": self.teacher, "scores": self.scores}, indent=1))

    def first(self, sampler: str, steps: int) -> torch.Tensor | None:
        f = self.samples / f"{safe(sampler)}-{steps}.pt"
        return torch.load(f) if f.is_file() else None


def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)


def cli(args: list[str], log: list[str], threads: int) -> tuple[bool, float]:
    """Run `progdistill --threads K ARGS` (the installed CLI, as a user would); returns (ok, seconds)."""
    cmd = [sys.executable, "-m", "progdistill.cli", "--threads", str(threads), *args]
    print(f"$ progdistill --threads {threads} " + " ".join(args), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        log.append(f"`progdistill {' '.join(args)}` exited {rc}")
        print(f"problem: {log[-1]}", flush=True)
    return rc == 0, time.time() - t0


def ensure_teacher(b: Bench, a: argparse.Namespace, *, train: bool) -> dict | None:
    """The teacher's training record; trains it when `train` and OUT holds none matching the settings."""
    record = b.out / "teacher_train.json"
    want = dict(steps=a.train_steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, seed=0)
    if (b.teacher_dir / "model_index.json").is_file() and record.is_file():
        info = json.loads(record.read_text())
        if all(info.get(k) == v for k, v in want.items()):
            print(f"reusing the teacher in {b.teacher_dir} ({info['examples']:,} examples)")
            return info
        if not train:
            sys.exit(f"error: {record} does not match the settings {want}; run --part teacher first")
    if not train:
        sys.exit(f"error: {b.teacher_dir} holds no teacher; run --part teacher first")
    return train_teacher(b.teacher_dir, steps=a.train_steps, batch=a.batch_size, lr=a.lr, warmup=a.warmup, seed=0)


# ------------------------------------------------------------------------------------------------ 1. teacher
def train_teacher(dest: Path, *, steps: int, batch: int, lr: float, warmup: int, seed: int) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    from progdistill.data.datasets import load_data
    x = load_data("digits", split="train").x                       # (1297, 1, 8, 8) in [-1, 1]
    torch.manual_seed(seed)                                         # UNet initialisation
    unet = UNet2DModel(**UNET_CONFIG)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=EXAMPLE["adam_betas"],
                            weight_decay=EXAMPLE["weight_decay"], eps=EXAMPLE["adam_eps"])
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=warmup, num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=EXAMPLE["ema_max_decay"], use_ema_warmup=True,
                   inv_gamma=EXAMPLE["ema_inv_gamma"], power=EXAMPLE["ema_power"])
    g = torch.Generator().manual_seed(seed)
    order, pos, losses, t0 = torch.randperm(len(x), generator=g), 0, [], time.time()
    for _ in tqdm(range(steps), desc="teacher (diffusers recipe)", mininterval=5):
        if pos + batch > len(x):                                    # new epoch, partial batch dropped
            order, pos = torch.randperm(len(x), generator=g), 0
        clean, pos = x[order[pos:pos + batch]], pos + batch
        noise = torch.randn(clean.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(clean, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), EXAMPLE["grad_clip"])
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        ema.step(unet.parameters())
        losses.append(loss.item())
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=sched).save_pretrained(dest)
    info = {"steps": steps, "batch_size": batch, "examples": steps * batch, "lr": lr, "warmup": warmup,
            "seed": seed, "seconds": time.time() - t0, "final_ema_decay": ema.cur_decay_value,
            "loss_last_100": float(np.mean(losses[-100:])), "lr_note": LR_NOTE,
            "parameters": sum(p.numel() for p in unet.parameters())}
    (dest.parent / "teacher_train.json").write_text(json.dumps(info, indent=1))
    print(f"teacher: {steps} steps x batch {batch} in {info['seconds']:.0f} s, loss {info['loss_last_100']:.4f}")
    return info


# ------------------------------------------------------------------------------------------------ samplers
def to_scorer(images: np.ndarray) -> torch.Tensor:
    """diffusers' output_type="np" (N, H, W, C) in [0, 1] -> (N, C, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def diffusers_fn(pipe, n: int, ddim_call: bool):
    """fn(batch, generator) -> (N, 1, 8, 8) in [-1, 1] from a diffusers pipeline at n steps."""
    pipe.set_progress_bar_config(disable=n < 1000, mininterval=5)
    kw = dict(eta=0.0, use_clipped_model_output=True) if ddim_call else {}
    return lambda b, g: to_scorer(pipe(batch_size=b, generator=g, num_inference_steps=n, output_type="np", **kw).images)


def teacher_fn(teacher: Path, kind: str, n: int):
    """The teacher through diffusers: kind "ddpm" (its own DDPMPipeline), "ddim" or "dpm" (2M, dpmsolver++)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler
    base = DDPMPipeline.from_pretrained(teacher)
    cfg = base.scheduler.config
    if kind == "ddpm":
        return diffusers_fn(base, n, False)
    if kind == "ddim":
        return diffusers_fn(DDIMPipeline(base.unet, DDIMScheduler.from_config(
            cfg, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0)), n, True)
    s = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                timestep_spacing="trailing", final_sigmas_type="zero")
    assert s.init_noise_sigma == 1.0   # DDPMPipeline's loop skips scale_model_input (identity for this one)
    return diffusers_fn(DDPMPipeline(base.unet, s), n, False)   # its loop: set_timesteps, unet, step(..., generator)


def exported_fn(folder: Path, n: int):
    from diffusers import DiffusionPipeline
    return diffusers_fn(DiffusionPipeline.from_pretrained(folder), n, True)


def progdistill_fn(model_path: Path | str, n: int):
    """progdistill's own DDIM sampler on the diffusers noise rule (`randn_tensor` from the same generator)."""
    from diffusers.utils.torch_utils import randn_tensor

    from progdistill import load
    model = load(model_path)
    return lambda b, g: model.sample(steps=n, noise=randn_tensor((b, 1, 8, 8), generator=g)).clamp(-1, 1)


def teacher_rows(b: Bench, steps=BASELINE_STEPS, ddpm: bool = True) -> list[tuple[str, int, object]]:
    """(sampler, NFE, make) rows of the teacher's diffusers baselines; make() -> fn(batch, generator)."""
    t = b.teacher_dir
    rows = [(DDIM, n, lambda n=n: teacher_fn(t, "ddim", n)) for n in steps]
    rows += [(DPM, n, lambda n=n: teacher_fn(t, "dpm", n)) for n in steps]
    return rows + ([(DDPM, 1000, lambda: teacher_fn(t, "ddpm", 1000))] if ddpm else [])


# ------------------------------------------------------------------------------------------------- scoring
def score(b: Bench, cache: ScoreCache, sampler: str, n: int, make, *, only_cached: bool = False) -> dict | None:
    """Per-seed-set metrics of one sampler (cached in scores.json), aggregated; None when it cannot run."""
    count, fn, rec = b.num_ddpm if n == 1000 else b.num, None, {"name": sampler, "steps": n, "per_seed": {}}
    rec.update(num=count, seconds=0.0, sampled=0)
    for s in b.seeds:
        hit = cache.get(sampler, n, s, count)
        if hit is None and only_cached:
            return None
        if hit is None:
            if fn is None:
                try:
                    fn = make()
                except Exception as e:                          # a piece not there: report, go on
                    b.problem(f"{sampler}-{n}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    return None
            t0, xs = time.time(), []
            for i in range(math.ceil(count / b.batch)):
                xs.append(fn(min(b.batch, count - i * b.batch), torch.Generator().manual_seed(1000 * s + i)))
            rec["seconds"] += time.time() - t0
            rec["sampled"] += count
            x = torch.cat(xs)
            hit = {k: float(v) for k, v in b.scorer(x).items()}
            cache.put(sampler, n, s, count, hit)
            if s == b.seeds[0]:
                cache.samples.mkdir(exist_ok=True)
                torch.save(x[:64].clone(), cache.samples / f"{safe(sampler)}-{n}.pt")
        rec["per_seed"][s] = hit
    for m in ("fd_feature", "fd_pixel"):
        v = [d[m] for d in rec["per_seed"].values()]
        rec[m], rec[m + "_spread"] = float(np.mean(v)), float(np.max(v) - np.min(v)) / 2
    speed = f"{rec['sampled'] / rec['seconds']:8.1f} samples/s" if rec["sampled"] else "  (cached)"
    print(f"  {sampler + '-' + str(n):<28} fd_feature {rec['fd_feature']:8.3f}  fd_pixel {rec['fd_pixel']:8.3f}  {speed}",
          flush=True)
    return rec


def evaluate(b: Bench, cache: ScoreCache, rows, *, only_cached=()) -> dict:
    """{sampler-N: record} for the rows that ran (rows whose sampler is in `only_cached` are read, never sampled)."""
    res = {}
    for sampler, n, make in rows:
        rec = score(b, cache, sampler, n, make, only_cached=sampler in only_cached)
        if rec is not None:
            res[f"{sampler}-{n}"] = rec
    return res


def print_table(res: dict, b: Bench) -> None:
    print(f"\n{'method':<28} {'NFE':>5} {'fd_feature':>16} {'fd_pixel':>16}  samples")
    for rec in res.values():
        print(f"{rec['name']:<28} {rec['steps']:>5} {rec['fd_feature']:>8.3f} ± {rec['fd_feature_spread']:<6.3f}"
              f"{rec['fd_pixel']:>9.3f} ± {rec['fd_pixel_spread']:<6.3f}  {len(rec['per_seed'])} x {rec['num']}")
    if b.num_ddpm != b.num:
        print(f"(quick mode: DDPM-1000 on {b.num_ddpm} samples per seed set, the rest on {b.num}: FDs not comparable)")


def floor_line(b: Bench) -> None:
    from progdistill.data.datasets import load_data
    floor = b.scorer(load_data("digits", split="train").x)
    print(f"{'floor: 1,297 train digits':<28} {'-':>5} {floor['fd_feature']:>8.3f} {'':8}{floor['fd_pixel']:>9.3f}")


# ------------------------------------------------------------------------------------------------- 1. teacher
def part_teacher(b: Bench, a: argparse.Namespace) -> dict:
    teacher = ensure_teacher(b, a, train=True)
    cache = ScoreCache(b.out, teacher)
    print("teacher baselines (diffusers):")
    res = evaluate(b, cache, teacher_rows(b))
    print_teacher(teacher)
    print_table(res, b)
    floor_line(b)
    return {"teacher": teacher, "results": res}


def print_teacher(teacher: dict) -> None:
    print(f"\nteacher: diffusers UNet2DModel {json.dumps(UNET_CONFIG)} ({teacher['parameters']:,} parameters), "
          f"DDPMScheduler {json.dumps(SCHEDULER_CONFIG)}; {teacher['steps']} steps x batch {teacher['batch_size']} "
          f"= {teacher['examples']:,} examples, lr {teacher['lr']:g}, {teacher['seconds']:.0f} s")


# ------------------------------------------------------------------------------------------------ 2. distill
def distill_run(b: Bench, run: Path, args: list[str], teacher_dir: Path | None = None) -> dict:
    """`progdistill distill --teacher diffusers:T --data digits --out RUN ARGS`; its rounds and examples."""
    shutil.rmtree(run, ignore_errors=True)                          # this script's own products only
    full = ["distill", "--teacher", f"diffusers:{teacher_dir or b.teacher_dir}", "--data", "digits", "--out", str(run),
            *args]
    ok, seconds = cli(full, b.log, b.threads)
    info = {"command": f"progdistill --threads {b.threads} " + " ".join(full), "args": args, "ok": ok, "seconds": seconds}
    if not ok:
        return info
    card = json.loads((run / "progdistill.json").read_text())
    batch = json.loads((run / "config.json").read_text())["batch_size"]
    rounds = card["rounds"]
    info.update(start_steps=card["start_steps"], batch_size=batch, rounds=rounds,
                iters_all=sum(r["iters"] for r in rounds), examples_all=sum(r["iters"] for r in rounds) * batch)
    (run / "bench_run.json").write_text(json.dumps(info, indent=1, default=str))
    return info


def distill_args(a: argparse.Namespace, teacher: dict, final_steps: int) -> list[str]:
    args = ["--final-steps", str(final_steps)]
    if a.iters_per_round is not None:                   # the pre-budget recipe (fixed rounds), e.g. --iters-per-round 120
        args += ["--iters-per-round", str(a.iters_per_round), "--last-rounds-factor", "3"]
    else:
        args += ["--budget", f"{a.budget:g}", "--teacher-examples", str(teacher["examples"])]
    return args + (["--start-steps", "16"] if a.quick else [])


def part_distill(b: Bench, a: argparse.Namespace) -> dict:
    teacher = ensure_teacher(b, a, train=False)
    cache = ScoreCache(b.out, teacher)
    dist = distill_run(b, b.out / "distill", distill_args(a, teacher, 1))
    exports = {}
    for n in STUDENT_STEPS:
        shutil.rmtree(b.out / f"export-{n}", ignore_errors=True)
        if dist["ok"] and not (b.out / "distill" / f"steps-{n:04d}").is_dir():
            print(f"no {n}-step student (N0 = {dist['start_steps']})")
        elif dist["ok"]:
            ok, sec = cli(["export", str(b.out / "distill" / f"steps-{n:04d}"), "--out", str(b.out / f"export-{n}")],
                          b.log, b.threads)
            exports[n] = {"ok": ok, "seconds": sec}
    dist["exports"] = exports
    for sampler in (STUDENT, STUDENT_PD):
        cache.drop(sampler)                                          # the students were re-made
    rows = [(STUDENT, n, lambda n=n: exported_fn(b.out / f"export-{n}", n)) for n in STUDENT_STEPS if exports.get(n, {}).get("ok")]
    rows += [(STUDENT_PD, 4, lambda: progdistill_fn(b.out / "distill" / "steps-0004", 4))] if dist["ok"] else []
    print("scores (baselines from scores.json where there; DDPM-1000 only from there):")
    res = evaluate(b, cache, teacher_rows(b, STUDENT_STEPS) + rows, only_cached=(DDPM,))
    print_teacher(teacher)
    if dist["ok"]:
        print(f"distillation: N0 = {dist['start_steps']} -> 1 in {len(dist['rounds'])} rounds, batch {dist['batch_size']}, "
              f"{dist['iters_all']} iterations ({dist['examples_all']:,} examples), {dist['seconds']:.0f} s")
    print_table(res, b)
    floor_line(b)
    targets = distill_targets(res, teacher, dist, b.seeds)
    x_pd, x_df = cache.first(STUDENT_PD, 4), cache.first(STUDENT, 4)
    if x_pd is not None and x_df is not None:
        dist["cross_check_max_abs_4"] = float((x_pd - x_df).abs().max())
        print(f"cross-check: progdistill vs diffusers student-4 on the same noise, max |diff| "
              f"{dist['cross_check_max_abs_4']:.2e}")
    save_panels(b, cache)
    return {"teacher": teacher, "distill": dist, "results": res, "targets": targets}


def distill_targets(res: dict, teacher: dict, dist: dict, seeds: list[int]) -> list[dict]:
    targets = []

    def target(name, value, goal, ok, detail):
        verdict = "n/a " if ok is None else ("PASS" if ok else "MISS")
        print(f"{verdict}  {name:<52} {'-' if value is None else f'{value:.3f}':>9}  target {goal:<7} {detail}")
        targets.append({"name": name, "value": value, "target": goal, "pass": ok, "detail": detail})

    print()
    s4, ddpm = res.get(f"{STUDENT}-4"), res.get(f"{DDPM}-1000")
    if s4 and ddpm:
        r = s4["fd_feature"] / ddpm["fd_feature"]
        target("student-4 / DDPM-1000 feature FD", r, "<= 1.5", r <= 1.5, f"{s4['fd_feature']:.3f} / {ddpm['fd_feature']:.3f}")
    else:
        target("student-4 / DDPM-1000 feature FD", None, "<= 1.5", None,
               "student-4 not run" if not s4 else "DDPM-1000 not in scores.json: run --part teacher")
    if dist.get("ok"):
        r = dist["examples_all"] / teacher["examples"]
        target("distillation / teacher training examples", r, "<= 1", r <= 1,
               f"{dist['examples_all']:,} / {teacher['examples']:,}")
    else:
        target("distillation / teacher training examples", None, "<= 1", None, "distillation failed")
    for n in STUDENT_STEPS:
        st, base = res.get(f"{STUDENT}-{n}"), [res.get(f"{k}-{n}") for k in (DDIM, DPM)]
        name = f"student-{n} / best of DDIM-{n}, DPM++-{n} (worst seed set)"
        if st is None or None in base:
            target(name, None, "< 1", None, "not run")
            continue
        r = max(st["per_seed"][s]["fd_feature"] / min(x["per_seed"][s]["fd_feature"] for x in base) for s in seeds)
        target(name, r, "< 1", r < 1, " ".join(f"seed {s}: {st['per_seed'][s]['fd_feature']:.2f} vs "
                                              f"{min(x['per_seed'][s]['fd_feature'] for x in base):.2f}" for s in seeds))
    return targets


def save_panels(b: Bench, cache: ScoreCache) -> None:
    from progdistill.data.images import side_by_side
    panels = [(lbl, cache.first(s, n)) for lbl, s, n in [("DDPM-1000", DDPM, 1000), ("DDIM-4", DDIM, 4),
              ("DPM++-4", DPM, 4), ("student-4", STUDENT, 4), ("student-1", STUDENT, 1)]]
    panels = [(lbl, x) for lbl, x in panels if x is not None]
    if panels:
        k = math.isqrt(min(len(x) for _, x in panels)) ** 2
        side_by_side([(lbl, x[:k]) for lbl, x in panels], nrow=math.isqrt(k)).save(b.out / "samples.png")
        print(f"wrote {b.out / 'samples.png'}")


# ------------------------------------------------------------------------------------------------- 3. levers
def run_lever(b: Bench, a, cache: ScoreCache, teacher: dict, name: str, extra: list[str], ddpm: dict | None,
              teacher_dir: Path | None = None) -> dict:
    """Distil (or reuse OUT/levers/NAME while its args are unchanged) to 4 steps; score with progdistill."""
    run = b.out / "levers" / name
    args = ["--final-steps", "4", "--teacher-examples", str(teacher["examples"]), *extra]
    prev = run / "bench_run.json"
    info = json.loads(prev.read_text()) if prev.is_file() else {}
    if info.get("ok") and info.get("args") == args and (run / "steps-0004").is_dir():
        print(f"lever {name}: reusing {run}")
    else:
        cache.drop(f"lever {name}")
        info = distill_run(b, run, args, teacher_dir)
    rec = {"name": name, "args": extra, "distill": info}
    if not info.get("ok"):
        return rec
    res = score(b, cache, f"lever {name}", 4, lambda: progdistill_fn(run / "steps-0004", 4))
    if res is None:
        return rec
    rec.update(start_steps=info["start_steps"], examples=info["examples_all"], fraction=info["examples_all"] / teacher["examples"],
               fd_feature=res["fd_feature"], fd_feature_spread=res["fd_feature_spread"], fd_pixel=res["fd_pixel"],
               per_seed=res["per_seed"], num=res["num"])
    if ddpm is not None:
        rec["ratio"] = res["fd_feature"] / ddpm["fd_feature"]
        rec["ratio_per_seed"] = {s: res["per_seed"][s]["fd_feature"] / ddpm["per_seed"][s]["fd_feature"] for s in b.seeds}
    return rec


V_STEPS, V_LR = 500, 2e-4    # the v-teacher lever: fine-tune steps (x batch 64 = 32,000 examples) and lr


def v_finetune(b: Bench, teacher: dict) -> Path:
    """The eps teacher fine-tuned into a v-prediction model on its own data (the diffusers recipe with the
    target `scheduler.get_velocity`, constant lr V_LR, EMA as in training): separates the eps -> v switch
    from the rest. Saved as OUT/teacher-v-pipeline (reused)."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.training_utils import EMAModel

    from progdistill.data.datasets import load_data
    dest = b.out / "teacher-v-pipeline"
    if (dest / "model_index.json").is_file():
        return dest
    x = load_data("digits", split="train").x
    unet = DDPMPipeline.from_pretrained(b.teacher_dir).unet.train()
    sched = DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    opt = torch.optim.AdamW(unet.parameters(), lr=V_LR, betas=EXAMPLE["adam_betas"],
                            weight_decay=EXAMPLE["weight_decay"], eps=EXAMPLE["adam_eps"])
    ema = EMAModel(unet.parameters(), decay=EXAMPLE["ema_max_decay"], use_ema_warmup=True,
                   inv_gamma=EXAMPLE["ema_inv_gamma"], power=EXAMPLE["ema_power"])
    g, batch = torch.Generator().manual_seed(7), teacher["batch_size"]
    for _ in range(V_STEPS):
        clean = x[torch.randint(len(x), (batch,), generator=g)]
        noise = torch.randn(clean.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        target = sched.get_velocity(clean, noise, t)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(clean, noise, t), t).sample, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), EXAMPLE["grad_clip"])
        opt.step()
        opt.zero_grad()
        ema.step(unet.parameters())
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=sched).save_pretrained(dest)
    print(f"v-teacher: {V_STEPS} fine-tuning steps x batch {batch} into {dest}")
    return dest


def grid_study(b: Bench) -> dict:
    """The teacher's DDIM (progdistill's, whole timesteps k_i / T) on N = 512 vs 500 and 256 vs 250 steps from
    the same noises (seed set 0's rule, one batch); PSNR in [-1, 1] units (data range 2)."""
    from diffusers.utils.torch_utils import randn_tensor

    from progdistill import load
    from progdistill.eval.metrics import psnr
    model = load(f"diffusers:{b.teacher_dir}")
    z = randn_tensor((b.num_grid, 1, 8, 8), generator=torch.Generator().manual_seed(1000 * b.seeds[0]))
    t0, x = time.time(), {}
    for n in (512, 500, 256, 250):
        x[n] = model.sample(steps=n, noise=z).clamp(-1, 1)
    rec = {"name": GRID, "num": b.num_grid, "seconds": time.time() - t0,
           "psnr_512_500": float(psnr(x[512], x[500])), "psnr_256_250": float(psnr(x[256], x[250])),
           "psnr_512_256": float(psnr(x[512], x[256]))}
    print(f"grid: {b.num_grid} noises, PSNR 512 vs 500 steps {rec['psnr_512_500']:.1f} dB, 256 vs 250 "
          f"{rec['psnr_256_250']:.1f} dB (512 vs 256: {rec['psnr_512_256']:.1f} dB), {rec['seconds']:.0f} s")
    return rec


def part_levers(b: Bench, a: argparse.Namespace) -> dict:
    teacher = ensure_teacher(b, a, train=False)
    cache = ScoreCache(b.out, teacher)
    table = dict(LEVERS)
    names = [n.strip() for n in a.levers.split(",")] if a.levers else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"error: unknown lever(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    ddpm = score(b, cache, DDPM, 1000, None, only_cached=True)
    if ddpm is None:
        b.problem("DDPM-1000 not in scores.json (run --part teacher first): ratios left out")
    path = b.out / "levers.json"
    done = json.loads(path.read_text()).get("levers", {}) if path.is_file() else {}
    for name in names:
        if name == GRID:
            done[name] = grid_study(b)
        elif name.startswith("v-teacher"):   # fine-tuning spends V_STEPS x batch of the budget: distil on the rest
            rest = 1.0 - V_STEPS * teacher["batch_size"] / teacher["examples"]
            done[name] = run_lever(b, a, cache, teacher, name, ["--budget", f"{rest:.6f}", *table[name]], ddpm,
                                   v_finetune(b, teacher))
        else:
            done[name] = run_lever(b, a, cache, teacher, name, table[name], ddpm)
        path.write_text(json.dumps({"teacher": teacher, "ddpm_1000": ddpm, "levers": done}, indent=1, default=str))
    lever_table(done, ddpm)
    plot_levers(done, ddpm, b.out / "levers.png")
    return {"levers": {n: done[n] for n in names}}


def lever_table(done: dict, ddpm: dict | None) -> None:
    print(f"\n{'lever':<14} {'N0':>4} {'examples':>9} {'fraction':>8} {'fd_feature':>16} {'fd_pixel':>8} {'/ DDPM-1000':>12}  args")
    for name, r in done.items():
        if name == GRID:
            print(f"{name:<14} PSNR 512 vs 500 steps {r['psnr_512_500']:.1f} dB, 256 vs 250 {r['psnr_256_250']:.1f} dB "
                  f"({r['num']} noises)")
        elif "fd_feature" not in r:
            print(f"{name:<14} failed: {r['distill'].get('command', '')}")
        else:
            ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
            print(f"{name:<14} {r['start_steps']:>4} {r['examples']:>9,} {r['fraction']:>8.3f} {r['fd_feature']:>8.3f} ± "
                  f"{r['fd_feature_spread']:<6.3f}{r['fd_pixel']:>8.3f} {ratio:>12}  {' '.join(r['args'])}")
    scored = {n: r for n, r in done.items() if "fd_feature" in r}
    if scored:
        best = min(scored, key=lambda n: scored[n]["fd_feature"])
        ratio = f", {scored[best]['ratio']:.3f}x DDPM-1000" if "ratio" in scored[best] else ""
        print(f"best: {best} (feature FD {scored[best]['fd_feature']:.3f}{ratio}; target <= 1.5x)")
    if ddpm is not None:
        print(f"teacher DDPM-1000 feature FD {ddpm['fd_feature']:.3f} ({len(ddpm['per_seed'])} x {ddpm['num']})")


def plot_levers(done: dict, ddpm: dict | None, dest: Path) -> None:
    """Student-4 FD / DDPM-1000 (FD itself without DDPM-1000) against the budget fraction, one line per N0;
    variants that change something else (e.g. --switch-factor) are separate labelled markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "ratio" if ddpm is not None else "fd_feature"
    scored = [r for n, r in done.items() if key in r]
    if not scored:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    plain = [r for r in scored if set(r["args"][::2]) <= {"--budget", "--start-steps"}]
    for n0 in sorted({r["start_steps"] for r in plain}):
        pts = sorted((r["fraction"], r[key]) for r in plain if r["start_steps"] == n0)
        ax.plot(*zip(*pts), marker="o", label=f"N0 = {n0}")
    for r in (r for r in scored if r not in plain):
        ax.scatter([r["fraction"]], [r[key]], marker="x")
        ax.annotate(r["name"], (r["fraction"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if ddpm is not None:
        ax.axhline(1.5, color="grey", ls="--", lw=1, label="target 1.5")
    ax.set(xlabel="distillation examples / teacher's training examples",
           ylabel="student-4 feature FD / DDPM-1000" if ddpm is not None else "student-4 feature FD",
           title="progressive distillation levers (digits, diffusers teacher)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    print(f"wrote {dest}")


# ---------------------------------------------------------------------------------------------------- main
PARTS = {"teacher": part_teacher, "distill": part_distill, "levers": part_levers}


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=[*PARTS, "all"], default="all", help="which part to run (default all, in order)")
    p.add_argument("--out", default="runs/diffusers-bench")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64, help="teacher training batch")
    p.add_argument("--lr", type=float, default=2e-3, help="teacher lr (see the docstring)")
    p.add_argument("--warmup", type=int, default=500, help="teacher lr warmup steps (the example's default)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="--part distill: distillation examples as a fraction of the teacher's (default 1)")
    p.add_argument("--iters-per-round", type=int, default=None,
                   help="--part distill: fixed rounds (the pre-budget recipe, last two 3x) instead of --budget")
    p.add_argument("--levers", default=None, help=f"--part levers: a comma list of {', '.join(n for n, _ in LEVERS)} "
                                                  "(default all)")
    p.add_argument("--num", type=int, default=1000, help="samples per sampler and seed set")
    p.add_argument("--seeds", default="0,1", help="seed sets")
    p.add_argument("--batch", type=int, default=500, help="sampling batch (one generator each)")
    p.add_argument("--grid-num", type=int, default=400, help="--part levers, grid: noises")
    p.add_argument("--quick", action="store_true", help="tiny budgets for a smoke run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: safe on a busy machine; 2 on this idle 2-core machine)")
    a = p.parse_args(argv)
    if a.quick:
        a.train_steps, a.warmup, a.num, a.grid_num = min(a.train_steps, 60), 10, min(a.num, 64), min(a.grid_num, 32)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    import diffusers
    diffusers.utils.logging.set_verbosity_error()        # no accelerate advice; loading bars off, sampling bars kept
    diffusers.utils.logging.disable_progress_bar()
    b = Bench(out=Path(a.out), threads=a.threads, seeds=[int(s) for s in a.seeds.split(",")], num=a.num,
              num_ddpm=min(a.num, 16) if a.quick else a.num, num_grid=a.grid_num, batch=a.batch, quick=a.quick)
    b.out.mkdir(parents=True, exist_ok=True)
    t_start, summary = time.time(), {}
    for name in (PARTS if a.part == "all" else [a.part]):
        print(f"\n=============== part {name}", flush=True)
        t0 = time.time()
        summary[name] = PARTS[name](b, a)
        summary[name]["seconds"] = time.time() - t0
        print(f"part {name}: {summary[name]['seconds']:.0f} s ({a.threads} thread(s))", flush=True)
    settings = vars(a) | {"num_ddpm": b.num_ddpm, "threads": torch.get_num_threads(),
                          "seed_rule": "batch b of seed set s: Generator().manual_seed(1000*s + b)"}
    dest = b.out / f"diffusers_bench-{a.part}.json"
    dest.write_text(json.dumps({"settings": settings, "unet_config": UNET_CONFIG, "scheduler_config": SCHEDULER_CONFIG,
                                "recipe": EXAMPLE, "parts": summary, "seconds": time.time() - t_start,
                                "problems": b.log}, indent=1, default=str))
    print(f"\ndone in {time.time() - t_start:.0f} s; wrote {dest}")
    for line in b.log:
        print(f"problem: {line}")
    return 1 if b.log else 0


if __name__ == "__main__":
    sys.exit(main())
