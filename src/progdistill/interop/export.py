"""Export a model as a diffusers `DDIMPipeline` folder that samples exactly like progdistill (docs/method.md §8).

    progdistill export runs/distill/steps-0004 --out exported/pd4

writes, atomically (built in a temp folder beside the target, then renamed):
  model_index.json, unet/, scheduler/   `DDIMPipeline.save_pretrained` (safetensors): the UNet with the
                                        weights the model samples with (EMA for teachers) and a
                                        `DDIMScheduler` on the model's own schedule
  README.md                             model card: the exact diffusers call, valid N, provenance, figures
  progdistill_export.json               metadata the `diffusers:` importer reads (null class row, ...)

diffusers' DDIM with `timestep_spacing="trailing"`, `set_alpha_to_one=True`, `trained_betas` from the
schedule and `use_clipped_model_output=True` is progdistill's N-step DDIM (clipping x_pred and
recomputing eps, as in the paper) whenever N divides T = `num_train_timesteps`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from progdistill.diffusion.sampling import time_grid
from progdistill.errors import UserError
from progdistill.pipeline import sampling_clip
from progdistill.store.atomic import replace_dir_atomic
from progdistill.store.card import CARD, ModelCard, read_json
from progdistill.store.folders import resolve_model_folder
from progdistill.store.load import load_denoiser
from progdistill.version import __version__

META = "progdistill_export.json"
META_FORMAT = 1
PREDICTION_TYPE = {"v": "v_prediction", "x": "sample", "eps": "epsilon"}
DIFFUSERS_PREFIX = "diffusers:"


def valid_steps(num_train_timesteps: int) -> list[int]:
    """The N that diffusers' trailing spacing places on whole timesteps T - 1 - k T/N: the divisors of T."""
    return [n for n in range(1, num_train_timesteps + 1) if num_train_timesteps % n == 0]


def scheduler_config(card: ModelCard) -> dict:
    """DDIMScheduler keyword arguments that reproduce the model's DDIM sampler (docs/method.md §8)."""
    clip, clip_range = sampling_clip(card)
    return dict(num_train_timesteps=card.schedule.num_train_timesteps, trained_betas=card.schedule.diffusers_betas(),
                timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                prediction_type=PREDICTION_TYPE[card.param], clip_sample=clip, clip_sample_range=clip_range)


def class_rows(card: ModelCard, net: torch.nn.Module) -> tuple[int, bool]:
    """(real class count, whether the UNet carries one more class row: the null class for guidance).

    progdistill's own class-conditional UNets have num_classes + 1 rows; foreign (imported) ones do not.
    """
    embeds = int(getattr(net.config, "num_class_embeds", None) or 0)
    if not embeds:
        return 0, False
    null = getattr(card, "null_class", None)
    if null is None:   # cards before format 2: progdistill's own UNets, null row when conditional
        model_classes = card.model.num_classes if getattr(card, "model", None) is not None else 0
        null = embeds == int(card.data.get("num_classes") or model_classes or 0) + 1
    return embeds - int(bool(null)), bool(null)


@dataclass
class Source:
    """What MODEL names: the spec as given, its model folder (None for `diffusers:`), the run around it."""

    spec: str
    folder: Path | None
    user_dir: Path | None      # a `diffusers:` source folder (never written to)

    @property
    def name(self) -> str:
        return self.spec if self.folder is None else str(self.folder)


def resolve_source(model: str | Path) -> Source:
    spec = str(model)
    if spec.startswith(DIFFUSERS_PREFIX):
        return Source(spec, None, Path(spec[len(DIFFUSERS_PREFIX):]).expanduser())
    return Source(spec, resolve_model_folder(Path(spec)), None)


