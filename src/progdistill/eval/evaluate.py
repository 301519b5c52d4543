"""`progdistill eval`: sample quality against NFE for distilled students and the teacher's samplers.

Methods at equal NFE on the same teacher: `pd` (the run's `steps-N` student, N-step DDIM), `ddim`,
`ancestral` (log-variance fraction tuned per N against the TRAINING split, cached in the run folder)
and `dpmpp2m`. Metric values come from the pure functions of metrics.py:

- digits (against the 500 held-out digits): `fd_pixel`, `fd_feature` (features of a small classifier
  trained on the 1,297 training digits), `precision`/`recall` (k-NN, k = 3, in those features),
  `class_coverage`/`class_entropy` (of predicted classes); `fid` with the Inception detector;
- other images: `fd_pixel` (held-out split), `fid` (against the training split, as standard);
- 2-D toys: `sw` (sliced W2), `energy` against a fresh draw of the true distribution (n = num);
  `xent_true` = mean -log p_data(generated) for toy:gmm (a cross-entropy, NOT a likelihood); `nll` =
  the teacher's own model NLL of true points through the probability-flow ODE (exact divergence);
- everywhere: `psnr_teacher`, PSNR (range 2, in the model's normalised units for vectors) against the
  teacher's N0-step DDIM samples from the same seeds (cached in the run folder), and the cost: `nfe` per sample and `samples_per_s`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from progdistill.data.normalize import Normalizer
from progdistill.data.toy import toy_log_density
from progdistill.errors import UserError
from progdistill.eval import metrics as M
from progdistill.eval.likelihood import ode_nll
from progdistill.eval.scoring import Scorer
from progdistill.pipeline import Model, generate, load
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, is_diffusers_spec, parse_steps_folder, read_json
from progdistill.store.load import load_card

METHODS = ("pd", "ddim", "ancestral", "dpmpp2m")
SAMPLER = {"pd": "ddim", "ddim": "ddim", "ancestral": "ancestral", "dpmpp2m": "dpmpp2m"}
METRICS = {  # metric -> data families it applies to
    "fd_pixel": ("digits", "image"), "fd_feature": ("digits",), "precision": ("digits",), "recall": ("digits",),
    "class_coverage": ("digits",), "class_entropy": ("digits",), "fid": ("digits", "image"),
    "sw": ("toy", "vector"), "energy": ("toy", "vector"), "xent_true": ("toy",), "nll": ("toy", "vector"),
    "psnr_teacher": ("digits", "image", "toy", "vector")}
DEFAULT_METRICS = {"digits": ["fd_pixel", "fd_feature", "precision", "recall", "class_coverage", "class_entropy",
                              "psnr_teacher"],
                   "image": ["fd_pixel", "psnr_teacher"], "toy": ["sw", "energy", "psnr_teacher"],
                   "vector": ["sw", "energy", "psnr_teacher"]}
TUNE_METRIC = {"digits": "fd_feature", "image": "fd_pixel", "toy": "sw", "vector": "sw"}
ANCESTRAL_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
PSNR_CAP = 100.0   # dB; identical sample sets would give inf, which JSON cannot hold
TUNING_FILE = "ancestral-tuning.json"


def cache_dir(path=None) -> Path:
    """Shared cache (classifier, FID stats): `path`, $PROGDISTILL_CACHE or ~/.cache/progdistill."""
    return Path(path or os.environ.get("PROGDISTILL_CACHE") or Path.home() / ".cache" / "progdistill").expanduser()


# ----------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Run:
    root: Path                   # run folder: eval.json, ancestral tuning and the teacher-sample cache live here
    teacher: Path
    start_steps: int             # N0: steps of the teacher-match reference
    students: dict[int, Path]    # N -> steps-NNNN folder (empty for a teacher run)


def resolve_run(path) -> Run:
    """A distillation run, one of its steps-NNNN folders, a teacher run, or an imported `diffusers:` teacher
    (its caches go under the cache directory, never into the user's diffusers folder)."""
    if is_diffusers_spec(path):
        from progdistill.diffusion.schedules import default_start_steps
        from progdistill.store.load import resolved_teacher
        spec = resolved_teacher(str(path))
        key = hashlib.sha256(spec.encode()).hexdigest()[:16]
        return Run(cache_dir() / "imported" / key, Path(spec), default_start_steps(load_card(spec).schedule), {})
    path = Path(path)
    card = read_json(path / CARD, "model card")
    if card.get("kind") == "distillation":
        teacher = Path(card["teacher"])
        if not teacher.is_dir() and (path.parent / "teacher" / CARD).is_file():
            teacher = path.parent / "teacher"   # a moved demo folder
        students = {parse_steps_folder(p.name): p for p in sorted(path.glob("steps-*")) if (p / CARD).is_file()}
        return Run(path, teacher, int(card["start_steps"]), {n: p for n, p in students.items() if n})
    if card.get("kind") == "student" and card.get("steps") is None:
        raise UserError(f"{path} is a guidance-distilled model for any step count; evaluate its distillation run "
                        f"{path.parent} (eval-guided), or sample it with --steps and --guidance")
    if card.get("kind") == "student":
        if (path.parent / CARD).is_file() and read_json(path.parent / CARD).get("kind") == "distillation":
            return dataclasses.replace(resolve_run(path.parent), students={int(card["steps"]): path})
        raise UserError(f"{path} is a student outside its distillation run; pass the run folder")
    from progdistill.nets.presets import PRESETS
    preset = PRESETS.get((card.get("provenance") or {}).get("preset") or "")
    return Run(path, path, preset.distill_start_steps if preset else 256, {})


def data_family(spec: str, card) -> str:
    if spec == "digits":
        return "digits"
    if spec.startswith("toy:"):
        return "toy"
    return "image" if card.data.get("kind") == "image" else "vector"


def check_request(run: Run, family: str, methods, steps, metrics, spec: str) -> tuple[list, list, list]:
    """Validate methods / steps / metrics with one-line errors; fill defaults."""
    methods = list(methods or (METHODS if run.students else METHODS[1:]))
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    if "pd" in methods and not run.students:
        raise UserError(f"{run.root} is a teacher run: method pd needs a distillation run (baselines only here)")
    steps = sorted(set(steps or (sorted(run.students) if run.students else [1, 2, 4, 8])))
    if any(not isinstance(n, int) or n < 1 for n in steps):
        raise UserError(f"--steps must be positive integers, got {steps}")
    missing = [n for n in steps if n not in run.students]
    if "pd" in methods and missing:
        have = ", ".join(map(str, sorted(run.students))) or "none"
        raise UserError(f"no distilled model for steps {', '.join(map(str, missing))} in {run.root} (have: {have})")
    metrics = list(metrics or DEFAULT_METRICS[family] + (["xent_true"] if spec == "toy:gmm" else []))
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"unknown metric {m!r}: choose from {', '.join(METRICS)}")
    for m in metrics:
        if family not in METRICS[m]:
            raise UserError(f"metric {m} does not apply to {spec} data (it needs {'/'.join(METRICS[m])} data)")
    if "xent_true" in metrics and spec != "toy:gmm":
        raise UserError(f"xent_true needs a known density (toy:gmm), not {spec}")
    return methods, steps, metrics


