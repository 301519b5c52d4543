"""GPU figures for the cifar10 preset (issue 9, item 2); `bash benchmarks/gpu.sh` runs it in <= 5 minutes.

    python benchmarks/gpu.py --compile --channels-last on --compare-layout     # what gpu.sh runs
    python benchmarks/gpu.py --tiny                                           # CPU smoke run (seconds)

Prints, for the cifar10 preset's network (60M parameters at 3x32x32; --tiny: width 8, batch 4, 2 steps)
at --precision (default bf16) on one device:
1. teacher training images/s, through progdistill's own loop (`training.optimize`: autocast, clipping,
   EMA, the non-finite checks) and its own batches (`teacher_batch`: the (seed, step) plan and per-chunk
   noise drawn on the CPU), from random images held on the device;
2. one distillation step / one training step (`distillation_loss`: two float32 teacher evaluations and
   one student step; target <= 1.7);
3. DDIM sampling images/s at --sample-steps steps, under the precision's autocast and in float32 (what
   `progdistill sample` runs; TF32 matmuls on CUDA);
4. model FLOPs per training step and per sampling evaluation (torch.utils.flop_counter, attention
   included: eval.flops.count_flops) and MFU against the device's dense bf16 peak (eval.flops.DENSE_BF16_TFLOPS;
   n/a on the CPU; --peak-tflops overrides);
5. with --compare-layout, an eager training step in NCHW and in channels_last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from progdistill.data.datasets import Dataset
from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.schedules import Schedule
from progdistill.eval.flops import count_flops, peak_tflops
from progdistill.nets.build import build_network, count_parameters
from progdistill.nets.compile import compile_denoiser
from progdistill.nets.device import apply_global, device_settings, prepare_network, run_note
from progdistill.nets.presets import PRESETS, for_data
from progdistill.pipeline import generate
from progdistill.store.card import ModelCard
from progdistill.train.distill import distill_batch, distillation_loss
from progdistill.train.loop import EMA, DistInfo, MetricsLog, autocast, optimize
from progdistill.train.optim import adamw
from progdistill.train.teacher import diffusion_loss, teacher_batch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_seconds(model, net, opt, loss_fn, *, ema, precision: str, dev: torch.device, warmup: int, iters: int) -> float:
    """Seconds per optimizer step of `optimize` over steps warmup..warmup+iters (the warm-up compiles)."""
    common = dict(model=model, params=list(net.parameters()), optimizer=opt, loss_fn=loss_fn, lr_fn=lambda s: 1e-5,
                  grad_accum=1, grad_clip=1.0, precision=precision, dist_info=DistInfo(0, 1, dev), ema=ema,
                  ema_target=net if ema is not None else None, save_fn=lambda s: None, checkpoint_every=10**9,
                  deadline=None, metrics=MetricsLog(Path(os.devnull), False), log_every=10**9, desc="", progress=False)
    optimize(start_step=0, iters=warmup, **common)
    _sync(dev)
    t0 = time.perf_counter()
    optimize(start_step=warmup, iters=warmup + iters, **common)
    _sync(dev)
    return (time.perf_counter() - t0) / iters


def sample_rate(den, card, *, steps: int, num: int, precision: str, dev: torch.device, repeats: int) -> float:
    """DDIM images/s for `num` samples in one batch (one warm-up call first)."""
    def run():
        with autocast(precision, dev):
            generate(den, card, steps=steps, num=num, batch_size=num, device=dev)
    run()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(dev)
    return num * repeats / (time.perf_counter() - t0)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="width 8, batch 4, 2 timed steps: a CPU smoke run")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                    help="auto: the device's setting (on for CUDA)")
    ap.add_argument("--compare-layout", action="store_true", help="also time eager training steps NCHW vs channels_last")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's 128 (tiny: 4)")
    ap.add_argument("--iters", type=int, default=None, help="timed optimizer steps (default 20; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first, where compiling happens (default 3)")
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--sample-num", type=int, default=None, help="images per sampling batch (default 512; tiny: 4)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of an unlisted device")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = a.tiny
    batch = a.batch_size or (4 if tiny else PRESETS["cifar10"].batch_size)
    iters, warmup = a.iters or (2 if tiny else 20), a.warmup if a.warmup is not None else (1 if tiny else 3)
    sample_num, repeats = a.sample_num or (4 if tiny else 512), 1 if tiny else 3
    settings = device_settings(dev.type)
    if a.channels_last != "auto":
        settings = dataclasses.replace(settings, channels_last=a.channels_last == "on")
    apply_global(settings)
    preset = PRESETS["cifar10"]
    m = for_data(preset.model, resolution=32, channels=3, width=8 if tiny else None, what="cifar10 preset")
    schedule = Schedule()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    peak = a.peak_tflops or (peak_tflops(name) if dev.type == "cuda" else None)
    res = {"device": name, "device_type": dev.type, "torch": torch.__version__, "precision": a.precision,
           "compile": a.compile, "settings": dataclasses.asdict(settings), "batch_size": batch, "tiny": tiny,
           "peak_tflops": peak}
    torch.manual_seed(0)
    net = prepare_network(build_network(m, preset.param).to(dev), settings)
    res["parameters"] = count_parameters(net)
    print(f"device: {name} ({dev.type}), torch {torch.__version__}, {a.precision}{run_note(settings, a.compile)}")
    print(f"cifar10 preset: {res['parameters']:,} parameters, 3x32x32, batch {batch}, {iters} timed steps "
          f"after {warmup}", flush=True)
    g = torch.Generator().manual_seed(0)
    data = Dataset(x=(torch.rand(max(256, batch), 3, 32, 32, generator=g) * 2 - 1).to(dev), y=None, num_classes=0,
                   kind="image", name="random")

    # 1. teacher training
    den = compile_denoiser(Denoiser(net, schedule=schedule, param=preset.param), a.compile)
    ema = EMA(net, preset.ema_decay)
    opt = adamw(net.parameters(), lr=preset.lr, weight_decay=preset.weight_decay, settings=settings)

    def train_loss(step: int, micro: int, den=den) -> torch.Tensor:
        b = teacher_batch(data, step=step, seed=0, batch_size=batch, hflip=True, label_dropout=0.0, device=dev)
        return diffusion_loss(den, b, slice(None), schedule=schedule, weighting="snr_trunc", class_cond=False)

    t_train = step_seconds(den, net, opt, train_loss, ema=ema, precision=a.precision, dev=dev, warmup=warmup,
                           iters=iters)
    res.update(train_step_s=t_train, train_images_per_s=batch / t_train)
    print(f"teacher training:          {batch / t_train:,.1f} images/s ({t_train * 1e3:.1f} ms/step)", flush=True)

    # model FLOPs of one training step, eager (FlopCounterMode sees aten ops), attention by formula where needed
    eager = Denoiser(net, schedule=schedule, param=preset.param)
    b0 = teacher_batch(data, step=0, seed=0, batch_size=batch, hflip=True, label_dropout=0.0, device=dev)

    def one_step():
        with autocast(a.precision, dev):
            loss = diffusion_loss(eager, b0, slice(None), schedule=schedule, weighting="snr_trunc", class_cond=False)
        loss.backward()
        net.zero_grad(set_to_none=True)

    flops, per_op = count_flops(one_step)
    attn = sum(v for k, v in per_op.items() if "attention" in k)
    mfu = flops / t_train / (peak * 1e12) if peak else None
    res.update(train_flops=flops, attention_flops=attn, train_mfu=mfu, flops_per_op=per_op)
    print(f"model FLOPs per step:      {flops / 1e12:.3f} TFLOP (attention {100 * attn / max(flops, 1):.1f}%); "
          f"MFU {_pct(mfu)} of {f'{peak:g} TFLOP/s dense bf16' if peak else 'n/a (no peak known for this device)'}",
          flush=True)

    # 2. distillation step: frozen float32 teacher (twice), student step
    teacher = compile_denoiser(Denoiser(copy.deepcopy(ema.net), schedule=schedule, param=preset.param), a.compile)
    teacher.eval().requires_grad_(False)
    student_net = prepare_network(build_network(dataclasses.replace(m, dropout=0.0), preset.param).to(dev), settings)
    student_net.load_state_dict(net.state_dict())
    student = compile_denoiser(Denoiser(student_net, schedule=schedule, param=preset.param), a.compile)
    sopt = adamw(student_net.parameters(), lr=preset.distill_lr, weight_decay=0.0, settings=settings)

    def distill_loss(step: int, micro: int) -> torch.Tensor:
        b = distill_batch(data, seed=0, round_idx=0, step=step, batch_size=batch, num_steps=4, device=dev, hflip=True)
        return distillation_loss(student, teacher, b, slice(None), num_steps=4, schedule=schedule,
                                 weighting="snr_trunc", class_cond=False)

    t_distill = step_seconds(student, student_net, sopt, distill_loss, ema=None, precision=a.precision, dev=dev,
                             warmup=warmup, iters=iters)
    ratio = t_distill / t_train
    res.update(distill_step_s=t_distill, distill_over_train=ratio)
    print(f"distillation / training:   {ratio:.2f} per step ({t_distill * 1e3:.1f} ms; target <= 1.7: "
          f"{'PASS' if ratio <= 1.7 else 'MISS'})", flush=True)

    # 3. DDIM sampling, under the precision's autocast and in float32 (progdistill sample)
    card = ModelCard(model=m, param=preset.param, schedule=schedule, data={"kind": "image", "shape": [3, 32, 32]})
    sampler = compile_denoiser(Denoiser(ema.net, schedule=schedule, param=preset.param), a.compile)
    for prec in dict.fromkeys([a.precision, "fp32"]):
        rate = sample_rate(sampler, card, steps=a.sample_steps, num=sample_num, precision=prec, dev=dev,
                           repeats=repeats)
        res[f"ddim_images_per_s_{prec}"] = rate
        print(f"DDIM sampling ({prec}):      {rate:,.1f} images/s at {a.sample_steps} steps, batch {sample_num} "
              f"({rate * a.sample_steps:,.0f} network evaluations/s)", flush=True)
    x1 = torch.randn(sample_num, 3, 32, 32, device=dev)
    tau = torch.full((sample_num,), 500.0, device=dev)
    with torch.no_grad(), autocast(a.precision, dev):
        fwd, _ = count_flops(lambda: ema.net(x1, tau))
    rate = res[f"ddim_images_per_s_{a.precision}"]
    s_mfu = fwd / sample_num * a.sample_steps * rate / (peak * 1e12) if peak else None
    res.update(forward_flops_per_image=fwd / sample_num, sample_mfu=s_mfu)
    print(f"sampling MFU ({a.precision}):      {_pct(s_mfu)} ({fwd / sample_num / 1e9:.2f} GFLOP per image per step)")

    # 5. memory format, eager (no compile: a layout change would recompile)
    if a.compare_layout:
        for cl in (False, True):
            n2 = build_network(m, preset.param).to(dev)
            prepare_network(n2, dataclasses.replace(settings, channels_last=cl))
            d2 = Denoiser(n2, schedule=schedule, param=preset.param)
            o2 = adamw(n2.parameters(), lr=preset.lr, weight_decay=preset.weight_decay, settings=settings)
            t = step_seconds(d2, n2, o2, lambda s, mi, d2=d2: train_loss(s, mi, den=d2), ema=None,
                             precision=a.precision, dev=dev, warmup=1, iters=max(2, iters // 2))
            res[f"eager_step_s_{'channels_last' if cl else 'nchw'}"] = t
        print(f"eager training step:       NCHW {res['eager_step_s_nchw'] * 1e3:.1f} ms, channels_last "
              f"{res['eager_step_s_channels_last'] * 1e3:.1f} ms", flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
