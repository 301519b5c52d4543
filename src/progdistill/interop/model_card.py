"""README.md of an exported diffusers folder (interop/export.py): the exact diffusers call, valid N, what the
model is (classes, and whether its extra label row may be used for guidance), provenance and measured figures.
`src` is export.py's Source (spec, folder, name) of the exported model."""

from __future__ import annotations

import math
from pathlib import Path

from progdistill.store.card import ModelCard
from progdistill.version import __version__

META = "progdistill_export.json"
PREDICTION_TYPE = {"v": "v_prediction", "x": "sample", "eps": "epsilon"}


def valid_steps(num_train_timesteps: int) -> list[int]:
    """The N that diffusers' trailing spacing places on whole timesteps T - 1 - k T/N: the divisors of T."""
    return [n for n in range(1, num_train_timesteps + 1) if num_train_timesteps % n == 0]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def eval_rows(records: list[dict], card: ModelCard) -> list[dict]:
    """Students: every row at their N (pd is this model; the others are the teacher's samplers at the same
    N, for comparison). Teachers: the rows of the teacher's own samplers."""
    if card.steps is not None:
        return [r for r in records if r.get("steps") == card.steps]
    return [r for r in records if r.get("method") != "pd"]


def eval_table(rows: list[dict]) -> str:
    skip = {"method", "steps", "data", "seed"}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]
    head = ["method", "steps", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def _steps_text(card: ModelCard) -> str:
    T = card.schedule.num_train_timesteps
    if card.steps is not None:
        return (f"This student was distilled for **N = {card.steps}** steps: use `num_inference_steps={card.steps}`. "
                f"Other N run, but are not what it was trained for.")
    ns = valid_steps(T)
    return (f"A teacher: any N that divides T = {T} is progdistill's N-step DDIM exactly: "
            f"{', '.join(map(str, ns))}. Other N (fractional spacing T/N) run, but diffusers rounds their "
            f"timesteps to integers, so they are not exactly progdistill's grid.")


def readme_text(card: ModelCard, src, out: Path, meta: dict, ctx: dict, sched_cfg: dict) -> str:
    C, H, W = card.data["shape"]
    n = card.steps or (64 if 64 in valid_steps(card.schedule.num_train_timesteps) else
                       max(v for v in valid_steps(card.schedule.num_train_timesteps) if v <= 64))
    what = (f"a progressively distilled **{card.steps}-step student**" if card.kind == "student"
            else "a diffusion **teacher**" + (" (EMA weights)" if getattr(card, "weights", "") == "ema" else ""))
    classes = meta["num_classes"]
    sched = card.schedule
    shift = f", shifted by {sched.logsnr_shift:g}" if sched.kind == "cosine" and sched.logsnr_shift else ""
    sched_text = (f"cosine logSNR in [{sched.logsnr_min:g}, {sched.logsnr_max:g}]{shift} (docs/method.md §1), "
                  f"T = {sched.num_train_timesteps}" if sched.kind == "cosine" else f"discrete table of {sched.num_train_timesteps} betas")
    L = [f"# {out.name}: diffusers DDIMPipeline exported by progdistill", "",
         f"This folder holds {what} exported by progdistill {__version__} (progressive distillation, Salimans & Ho "
         f"2022, [arXiv:2202.00512](https://arxiv.org/abs/2202.00512)) from `{src.name}`, as a diffusers `DDIMPipeline` (a `UNet2DModel` plus a `DDIMScheduler`).", "",
         "## Sample it", ""]
    call = (f'pipe = DiffusionPipeline.from_pretrained("{out}")\n'
            f"images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0), num_inference_steps={n}, "
            f'eta=0.0,\n              use_clipped_model_output=True, output_type="np").images   # (16, {H}, {W}, {C}) in [0, 1]')
    if classes:
        L += _class_loop_lines(card, meta, out, n) + null_row_lines(card, meta)
    else:
        L += ["Use exactly this call:", "", "```python", "import torch", "from diffusers import DiffusionPipeline", "",
              call, "```", ""]
    why = ("with `clip_sample=True` it clips x but keeps the unclipped eps — a different sampler. "
           "`use_clipped_model_output=True` recomputes eps from the clipped x, which is the paper's DDIM"
           if meta["clip"] else "this model samples unclipped (`clip_sample=False`), so the flag changes nothing "
           "here, but keep it: it is what makes clipped models match")
    L += [f"Why these arguments: a plain `pipe()` takes 50 steps and `use_clipped_model_output=None`; {why}; "
          "`eta=0.0` is deterministic DDIM. With the same initial noise (`randn_tensor` from the generator, as the "
          "pipeline draws it) the samples equal progdistill's N-step DDIM, "
          "`progdistill.load(...).sample(steps=N, noise=z)`, to float precision.", "",
          "### Valid N", "", _steps_text(card), "",
          "## What it is", "",
          "| field | value |", "|---|---|",
          f"| kind | {card.kind}{'' if card.steps is None else f', N = {card.steps}'} |",
          f"| parameterization | {card.param} (`prediction_type=\"{PREDICTION_TYPE[card.param]}\"`) |",
          f"| data | {card.data.get('kind', 'image')} {C}×{H}×{W}, values in [-1, 1]"
          + (f", spec `{card.data['spec']}`" if card.data.get("spec") else "") + " |",
          f"| classes | {classes or 'unconditional'}{null_row_text(card, meta)[1]} |",
          f"| schedule | {sched_text} |",
          f"| clipping | {'x_pred clipped to ±' + format(meta['clip_range'], 'g') if meta['clip'] else 'none'} |",
          f"| weights | {_weights_text(card)} |",
          f"| iterations | {'— (imported)' if src.folder is None else format(card.iteration, ',')} |", "",
          "## How it was made", ""]
    L += _provenance_lines(card, src, ctx) + [""]
    if ctx.get("eval"):
        rows = eval_rows(ctx["eval"], card)
        if rows:
            r0 = rows[0]
            L += ["## Measured", "",
                  f"From `{ctx['eval_path']}` ({_fmt(r0.get('num'))} samples per row, seed {r0.get('seed')}, "
                  f"reference data `{r0.get('data')}`)"
                  + ("; `pd` is this student, the other rows are the teacher's samplers at the same N" if card.steps
                     else "") + ":", "", eval_table(rows), ""]
    L += ["## Files", "",
          "- `model_index.json`, `unet/`, `scheduler/`: the diffusers pipeline (safetensors weights).",
          f"- `{META}`: metadata for progdistill's importer (`progdistill distill --teacher diffusers:DIR`).",
          "", "Scheduler configuration (docs/method.md §8): "
          + ", ".join(f"`{k}={v!r}`" for k, v in sched_cfg.items() if k != "trained_betas")
          + ", `trained_betas` = the schedule's own beta table.", ""]
    return "\n".join(L)


def null_row_text(card: ModelCard, meta: dict) -> tuple[str, str]:
    """(code comment, table note) on the UNet's extra label row: the null class. Only a teacher trained with
    label dropout (`meta["guidable"]`) learned it; a plain student's copy was never distilled."""
    if not meta["null_class"]:
        return "", ""
    row = meta["num_classes"]
    if meta.get("guidable"):
        return f" (row {row} of the embedding is the null class, for guidance)", " (+ 1 null-class row for guidance)"
    if card.kind == "student":
        return (f" (row {row} is the teacher's null row, never distilled for guidance: do not use it)",
                " (+ the teacher's null-class row, never distilled: not for guidance)")
    return (f" (row {row} is a null row never trained (no label dropout recorded): not for guidance)",
            " (+ 1 untrained null-class row: not for guidance)")


def null_row_lines(card: ModelCard, meta: dict) -> list[str]:
    """A paragraph on guidance with the extra label row, for class-conditional exports that have one."""
    if not meta["null_class"]:
        return []
    row = meta["num_classes"]
    if meta.get("guidable"):
        return [f"Classifier-free guidance: row {row} of the class embedding is the null class this teacher was "
                f"trained with (label dropout); guided eps = (1 + w) eps(z, y) - w eps(z, {row}). "
                f"`{META}` says `\"guidable\": true`.", ""]
    if card.kind == "student":
        why = ("This plainly distilled student carries its teacher's null-class row, but distillation never trained "
               "it: guidance with it gives wrong samples, and progdistill refuses to guide this student. For a "
               "guided few-step model distil the teacher with `progdistill distill --guided` (it takes w as an "
               "input, which diffusers pipelines lack)")
    else:
        why = ("This teacher's model card records no label dropout, so its null-class row may be untrained: "
               "do not guide with it")
    return [f"Not for guidance: row {row} of the class embedding (the null class) is not a class and not usable "
            f"for classifier-free guidance. {why}. `{META}` says `\"guidable\": false`.", ""]


def _class_loop_lines(card: ModelCard, meta: dict, out: Path, n: int) -> list[str]:
    C, H, W = card.data["shape"]
    classes = meta["num_classes"]
    return [f"The model is class-conditional ({classes} classes) and `DDIMPipeline` has no class input, so "
            f"`pipe()` does not run it; load the parts and run the DDIM loop with class labels. "
            f"This is progdistill's {n}-step sampler exactly:", "",
            "```python", "import torch", "from diffusers import DiffusionPipeline",
            "from diffusers.utils.torch_utils import randn_tensor", "",
            f'pipe = DiffusionPipeline.from_pretrained("{out}")',
            "unet, scheduler = pipe.unet, pipe.scheduler",
            f"y = torch.arange(16) % {classes}                 # class labels 0..{classes - 1}"
            + null_row_text(card, meta)[0],
            f"z = randn_tensor((len(y), {C}, {H}, {W}), generator=torch.Generator().manual_seed(0))",
            f"scheduler.set_timesteps({n})",
            "with torch.no_grad():",
            "    for t in scheduler.timesteps:",
            "        z = scheduler.step(unet(z, t, class_labels=y).sample, t, z, eta=0.0,",
            "                           use_clipped_model_output=True).prev_sample",
            "images = (z / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()   # NHWC in [0, 1]",
            "```", ""]


def _weights_text(card: ModelCard) -> str:
    w = getattr(card, "weights", "")
    if w == "ema":
        return "EMA (what the teacher samples with)"
    if w == "model":
        return "raw (students keep no EMA)" if card.kind == "student" else "raw"
    return f"as imported (`{w}/`)"


def _provenance_lines(card: ModelCard, src, ctx: dict) -> list[str]:
    prov = card.provenance or {}
    L = []
    if card.kind == "student":
        run = ctx.get("run") or {}
        teacher = run.get("teacher") or prov.get("teacher")
        L.append(f"- Progressive distillation (Salimans & Ho 2022, Algorithm 2) of the teacher `{teacher}`"
                 + (f" (preset {prov['preset']})" if prov.get("preset") else "") + ".")
        if run:
            rounds = sorted(run.get("rounds", []), key=lambda r: r["round"])
            rounds = [r for r in rounds if r["steps"] >= card.steps]
            L.append(f"- N0 = {run.get('start_steps')} → N = {card.steps} in {len(rounds)} halving rounds "
                     f"(run `{ctx['run_dir']}`, student parameterization {run.get('student_param')}).")
            if rounds:
                L.append("- Iterations per round: " + ", ".join(
                    f"{2 * r['steps']}→{r['steps']}: {r['iters']:,}" for r in rounds)
                    + f" ({sum(r['iters'] for r in rounds):,} in all"
                    + (f", {sum(r.get('seconds', 0.0) for r in rounds) / 60:.1f} min" if all('seconds' in r for r in rounds)
                       else "") + ").")
        else:
            L.append(f"- Round {prov.get('round', '?')}: {prov.get('teacher_steps', '?')} → {card.steps} steps, "
                     f"{card.iteration:,} iterations.")
        if prov.get("seed") is not None:
            L.append(f"- Seed {prov['seed']}.")
    elif src.folder is None or getattr(card, "source", None):
        L.append(f"- Imported from the diffusers pipeline `{getattr(card, 'source', None) or src.spec}`; "
                 f"its UNet and its own beta table (T = {card.schedule.num_train_timesteps}) are exported unchanged.")
    else:
        L.append(f"- Teacher trained by progdistill (Algorithm 1): {card.iteration:,} iterations"
                 + (f", preset {prov['preset']}" if prov.get("preset") else "")
                 + (f", loss weighting {prov['weighting']}" if prov.get("weighting") else "")
                 + (f", seed {prov['seed']}" if prov.get("seed") is not None else "") + "; samples use the EMA weights.")
        t = ctx.get("timing")
        if t and t.get("seconds_total"):
            L.append(f"- Training time {t['seconds_total'] / 60:.1f} min.")
    return L
