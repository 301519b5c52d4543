"""A distillation run's config: the one resume rule, the teacher's defaults and guidance.

Before the teacher is read, `distill_config` applies the defaults (new run) or the resume rule (the
saved config; a typed --teacher is compared by its resolved path). Then `resolve_config` fills what
the teacher decides (N0, iterations, lr, batch, data, flips) and `resolve_guidance` what guidance means
for it: a w-conditioned teacher (a guidance-distilled model, its card's `guidance: {w_min, w_max}`)
skips stage 1 and the rounds draw w from its card's range, with or without --guided.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from progdistill.diffusion.schedules import default_start_steps
from progdistill.errors import UserError
from progdistill.nets.presets import get_preset
from progdistill.store.card import CARD, ModelCard, is_diffusers_spec, read_json
from progdistill.store.guided import describe_model, is_w_conditioned
from progdistill.store.load import resolved_teacher
from progdistill.train.config import DistillConfig, from_dict, resume_config, with_defaults
from progdistill.train.rounds import budget_iters, plan_rounds, round_weights

W_RANGE = (0.0, 4.0)     # --w-min, --w-max of guided distillation when not typed (the paper's pixel-space range)


def distill_config(cfg: DistillConfig, out: Path, *, resume: bool) -> DistillConfig:
    """The run's config before the teacher is read: the given fields over the defaults, or with `resume`
    the saved config continued under the resume rule (`config.resume_config`). Raises before anything is written."""
    cfg.validate()
    for flag, typed in (("--iters-per-round", cfg.iters_per_round), ("--round-iters", cfg.round_iters)):
        if cfg.budget is not None and typed is not None:
            raise UserError(f"--budget and {flag} both set the rounds' iterations; give one of them")
    if cfg.round_iters is not None and cfg.switch_factor is not None:
        raise UserError("--round-iters gives every round's iterations; drop --switch-factor")
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"--resume: {out} has no config.json; start a new distillation without --resume")
        saved = with_defaults(from_dict(DistillConfig, read_json(out / "config.json", "run config")), "distill")
        cfg = resume_config(saved, cfg, "distill", out, compare={"teacher": resolved_teacher})
    elif (out / "config.json").exists():
        raise UserError(f"{out} already holds a distillation run: pass --resume, or choose another --out")
    elif not cfg.teacher:
        raise UserError("distill needs --teacher: a teacher run folder, or diffusers:PATH")
    return with_defaults(cfg, "distill")


def resolve_guidance(cfg: DistillConfig, card: ModelCard, asked: DistillConfig, name: str) -> DistillConfig:
    """The run's guidance: `guided`, [w_min, w_max] and guided_iters, checked against what the teacher is.

    `asked` is the command's config (its typed fields). A w-conditioned teacher: guided, its card's range,
    no stage 1 (a typed --guided-iters or another range is refused). Otherwise the range and stage-1
    iterations are for --guided only."""
    lo, hi = W_RANGE
    if is_w_conditioned(card):
        lo, hi = card.guidance["w_min"], card.guidance["w_max"]
        what = f"{name} is {describe_model(card)}"
        if asked.guided_iters is not None:
            raise UserError(f"{what}: stage 1 does not run, its rounds distil it directly; drop --guided-iters "
                            f"{asked.guided_iters}")
        for flag, typed, kept in (("--w-min", asked.w_min, lo), ("--w-max", asked.w_max, hi)):
            if typed is not None and typed != kept:
                raise UserError(f"{what}: the rounds draw w from its range; drop {flag} {typed:g}")
        return dataclasses.replace(cfg, guided=True, w_min=lo, w_max=hi, guided_iters=None).validate()
    if not cfg.guided:
        for flag, typed in (("--w-min", asked.w_min), ("--w-max", asked.w_max), ("--guided-iters", asked.guided_iters)):
            if typed is not None:
                raise UserError(f"{flag} is for guided distillation, but {name} is {describe_model(card)} and "
                                f"--guided is not given; add --guided or drop {flag}")
        return dataclasses.replace(cfg, w_min=lo, w_max=hi, guided_iters=None).validate()
    return dataclasses.replace(cfg, w_min=lo if cfg.w_min is None else cfg.w_min,
                               w_max=hi if cfg.w_max is None else cfg.w_max,
                               guided_iters=cfg.guided_iters or cfg.iters_per_round).validate()


# Imported teachers have no preset: the digits preset's distillation settings serve small (CPU-sized)
# networks, the paper's lr 1e-4 (docs/method.md §6) larger ones; --lr / --iters-per-round / --batch-size override.
IMPORTED_SMALL_PARAMS = 10_000_000
# Imported teachers' last two rounds get 3x the iterations (or of a --budget's share): measured on the diffusers-
# trained digits teacher at the teacher's budget (benchmarks/diffusers_teacher.py --part levers, README), the
# 4-step student's FD was 1.71x the teacher's DDPM-1000 against 2.1-2.4x with equal rounds; shifting weight to
# the first (eps -> v) round or starting from N0 = 64 made it worse (3.6x, 3.8x).
IMPORTED_LAST_ROUNDS_FACTOR = 3.0


def resolve_config(cfg: DistillConfig, teacher_card: ModelCard, teacher_run: str, teacher_params: int) -> DistillConfig:
    """Fill unset fields from the teacher's preset and run config (imported teachers: see above)."""
    if is_diffusers_spec(teacher_run):
        if cfg.data is None:
            raise UserError(f"--data is required for an imported teacher ({teacher_run}): the data it was trained on, "
                            f"e.g. --data folder:PATH")
        small = get_preset("digits")
        fill = dict(start_steps=default_start_steps(teacher_card.schedule), iters_per_round=small.distill_iters_per_round,
                    lr=small.distill_lr if teacher_params <= IMPORTED_SMALL_PARAMS else 1e-4, batch_size=64,
                    hflip=False, last_rounds_factor=IMPORTED_LAST_ROUNDS_FACTOR)
    else:
        kind = teacher_card.model.kind if teacher_card.model is not None else "unet"
        preset = get_preset((teacher_card.provenance or {}).get("preset") or ("digits" if kind == "unet" else "mlp"))
        batch, hflip = preset.batch_size, preset.hflip
        if (Path(teacher_run) / "config.json").is_file():
            run = read_json(Path(teacher_run) / "config.json")
            batch, hflip = run.get("batch_size") or batch, run.get("hflip", hflip)   # flips as the teacher trained
        fill = dict(start_steps=preset.distill_start_steps, iters_per_round=preset.distill_iters_per_round,
                    lr=preset.distill_lr, batch_size=batch, data=teacher_card.data["spec"], hflip=bool(hflip),
                    last_rounds_factor=1.0)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fill.items() if getattr(cfg, k) is None})
    return cfg.validate()


