"""`progdistill export` and `progdistill presets`: parsers and handlers."""

from __future__ import annotations

import argparse

from progdistill.cli.common import add_command, needs

EXPORT_EXAMPLES = """examples:
  progdistill export runs/distill/steps-0004 --out exported/pd4   # one student
  progdistill export runs/distill --out exported/pd-last            # a distillation run: its last finished round
  progdistill export runs/teacher --out exported/teacher --force    # a teacher (EMA weights); replace the folder

writes a diffusers DDIMPipeline folder (unet/, scheduler/, model_index.json) plus README.md (the exact
diffusers call, valid N, provenance, eval.json figures) and progdistill_export.json. Sample it with
  DiffusionPipeline.from_pretrained(DIR)(num_inference_steps=N, eta=0.0, use_clipped_model_output=True, ...)
Students export when N divides T (1024 for the cosine schedule); eps, x and v models export, `both` and
vector (MLP) models do not."""


def cmd_export(a: argparse.Namespace) -> None:
    with needs("export"):
        from progdistill.interop.export import export_model
    print(export_model(a.model, a.out, force=bool(a.force)))


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def cmd_presets(a: argparse.Namespace) -> None:
    with needs("presets"):
        import torch

        from progdistill.nets.build import build_network, count_parameters
        from progdistill.nets.presets import MEASURED_ON, MEASURED_SPEED, PRESETS
        from progdistill.train.teacher import measure_train_speed
    print("A preset names an architecture and a size; the data gives the shape (--resolution, --channels and "
          "--width override).\n`train/s`: training examples/s at the preset's default shape and the batch in brackets, "
          f"measured on {MEASURED_ON}.")
    print(f"{'preset':<11} {'params':>12}  {'shape':<9} {'batch':>5} {'lr':>7} {'N0':>5}  {'train/s':>13}"
          + ("  here/s" if a.measure else "") + "  description")
    for name, p in PRESETS.items():
        n = count_parameters(build_network(p.model, p.param))
        shape = f"{p.model.channels}x{p.model.resolution}x{p.model.resolution}" if p.model.kind == "unet" else "vectors"
        value, batch = MEASURED_SPEED.get(name, (None, 1))
        speed = f"{_rate(value)} ({batch})" if value else "n/a on CPU"
        here = f"  {_rate(measure_train_speed(p, batch_size=batch)):>6}" if a.measure else ""
        print(f"{name:<11} {n:>12,}  {shape:<9} {p.batch_size:>5} {p.lr:>7.0e} {p.distill_start_steps:>5}  "
              f"{speed:>13}{here}  {p.description}")
    print(f"(torch threads now: {torch.get_num_threads()}; set with --threads)")


def add_parsers(sub) -> None:
    x = add_command(sub, "export", "write a model as a diffusers DDIMPipeline folder with a README model card",
                    cmd_export, EXPORT_EXAMPLES)
    x.add_argument("model", metavar="MODEL", help="teacher run, distillation run (its last round), steps-NNNN folder "
                                                  "or diffusers:DIR (an imported teacher, exported with its own betas)")
    x.add_argument("--out", required=True, help="output folder (built beside it, then renamed into place)")
    x.add_argument("--force", action="store_true", default=None, help="replace --out if it exists and is not empty")
    r = add_command(sub, "presets", "list model presets: parameters, default shape, measured training speed",
                    cmd_presets)
    r.add_argument("--measure", action="store_true", default=None, help="also time each preset here (3 training "
                   "steps at the table's batch; slow for the paper presets)")
