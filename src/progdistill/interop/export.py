"""Export a model as a diffusers `DDIMPipeline` folder that samples exactly like progdistill (docs/method.md §8).

    progdistill export runs/distill/steps-0004 --out exported/pd4

writes, atomically (built in a temp folder beside the target, then swapped in: store/atomic.py):
  model_index.json, unet/, scheduler/   `DDIMPipeline.save_pretrained` (safetensors): the UNet with the
                                        weights the model samples with (EMA for teachers) and a
                                        `DDIMScheduler` on the model's own schedule
  README.md                             model card (interop/model_card.py): the exact diffusers call, valid
                                        N, provenance, figures
  progdistill_export.json               metadata the `diffusers:` importer reads: "null_class" (the UNet
                                        has one more label row than classes), "guidable" (that row is a
                                        null class trained for guidance: teachers trained with label
                                        dropout; never a plainly distilled student), ...

diffusers' DDIM with `timestep_spacing="trailing"`, `set_alpha_to_one=True`, `trained_betas` from the
schedule and `use_clipped_model_output=True` is progdistill's N-step DDIM (clipping x_pred and
recomputing eps, as in the paper) whenever N divides T = `num_train_timesteps`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from progdistill.diffusion.sampling import time_grid
from progdistill.errors import UserError
from progdistill.interop.model_card import META, PREDICTION_TYPE, readme_text, valid_steps
from progdistill.pipeline import sampling_clip
from progdistill.store.atomic import replace_dir_atomic
from progdistill.store.card import CARD, ModelCard, read_json
from progdistill.store.folders import resolve_model_folder
from progdistill.store.guided import check_guidable
from progdistill.store.load import load_denoiser
from progdistill.version import __version__

META_FORMAT = 1
DIFFUSERS_PREFIX = "diffusers:"


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


def guidable(card: ModelCard, null_class: bool) -> bool:
    """Whether the extra label row is a null class that classifier-free guidance may use: a teacher trained with
    label dropout. A plainly distilled student's copy of the row was never distilled (progdistill refuses to
    guide it), and imported or dropout-less teachers record no trained null class."""
    if not null_class:
        return False
    try:
        check_guidable(card)
    except UserError:
        return False
    return True


def export_metadata(card: ModelCard, src: Source, num_classes: int, null_class: bool) -> dict:
    clip, clip_range = sampling_clip(card)
    return {"format": META_FORMAT, "null_class": null_class, "guidable": guidable(card, null_class),
            "num_classes": num_classes, "param": card.param,
            "steps": card.steps, "kind": card.kind, "clip": clip, "clip_range": clip_range, "source": src.name,
            "num_train_timesteps": card.schedule.num_train_timesteps, "data_shape": list(card.data["shape"]),
            "iteration": card.iteration, "progdistill": __version__}


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
