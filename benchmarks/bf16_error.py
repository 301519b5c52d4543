"""bf16 autocast against float32, per range of t and per output parameterization (issue 9, item 2).

    python benchmarks/bf16_error.py --teacher runs/recipes/base       # a trained digits teacher (recommended)
    python benchmarks/bf16_error.py                                   # random-init networks only
    python benchmarks/bf16_error.py --quick                           # a smoke run (seconds)

For each network and each output parameterization (eps, x, v), the same examples (x, eps, t) are
denoised in float32 and under bf16 autocast, in 8 bins of t in [0, 1]. Per bin it prints
- `x`: the relative error of x_pred, ||x_bf16 - x_fp32|| / ||x_fp32||;
- `L`: the relative error of the per-example truncated-SNR loss max(SNR, 1) ||x - x_pred||^2
  (Algorithm 1's default weighting), rms(L_bf16 - L_fp32) / mean(L_fp32);
- `x(c16)`: what x_pred's error would be if the conversion from the raw output (x = (z - sigma eps) / alpha,
  x = alpha z - sigma v) also ran in bf16 instead of float32 (progdistill's Denoiser does it in float32).
A last row gives the same over t ~ U[0, 1] (what a training batch sees).

Networks: the digits preset (with --teacher: the trained run for its own parameterization, and for the
other two a copy of it fine-tuned --adapt-iters steps with that output, as distillation switches eps ->
v; without --teacher all three random-init), and the cifar10 preset's architecture at --cifar-width
(random init on random images: its loss errors say little, its x_pred errors show the body's bf16 error
at that depth). Measured with CPU autocast (bf16 matmuls and convolutions accumulate in float32, as on
GPUs); a GPU's kernels round differently, so treat the figures as an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from progdistill.data.datasets import load_data
from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.losses import weighted_x_loss
from progdistill.diffusion.parameterization import x_pred_from_output
from progdistill.diffusion.schedules import Schedule, alpha_sigma
from progdistill.nets.build import build_network
from progdistill.nets.presets import PRESETS, for_data
from progdistill.store.load import load_denoiser
from progdistill.train.distill import init_student
from progdistill.train.teacher import diffusion_loss

PARAMS = ("eps", "x", "v")
WEIGHTING = "snr_trunc"


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def adapt(teacher: Denoiser, card, param: str, data, *, iters: int, batch: int, seed: int) -> Denoiser:
    """A copy of the trained teacher with another output, fine-tuned `iters` AdamW steps of Algorithm 1."""
    net = init_student(teacher.net, card, param).train()
    den = Denoiser(net, schedule=teacher.schedule, param=param)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        idx = torch.randint(len(data.x), (batch,), generator=g)
        b = {"x": data.x[idx], "t": torch.rand(batch, generator=g, dtype=torch.float64),
             "eps": torch.randn(batch, *data.x.shape[1:], generator=g), "y": None}
        loss = diffusion_loss(den, b, slice(None), schedule=teacher.schedule, weighting=WEIGHTING, class_cond=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return den.eval()


@torch.no_grad()
def outputs(den: Denoiser, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> dict:
    """Per example: x_pred in float32, under bf16 autocast, and with the conversion in bf16 too; and the losses."""
    logsnr64 = den.schedule.logsnr(t)
    logsnr = logsnr64.float()
    alpha, sigma = alpha_sigma(_b(logsnr, x))
    z = alpha * x + sigma * eps
    x32 = den(z, logsnr64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw16 = den.raw_output(z, logsnr64)
    x16 = x_pred_from_output(den.param, raw16.float(), z, alpha, sigma)   # as Denoiser.forward: float32 maths
    bf = torch.bfloat16                                      # the counterfactual: the conversion in bf16 too
    x16c = x_pred_from_output(den.param, raw16, z.to(bf), alpha.to(bf), sigma.to(bf)).float()
    return {"x32": x32, "x16": x16, "x16c": x16c, "l32": weighted_x_loss(x, x32, logsnr, WEIGHTING),
            "l16": weighted_x_loss(x, x16, logsnr, WEIGHTING)}


def summary(o: dict) -> dict:
    """Relative errors over a set of examples: x_pred (Frobenius), loss (rms error / mean loss), loss-mean bias."""
    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    l16, l32 = o["l16"], o["l32"]
    return {"x": rel(o["x16"], o["x32"]), "L": float((l16 - l32).pow(2).mean().sqrt() / l32.mean()),
            "x_c16": rel(o["x16c"], o["x32"]), "L_mean_bias": float((l16.mean() - l32.mean()) / l32.mean())}


def study(name: str, models: dict, x_pool: torch.Tensor, *, bins: int, per_bin: int, seed: int) -> dict:
    """One table: rows = t bins (+ all t), columns = per parameterization x, L, x(c16)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x_pool), (bins * per_bin,), generator=g)
    x = x_pool[idx]
    eps = torch.randn(x.shape, generator=g)
    t = ((torch.arange(bins).repeat_interleave(per_bin) + torch.rand(bins * per_bin, generator=g,
                                                                     dtype=torch.float64)) / bins).clamp(1e-4, 1 - 1e-4)
    rows = {f"[{b / bins:.3f}, {(b + 1) / bins:.3f})": {} for b in range(bins)}
    rows["all t"] = {}
    for p, den in models.items():
        per_bin_out = [outputs(den, x[sl], eps[sl], t[sl])
                       for sl in (slice(b * per_bin, (b + 1) * per_bin) for b in range(bins))]
        for key, o in zip(rows, per_bin_out + [{k: torch.cat([o[k] for o in per_bin_out]) for k in per_bin_out[0]}]):
            rows[key][p] = summary(o)
    header = f"{'t':<16}" + "".join(f" | {p + ' x':>9} {p + ' L':>9} {p + ' x(c16)':>11}" for p in models)
    print(f"\n{name}\n{header}\n{'-' * len(header)}")
    for key, r in rows.items():
        print(f"{key:<16}" + "".join(f" | {r[p]['x']:9.2e} {r[p]['L']:9.2e} {r[p]['x_c16']:11.2e}" for p in models))
    print("mean-loss bias over all t (mean L_bf16 / mean L_fp32 - 1): "
          + ", ".join(f"{p} {rows['all t'][p]['L_mean_bias']:+.2e}" for p in models), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=None, help="a trained digits teacher run (e.g. runs/recipes/base)")
    ap.add_argument("--adapt-iters", type=int, default=400, help="fine-tuning steps for the teacher's other outputs")
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--per-bin", type=int, default=256)
    ap.add_argument("--cifar-width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.adapt_iters, a.bins, a.per_bin, a.cifar_width = min(a.adapt_iters, 2), 2, 8, 8
    t0 = time.time()
    out = {}
    digits = load_data("digits", split="train")
    if a.teacher is not None:
        teacher, card = load_denoiser(a.teacher)
        models = {}
        for p in PARAMS:
            models[p] = teacher if p == teacher.param else adapt(teacher, card, p, digits, iters=a.adapt_iters,
                                                                   batch=64, seed=a.seed)
        what = f"digits teacher {a.teacher} ({teacher.param}; others fine-tuned {a.adapt_iters} steps from it)"
    else:
        models = {}
        for p in PARAMS:
            torch.manual_seed(a.seed)      # the same body for every output
            models[p] = Denoiser(build_network(PRESETS["digits"].model, p), schedule=Schedule(), param=p).eval()
        what = "digits preset, random init"
    out["digits"] = study(what, models, digits.x, bins=a.bins, per_bin=a.per_bin, seed=a.seed)

    m = for_data(PRESETS["cifar10"].model, resolution=32, channels=3, width=a.cifar_width, what="cifar10 preset")
    models = {}
    for p in PARAMS:
        torch.manual_seed(a.seed)
        models[p] = Denoiser(build_network(m, p), schedule=Schedule(), param=p).eval()
    images = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(a.seed)) * 2 - 1
    out["cifar10"] = study(f"cifar10 architecture at width {a.cifar_width}, random init, random images", models,
                           images, bins=a.bins, per_bin=a.per_bin, seed=a.seed)
    print(f"\n{time.time() - t0:.0f} s, {torch.get_num_threads()} torch threads")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