# ------------------------------------------------------------------------------- sampling
def timed_generate(model: Model, *, steps: int, sampler: str, num: int, seed: int, logvar_frac: float = 0.0,
                   batch_size: int = 500, start: int = 0, guidance: float | None = None) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    x = generate(model.denoiser, model.card, steps=steps, num=num, seed=seed, sampler=sampler,
                 logvar_frac=logvar_frac, batch_size=batch_size, device=model.device, start=start, guidance=guidance)
    return x, time.perf_counter() - t0


def teacher_samples(run: Run, teacher: Model, *, num: int, seed: int, steps: int | None = None,
                    batch_size: int = 500, guidance: float | None = None, log=print) -> tuple[torch.Tensor, float]:
    """The teacher's N0-step DDIM samples 0..num-1 of `seed` (guided at w = `guidance` if given), cached in
    RUN/eval-cache (extended as needed).

    Returns (samples, seconds it took to generate that many).
    """
    if num < 1:   # 0 would return no samples (and divide by them)
        raise UserError(f"--num must be a positive integer for the teacher reference, got {num!r}")
    steps = steps or run.start_steps
    wtag = "" if guidance is None else f"-w{guidance:g}"
    grid = teacher.card.schedule.grid
    gtag = "" if grid == "uniform" else f"-{grid}"      # the time grid is part of the key (docs/method.md §10)
    path = run.root / "eval-cache" / f"teacher-ddim{steps:04d}-seed{seed}{wtag}{gtag}.npz"
    x, seconds = None, 0.0
    if path.is_file():
        try:
            with np.load(path) as z:
                if int(z["iteration"]) == teacher.card.iteration:
                    x, seconds = torch.from_numpy(z["x"].astype(np.float32)), float(z["seconds"])
        except Exception:  # unreadable cache: regenerate it
            x = None
    have = 0 if x is None else len(x)
    if have < num:
        log(f"teacher reference: {num - have} samples of {steps}-step DDIM"
            f"{'' if guidance is None else f' at w = {guidance:g}'} (cached in {path.parent})")
        more, sec = timed_generate(teacher, steps=steps, sampler="ddim", num=num - have, seed=seed,
                                   batch_size=batch_size, start=have, guidance=guidance)
        x, seconds = (more, sec) if x is None else (torch.cat([x, more]), seconds + sec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        dtype = np.float16 if x.dim() == 4 else np.float32
        np.savez(tmp, x=x.numpy().astype(dtype), iteration=teacher.card.iteration, seconds=seconds)
        os.replace(tmp, path)
    return x[:num], seconds * num / len(x)


def tune_ancestral(run: Run, teacher: Model, steps: int, *, spec: str, family: str, grid=ANCESTRAL_GRID,
                   num: int = 500, seed: int = 0, cache=None, batch_size: int = 500, log=print,
                   guidance: float | None = None, _scorer: dict | None = None) -> float:
    """Best log-variance fraction for N-step ancestral sampling, scored against the TRAINING split.

    Results are cached in RUN/ancestral-tuning.json per N (reused while grid, metric and num match).
    """
    path, metric, grid = run.root / TUNING_FILE, TUNE_METRIC[family], [float(g) for g in grid]
    table = read_json(path, "ancestral tuning") if path.is_file() else {}
    entry = table.get(str(steps))
    want = {"grid": grid, "metric": metric, "num": num, "seed": seed, "data": spec, "split": "train",
            "teacher_iteration": teacher.card.iteration, "guidance": guidance}
    if teacher.card.schedule.grid != "uniform":          # the time grid is part of the key (docs/method.md §10)
        want["time_grid"] = teacher.card.schedule.grid
    if entry and all(entry.get(k) == v for k, v in want.items()):
        return float(entry["logvar_frac"])
    cache_key = (spec, num, seed)
    scorer = (_scorer or {}).get(cache_key) or Scorer(spec, family, [metric], teacher.card.data["shape"],
                                                       split="train", num=num, seed=seed, cache=cache_dir(cache),
                                                       device=teacher.device)
    if _scorer is not None:
        _scorer[cache_key] = scorer
    scores = []
    for frac in grid:   # tuning noise: another seed than the evaluation's
        x, _ = timed_generate(teacher, steps=steps, sampler="ancestral", num=num, seed=seed + 1, logvar_frac=frac,
                              batch_size=batch_size, guidance=guidance)
        scores.append(scorer(x)[metric])
    best = grid[int(np.nanargmin(scores))]
    table[str(steps)] = {**want, "scores": scores, "logvar_frac": best}
    write_json(path, table)
    log(f"ancestral {steps} steps: logvar_frac {best} ({metric} on train: "
        + ", ".join(f"{g:g}->{s:.3g}" for g, s in zip(grid, scores)) + ")")
    return best


# ------------------------------------------------------------------------------- evaluate
def evaluate(model_path, *, data: str | None = None, steps=None, methods=None, metrics=None, num: int = 1000,
             seed: int = 0, reference: bool = False, ref_num: int | None = None,
             ancestral_grid=ANCESTRAL_GRID, tune_num: int | None = None,
             inception=None, allow_download: bool = True, cache=None, batch_size: int = 500, device=None,
             guidance: float | None = None, progress: bool = True, log=tqdm.write) -> list[dict]:
    """One record per (method, steps): {"method", "steps", "nfe", "num", "seed", "data", <metrics>,
    "samples_per_s"[, "logvar_frac"]}; `reference=True` adds the teacher's N0-step DDIM ("ddim", N0).

    `ref_num` < num computes psnr_teacher on the first ref_num seeds only (the N0-step reference costs N0
    NFE per sample; a per-sample mean needs no equal n), and then no ("ddim", N0) row is added, because
    its FD would rest on fewer samples than the others ("psnr_num" says how many were used).

    `guidance` = w samples every method with classifier-free guidance (the teacher's samplers and its
    reference guided, 2 evaluations per step at w > 0; guidance-distilled students take w, 1 per step);
    "nfe" counts network evaluations per sample."""
    if num < 2:
        raise UserError(f"--num must be at least 2 (covariances), got {num}")
    run = resolve_run(model_path)
    teacher = load(run.teacher, device=device)
    spec = data or teacher.card.data["spec"]
    if spec is None and (run.root / "config.json").is_file():   # an imported teacher's distillation run: its --data
        spec = read_json(run.root / "config.json").get("data")
    if spec is None:
        raise UserError(f"--data is required to evaluate an imported teacher ({run.teacher}): the data it was trained on")
    family = data_family(spec, teacher.card)
    methods, steps, metrics = check_request(run, family, methods, steps, metrics, spec)
    scorer = Scorer(spec, family, metrics, teacher.card.data["shape"], num=num, seed=seed, cache=cache_dir(cache),
                    inception=inception, allow_download=allow_download, log=log, device=teacher.device)
    jobs = [(m, n) for n in steps for m in methods]
    ref_job = ("ddim", run.start_steps)
    ref_num = num if ref_num is None or ref_job in jobs else max(2, min(ref_num, num))
    if reference and ref_job not in jobs:
        if ref_num == num:
            jobs.append(ref_job)
        else:
            log(f"teacher {run.start_steps}-step row skipped: psnr_teacher uses {ref_num} < {num} reference samples")
    normalizer = Normalizer.from_dict(teacher.card.normalizer)
    units = normalizer.encode if normalizer is not None else (lambda v: v)   # range-based metrics: model units
    ref_x = ref_sec = None
    if "psnr_teacher" in metrics or ref_job in jobs:
        ref_x, ref_sec = teacher_samples(run, teacher, num=ref_num, seed=seed, batch_size=batch_size,
                                         guidance=guidance, log=log)
    timed_generate(teacher, steps=1, sampler="ddim", num=min(num, batch_size), seed=seed, batch_size=batch_size,
                   guidance=guidance)
    records, scorers = [], {}   # (a warm-up call first, so that samples_per_s is the steady rate)
    for method, n in tqdm(jobs, desc="eval", disable=not progress):
        per_step = 1 if method == "pd" or not guidance else 2    # a guided teacher evaluates twice per step
        rec = {"method": method, "steps": n, "nfe": n * per_step, "num": num, "seed": seed, "data": spec}
        if guidance is not None:
            rec["guidance"] = guidance
        frac = 0.0
        if method == "ancestral" and n > 1:   # one step adds no noise: the fraction is moot
            frac = tune_ancestral(run, teacher, n, spec=spec, family=family, grid=ancestral_grid,
                                  num=tune_num or min(num, 500), seed=seed, cache=cache, batch_size=batch_size,
                                  log=log, guidance=guidance, _scorer=scorers)
        if method == "ddim" and n == run.start_steps and ref_x is not None:
            x, sec = ref_x, ref_sec
        else:
            model = load(run.students[n], device=device) if method == "pd" else teacher
            x, sec = timed_generate(model, steps=n, sampler=SAMPLER[method], num=num, seed=seed, logvar_frac=frac,
                                    batch_size=batch_size, guidance=guidance)
        if not torch.isfinite(x).all():
            raise UserError(f"{method} with {n} steps produced NaN/inf samples; the model diverged")
        rec.update(scorer(x))
        if "psnr_teacher" in metrics:
            rec["psnr_teacher"] = min(M.psnr(units(x[:ref_num]), units(ref_x), data_range=2.0), PSNR_CAP)
            rec["psnr_num"] = ref_num
        rec["samples_per_s"] = num / sec if sec > 0 else None
        if method == "ancestral":
            rec["logvar_frac"] = frac
        records.append(rec)
    if "nll" in metrics:
        nll, nfe = ode_nll(teacher.denoiser, teacher.card.schedule, scorer.ref, normalizer=normalizer)
        rec = {"method": "teacher_ode", "steps": None, "nfe": nfe, "num": len(scorer.ref), "seed": seed,
               "data": spec, "nll": float(nll.mean())}
        if spec == "toy:gmm":
            rec["nll_true"] = float(-toy_log_density(spec, scorer.ref.double()).mean())
        records.append(rec)
    return records


# ------------------------------------------------------------------------------- output
FORMAT = {"fd_pixel": ".3f", "fd_feature": ".2f", "fid": ".2f", "precision": ".3f", "recall": ".3f",
          "class_coverage": ".2f", "class_entropy": ".3f", "sw": ".4f", "energy": ".4f", "xent_true": ".3f",
          "nll": ".3f", "nll_true": ".3f", "psnr_teacher": ".1f", "samples_per_s": ".0f", "logvar_frac": ".2f"}


def fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, FORMAT.get(key, "g")) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def format_records(records: list[dict]) -> str:
    """A plain-text table, one row per record."""
    keys = [k for k in list(FORMAT) if any(k in r for r in records)]
    head = ["method", "steps"] + keys
    rows = [[str(r["method"]), fmt("steps", r["steps"])] + [fmt(k, r.get(k)) for k in keys] for r in records]
    w = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w[i]) for i, c in enumerate(row)) for row in [head] + rows)
