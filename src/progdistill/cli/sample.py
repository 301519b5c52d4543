"""`progdistill sample`: parser and handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from progdistill.cli.common import add_command, add_compile_arg, check_typed_seed, needs, value
from progdistill.errors import UserError

EXAMPLES = """examples:
  progdistill sample --model runs/teacher --steps 256 --num 64 --out teacher.png
  progdistill sample --model runs/distill/steps-0004 --steps 4 --num 64 --out pd4.png --npz pd4.npz
  progdistill sample --model runs/teacher --steps 64 --sampler ancestral --logvar-frac 0.3 --out anc.png
  progdistill sample --model runs/cond --steps 256 --guidance 2 --class 3 --out guided.png   # 512 evaluations
  progdistill sample --model runs/gd/steps-0004 --guidance 2 --sampler stochastic --out gd4.png  # 4 evaluations"""
SAMPLERS = ["ddim", "ancestral", "dpmpp2m", "stochastic"]


def cmd_sample(a: argparse.Namespace) -> None:
    seed = check_typed_seed(a)
    sampler = value(a.sampler, "ddim")
    if a.logvar_frac is not None and sampler != "ancestral":
        raise UserError(f"--logvar-frac only applies to --sampler ancestral (the {sampler} sampler has no variance "
                        f"to choose): add --sampler ancestral or drop it")
    if not a.out and not a.npz:
        raise UserError("nothing to write: pass --out grid.png and/or --npz samples.npz")
    with needs("sample"):
        import numpy as np

        from progdistill.data.images import save_samples, to_uint8
        from progdistill.nets.device import apply_global, device_settings
        from progdistill.pipeline import load
    model = load(a.model, compile=a.compile)
    apply_global(device_settings(model.device.type))     # TF32 matmuls on CUDA
    x = model.sample(num=value(a.num, 64), steps=a.steps, seed=seed, sampler=sampler,
                     logvar_frac=value(a.logvar_frac, 0.0), class_label=a.class_label,
                     batch_size=value(a.batch_size, 500), guidance=a.guidance, progress=True)
    title = f"{sampler} {a.steps or model.card.steps or 256}" + ("" if a.guidance is None else f", w = {a.guidance:g}")
    if a.out:
        print(f"wrote {save_samples(x, Path(a.out), title=title)}")
    if a.npz:
        arr = to_uint8(x) if x.dim() == 4 else x.numpy()
        np.savez_compressed(a.npz, x=arr)
        print(f"wrote {a.npz} ({arr.shape})")


def add_parsers(sub) -> None:
    m = add_command(sub, "sample", "sample from a teacher run or a distilled model", cmd_sample, EXAMPLES)
    m.add_argument("--model", required=True, help="run folder, distillation run (latest round), steps-NNNN or "
                   "diffusers:PATH")
    m.add_argument("--steps", type=int, default=None, help="sampling steps (default: what the model was distilled for)")
    m.add_argument("--num", type=int, default=None, help="default 64")
    m.add_argument("--out", default=None, help="PNG grid (images) or scatter plot (vectors)")
    m.add_argument("--npz", default=None, help="also save samples as .npz (uint8 images / float vectors)")
    m.add_argument("--seed", type=int, default=None, help="default 0")
    m.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="default ddim; stochastic: the N-step sampler for distilled students (2/N DDIM jump, then "
                        "re-noise)")
    m.add_argument("--logvar-frac", type=float, default=None,
                   help="ancestral only: 0 fixed_small (the default) .. 1 fixed_large")
    m.add_argument("--class", dest="class_label", type=int, default=None)
    m.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance w >= 0: x = (1 + w) x_c - w x_null (diffusers' guidance_scale "
                        "= 1 + w); class-conditional teachers (2 evaluations per step) and --guided students (1)")
    m.add_argument("--batch-size", type=int, default=None, help="default 500")
    add_compile_arg(m)