def check_exportable(card: ModelCard, net: torch.nn.Module, name: str) -> None:
    """One-line errors for what diffusers' DDIMPipeline cannot run exactly: vectors, `both`, bad N."""
    from diffusers import UNet2DModel
    if getattr(card, "guidance", None):
        raise UserError(f"cannot export {name}: it is guidance-distilled (takes w as an input), and diffusers "
                        f"pipelines have no w input; sample it with `progdistill sample --guidance W`")
    if card.data.get("kind") == "vector" or not isinstance(net, UNet2DModel):
        raise UserError(f"cannot export {name}: it is a vector (MLP) model and diffusers has no pipeline for vectors; "
                        f"only image models (UNet2DModel) export — sample it with `progdistill sample` or "
                        f"progdistill.load()")
    if card.param not in PREDICTION_TYPE:
        raise UserError(f"cannot export {name}: its network outputs {card.param!r} (two heads, 2C channels), which "
                        f"no diffusers prediction_type reads; eps, x and v models export (distil with "
                        f"--student-param v or x)")
    T = card.schedule.num_train_timesteps
    if card.steps is not None and (card.steps > T or T % card.steps):
        raise UserError(f"cannot export {name}: diffusers' trailing timestep spacing places N steps exactly only "
                        f"when N divides T = {T} (the model's num_train_timesteps), and this student takes "
                        f"{card.steps}; export a student whose N divides {T}")


def check_scheduler(card: ModelCard, scheduler, steps: list[int], name: str) -> None:
    """The scheduler's timesteps and alphas are the model's grid (a guard against a wrong beta table)."""
    sched = card.schedule
    T = sched.num_train_timesteps
    j = torch.arange(T)
    ours = torch.sigmoid(sched.logsnr((j + 1).double() / T).double())
    err = (scheduler.alphas_cumprod.double() - ours).abs().max().item()
    if not err <= 1e-5:
        raise UserError(f"cannot export {name}: the DDIMScheduler built from its schedule has alphas_cumprod off by "
                        f"{err:.2g} (this is a bug in progdistill: please report it)")
    for n in steps:
        scheduler.set_timesteps(n)
        tau = sched.time_input(sched.logsnr(time_grid(n)[:-1]).double())
        if scheduler.timesteps.tolist() != [round(float(v)) for v in tau] or (tau - tau.round()).abs().max() > 1e-3:
            raise UserError(f"cannot export {name}: diffusers' {n}-step timesteps {scheduler.timesteps.tolist()[:4]}... "
                            f"are not the model's grid (this is a bug in progdistill: please report it)")


def check_out(out: Path, src: Source, force: bool) -> None:
    out_r = out.expanduser().resolve()
    for p in (src.folder, src.user_dir):
        if p is not None and (out_r == p.resolve() or out_r in p.resolve().parents):
            raise UserError(f"--out {out} would replace the model being exported ({p}); choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty; pass --force to replace it")