def resolve_budget(cfg: DistillConfig, switch: bool) -> DistillConfig:
    """With --budget, the rounds' iterations (`rounds.budget_iters`) saved as `round_iters`: config.json holds
    the resolved plan (a resume keeps it). `switch`: the student's parameterisation is not the teacher's."""
    if cfg.budget is None or cfg.round_iters is not None:
        return cfg
    n_rounds = len(plan_rounds(cfg.start_steps, cfg.final_steps, 1, 1.0))
    examples = cfg.budget * (cfg.teacher_examples or 1)
    if examples < n_rounds * cfg.batch_size:
        what = f"{cfg.budget:g} x {cfg.teacher_examples} = {examples:,.0f}" if cfg.teacher_examples else f"{examples:,.0f}"
        raise UserError(f"--budget {what} examples is too small: {n_rounds} rounds need at least one batch each "
                        f"({n_rounds} x {cfg.batch_size} = {n_rounds * cfg.batch_size:,})")
    weights = round_weights(n_rounds, cfg.last_rounds_factor, cfg.switch_factor if switch else 1.0)
    return dataclasses.replace(cfg, round_iters=budget_iters(examples, cfg.batch_size, weights)).validate()


def examples_text(cfg: DistillConfig, rounds: list[dict], teacher_run: str) -> str:
    """For the start line: the examples the rounds will see, the budget, and an own teacher's recorded
    training examples (its config.json iters x batch_size), the reference of a fractional --budget."""
    text = f", {sum(r['iters'] for r in rounds) * cfg.batch_size:,} examples"
    if cfg.budget is not None:
        text += (f" (--budget {cfg.budget:g} x --teacher-examples {cfg.teacher_examples:,})" if cfg.teacher_examples
                 else f" (--budget {cfg.budget:,.0f})")
    run = Path(teacher_run) / "config.json"
    if not is_diffusers_spec(teacher_run) and run.is_file():
        t = read_json(run)
        if t.get("iters") and t.get("batch_size"):
            text += f"; the teacher trained on {t['iters'] * t['batch_size']:,} ({t['iters']} iters x batch {t['batch_size']})"
    return text


def warn_if_unfinished(teacher_run: str) -> None:
    """One stderr line when the teacher run stopped before its budget (time limit, kill): still distilled."""
    run = Path(teacher_run)
    if is_diffusers_spec(teacher_run) or not (run / CARD).is_file():
        return
    timing = read_json(run / "timing.json") if (run / "timing.json").is_file() else {}
    budget = read_json(run / "config.json").get("iters") if (run / "config.json").is_file() else None
    done = read_json(run / CARD).get("iteration", 0)
    if timing.get("finished") is False or (budget and done < budget):
        print(f"warning: teacher {run} is unfinished ({done} of {budget or '?'} iterations); distilling it as it is "
              f"(finish it with `progdistill train --out {run} --resume`)", file=sys.stderr)