def _read_optional(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def run_context(src: Source) -> dict:
    """Best-effort provenance around a model folder: distillation run card, teacher card, timing, eval rows."""
    ctx: dict = {}
    if src.folder is None:
        return ctx
    parent = src.folder.parent
    pcard = _read_optional(parent / CARD)
    if isinstance(pcard, dict) and pcard.get("kind") == "distillation":
        ctx["run"], ctx["run_dir"] = pcard, parent
    timing = _read_optional(src.folder / "timing.json")
    if isinstance(timing, dict):
        ctx["timing"] = timing
    for folder in (src.folder, parent):
        records = _read_optional(folder / "eval.json")
        if folder == parent and not isinstance(pcard, dict):
            break   # a parent that is no run: its eval.json (if any) is not about this model
        if isinstance(records, list) and records:
            ctx["eval"], ctx["eval_path"] = records, folder / "eval.json"
            break
    return ctx


def export_metadata(card: ModelCard, src: Source, num_classes: int, null_class: bool) -> dict:
    clip, clip_range = sampling_clip(card)
    return {"format": META_FORMAT, "null_class": null_class, "num_classes": num_classes, "param": card.param,
            "steps": card.steps, "kind": card.kind, "clip": clip, "clip_range": clip_range, "source": src.name,
            "num_train_timesteps": card.schedule.num_train_timesteps, "data_shape": list(card.data["shape"]),
            "iteration": card.iteration, "progdistill": __version__}


# ------------------------------------------------------------------------------------------ README
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


def readme_text(card: ModelCard, src: Source, out: Path, meta: dict, ctx: dict, sched_cfg: dict) -> str:
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
        L += [f"The model is class-conditional ({classes} classes) and `DDIMPipeline` has no class input, so "
              f"`pipe()` does not run it; load the parts and run the DDIM loop with class labels. "
              f"This is progdistill's {n}-step sampler exactly:", "",
              "```python", "import torch", "from diffusers import DiffusionPipeline",
              "from diffusers.utils.torch_utils import randn_tensor", "",
              f'pipe = DiffusionPipeline.from_pretrained("{out}")',
              "unet, scheduler = pipe.unet, pipe.scheduler",
              f"y = torch.arange(16) % {classes}                 # class labels 0..{classes - 1}"
              + (f" (row {classes} of the embedding is the null class, for guidance)" if meta["null_class"] else ""),
              f"z = randn_tensor((len(y), {C}, {H}, {W}), generator=torch.Generator().manual_seed(0))",
              f"scheduler.set_timesteps({n})",
              "with torch.no_grad():",
              "    for t in scheduler.timesteps:",
              "        z = scheduler.step(unet(z, t, class_labels=y).sample, t, z, eta=0.0,",
              "                           use_clipped_model_output=True).prev_sample",
              "images = (z / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()   # NHWC in [0, 1]",
              "```", ""]
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
          f"| classes | {classes or 'unconditional'}"
          + (" (+ 1 null-class row for guidance)" if meta["null_class"] else "") + " |",
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


def _weights_text(card: ModelCard) -> str:
    w = getattr(card, "weights", "")
    if w == "ema":
        return "EMA (what the teacher samples with)"
    if w == "model":
        return "raw (students keep no EMA)" if card.kind == "student" else "raw"
    return f"as imported (`{w}/`)"


def _provenance_lines(card: ModelCard, src: Source, ctx: dict) -> list[str]:
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


# ------------------------------------------------------------------------------------------ export
@dataclass
class Exported:
    out: Path
    meta: dict

    def __str__(self) -> str:
        m = self.meta
        what = f"{m['steps']}-step student" if m["steps"] else "teacher"
        return (f"wrote {self.out}: diffusers DDIMPipeline ({what}, {PREDICTION_TYPE[m['param']]}, "
                f"{'clip ±%g' % m['clip_range'] if m['clip'] else 'no clip'}"
                + (f", {m['num_classes']} classes" if m["num_classes"] else "") + f") + README.md + {META}")


def export_model(model: str | Path, out: str | Path, *, force: bool = False) -> Exported:
    """Write MODEL (teacher run, distillation run -> its last round, steps-NNNN, diffusers:DIR) to `out`
    as a diffusers DDIMPipeline folder plus README.md and progdistill_export.json. Nothing is written on error."""
    from diffusers import DDIMPipeline, DDIMScheduler

    out = Path(out).expanduser()
    src = resolve_source(model)
    check_out(out, src, force)
    timing = _read_optional(src.folder / "timing.json") if src.folder is not None else None
    if isinstance(timing, dict) and timing.get("finished") is False:
        raise UserError(f"cannot export {src.name}: its training stopped before its budget; finish it with "
                        f"`progdistill train --out {src.folder} --resume` first")
    denoiser, card = load_denoiser(src.spec if src.folder is None else src.folder)
    net = denoiser.net.cpu().eval()
    check_exportable(card, net, src.name)
    cfg = scheduler_config(card)
    scheduler = DDIMScheduler(**cfg)
    T = card.schedule.num_train_timesteps
    check_scheduler(card, scheduler, [card.steps] if card.steps else [n for n in valid_steps(T) if n <= 64], src.name)
    num_classes, null_class = class_rows(card, net)
    meta = export_metadata(card, src, num_classes, null_class)
    readme = readme_text(card, src, out, meta, run_context(src), cfg)

    def write(tmp: Path) -> None:
        DDIMPipeline(unet=net, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(readme)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    replace_dir_atomic(write, out)   # an existing (empty, or --force) target is swapped out
    return Exported(out, meta)


def read_export_metadata(folder: Path) -> dict | None:
    """progdistill_export.json of an exported folder, or None (a pipeline not exported by progdistill)."""
    p = Path(folder) / META
    return read_json(p, "export metadata") if p.is_file() else None


__all__ = ["export_model", "read_export_metadata", "scheduler_config", "valid_steps", "META", "Exported"]
