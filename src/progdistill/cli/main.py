"""Command line: `progdistill {demo,prepare,train,distill,sample,eval,report,export,presets}`. Parses and calls; no maths here."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from progdistill.errors import UserError

EXAMPLES = {
    "demo": """examples:
  progdistill demo                       # digits: teacher, distil 256 -> 1 step, grids, table, report (~10 min)
  progdistill demo --quick --out runs/q  # a 2-minute smoke run
  progdistill demo --guided              # guided distillation of a class-conditional teacher (~10 min)""",
    "prepare": """examples:
  progdistill prepare --data cifar10:~/cifar-10-batches-py --out data/cifar10-train
  progdistill prepare --data cifar10:~/cifar-10-batches-py --split heldout --out data/cifar10-test
  progdistill prepare --data folder:~/pics --resolution 64 --channels 3 --out data/pics64
  progdistill train --data prepared:data/cifar10-train --preset cifar10 --out runs/c10   # read per batch

writes DIR/images.u8 (N x C x H x W uint8), DIR/labels.npy and DIR/header.json, built beside DIR
and renamed into place; training, distillation and evaluation read only the examples each batch needs.""",
    "train": """examples:
  progdistill train --data digits --out runs/teacher
  progdistill train --data toy:moons --out runs/moons --iters 2000
  progdistill train --data folder:~/pics --preset small --out runs/pics   # the images' own size and colour
  progdistill train --data folder:~/pics --preset small --resolution 32 --channels 1 --width 16 --out runs/p32
  progdistill train --data folder:~/pics --preset cifar10 --out runs/pics --precision bf16
  torchrun --nproc_per_node=2 -m progdistill.cli train --data digits --out runs/ddp
  progdistill train --out runs/teacher --resume   # continue exactly where it stopped""",
    "distill": """examples:
  progdistill distill --teacher runs/teacher --out runs/distill
  progdistill distill --teacher runs/teacher --out runs/d4 --final-steps 4 --iters-per-round 500
  progdistill distill --teacher runs/eps-teacher --out runs/d --student-param v
  progdistill distill --teacher diffusers:~/ddpm-digits --data digits --out runs/d   # a diffusers DDPMPipeline folder
  progdistill distill --teacher runs/cond --guided --w-max 4 --final-steps 1 --out runs/gd   # guided: runs/gd/guided, steps-*""",
    "sample": """examples:
  progdistill sample --model runs/teacher --steps 256 --num 64 --out teacher.png
  progdistill sample --model runs/distill/steps-0004 --steps 4 --num 64 --out pd4.png --npz pd4.npz
  progdistill sample --model runs/teacher --steps 64 --sampler ancestral --logvar-frac 0.3 --out anc.png
  progdistill sample --model runs/cond --steps 256 --guidance 2 --class 3 --out guided.png   # 512 evaluations
  progdistill sample --model runs/gd/steps-0004 --guidance 2 --sampler stochastic --out gd4.png  # 4 evaluations""",
    "export": """examples:
  progdistill export runs/distill/steps-0004 --out exported/pd4   # one student
  progdistill export runs/distill --out exported/pd-last            # a distillation run: its last finished round
  progdistill export runs/teacher --out exported/teacher --force    # a teacher (EMA weights); replace the folder

writes a diffusers DDIMPipeline folder (unet/, scheduler/, model_index.json) plus README.md (the exact
diffusers call, valid N, provenance, eval.json figures) and progdistill_export.json. Sample it with
  DiffusionPipeline.from_pretrained(DIR)(num_inference_steps=N, eta=0.0, use_clipped_model_output=True, ...)
Students export when N divides T (1024 for the cosine schedule); eps, x and v models export, `both` and
vector (MLP) models do not.""",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="progdistill", description="Progressive distillation of diffusion models "
                                "(Salimans & Ho, ICLR 2022).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $PROGDISTILL_THREADS or torch's choice). On a small, busy "
                        "machine 1 can be several times faster than 2")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    d = add("demo", "the whole method on built-in digits: teacher, distillation, grids, table, report")
    d.add_argument("--out", default="runs/demo", help="output folder (a finished teacher there is reused)")
    d.add_argument("--quick", action="store_true", help="tiny budgets (~2 minutes), for smoke tests")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-eval", type=int, default=None, help="samples per evaluated sampler (0: skip evaluation)")
    d.add_argument("--teacher-iters", type=int, default=None, help="override the teacher budget (no time limit)")
    d.add_argument("--iters-per-round", type=int, default=None, help="override the distillation budget (no time limit)")
    d.add_argument("--last-rounds-factor", type=float, default=None)
    d.add_argument("--guided", action="store_true", help="guided distillation instead: class-conditional teacher, "
                   "stage 1 + 2 to 1 step, class x w grids, FD vs class accuracy per w (~10 min)")

    q = add("prepare", "convert image data once into uint8 on disk, read per batch with --data prepared:DIR")
    q.add_argument("--data", required=True, help="digits | folder:PATH | npz:PATH | cifar10:PATH")
    q.add_argument("--out", required=True, help="folder to write (must not exist)")
    q.add_argument("--split", default="train", choices=["train", "heldout", "test", "all"])
    q.add_argument("--resolution", type=int, help="image side (default: the data's own); said in one line")
    q.add_argument("--channels", type=int, choices=[1, 3], help="1 (grayscale) or 3 (RGB); default: the data's own")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = add("train", "train a teacher (paper Algorithm 1)")
    t.add_argument("--data", default="digits",
                   help="digits | toy:NAME | folder:PATH | npz:PATH | cifar10:PATH | prepared:DIR")
    t.add_argument("--preset", default=None, help="model preset (see `progdistill presets`)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resolution", type=int, help="image side (default: the data's own; folder: the most common size); "
                   "other sizes are resized and centre-cropped, said in one line. Frozen for --resume")
    t.add_argument("--channels", type=int, choices=[1, 3], help="1 (grayscale) or 3 (RGB); default: the data's own "
                   "(folder: 3 if any image has colour)")
    t.add_argument("--width", type=int, help="base width: the UNet's first-level channels, the others scaled in "
                   "proportion (MLP: hidden size); default: the preset's")
    t.add_argument("--depth", type=int, help="residual blocks per UNet level (MLP: hidden layers); default: the preset's")
    t.add_argument("--iters", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--param", choices=["x", "v", "eps", "both"])
    t.add_argument("--weighting", default="snr_trunc", choices=["const", "snr", "snr_trunc", "snr_plus_one"])
    t.add_argument("--dropout", type=float)
    t.add_argument("--logsnr-shift", type=float, default=0.0,
                   help="shift the cosine logSNR schedule by S (Hoogeboom et al. 2023; range kept [-20, 20]): S > 0 "
                        "adds less noise at every t, S < 0 more; stored in the model card; default 0, the paper's "
                        "schedule (on 8x8 digits both signs measured worse: README)")
    t.add_argument("--ema-decay", type=float)
    t.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                   help="use --ema-decay from the first step (default: min(decay, (1 + n) / (10 + n)), which stays "
                        "below 0.999 for the first 9,000 steps)")
    t.add_argument("--lr-decay", choices=["constant", "cosine"], default=None,
                   help="after warm-up: constant lr, or a cosine decay to --lr-final-frac x lr (default: the preset's)")
    t.add_argument("--lr-final-frac", type=float, default=0.02)
    t.add_argument("--warmup", type=int)
    t.add_argument("--class-cond", action="store_true", help="class-conditional (with a null class for guidance)")
    t.add_argument("--label-dropout", type=float, default=0.1)
    t.add_argument("--normalize", default="standard", choices=["standard", "minmax", "none"],
                   help="vector data: per-dimension zero mean / unit variance (standard), range to [-1, 1] (minmax) "
                        "or none; stored in the model card and inverted when sampling. Images stay in [-1, 1]")
    t.add_argument("--sample-steps", type=int, default=256, help="DDIM steps for the final sample grid")
    _common_run_args(t, checkpoint_every=1000)

    s = add("distill", "progressive distillation (paper Algorithm 2) of a trained teacher")
    s.add_argument("--teacher", required=True, help="teacher run folder (its EMA weights are used), or diffusers:PATH "
                   "(a diffusers pipeline folder with a UNet2DModel unet and a DDPM/DDIM-style scheduler)")
    s.add_argument("--out", required=True, help="distillation run folder")
    s.add_argument("--data", default=None, help="data to draw x from (default: the teacher's; required for diffusers:)")
    s.add_argument("--start-steps", type=int, help="N0, the teacher's DDIM steps (power of two; default: the preset's, "
                   "or for an imported T-step teacher the largest power of two <= T, e.g. 512 for T = 1000)")
    s.add_argument("--final-steps", type=int, default=1, help="N1 (power of two, < N0)")
    s.add_argument("--iters-per-round", type=int)
    s.add_argument("--last-rounds-factor", type=float, default=1.0, help="train the last two rounds F x longer")
    s.add_argument("--round-iters", default=None,
                   help="iterations per round as a comma list, N0/2 first (e.g. 200,150,100,100,100,100,150,300); "
                        "overrides --iters-per-round and --last-rounds-factor")
    s.add_argument("--lr", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--weighting", default="snr_trunc", choices=["const", "snr", "snr_trunc", "snr_plus_one"])
    s.add_argument("--student-param", choices=["v", "x", "both"])
    s.add_argument("--student-ema", type=float, default=0.0, help="EMA decay of the student within each round, "
                   "reset every round; the round's model (and next teacher) is then the EMA (default 0: none, as in "
                   "the paper's released configs)")
    s.add_argument("--guided", action="store_true", help="guided distillation (Meng et al. 2023) of a class-conditional "
                   "teacher trained with label dropout: stage 1 into OUT/guided (a w-conditioned model), then the rounds")
    s.add_argument("--w-min", type=float, default=0.0, help="--guided: smallest guidance strength w trained")
    s.add_argument("--w-max", type=float, default=4.0, help="--guided: largest w trained (the paper's pixel-space range)")
    s.add_argument("--guided-iters", type=int, default=None, help="--guided: stage-1 iterations (default --iters-per-round)")
    _common_run_args(s, checkpoint_every=200)

    m = add("sample", "sample from a teacher run or a distilled model")
    m.add_argument("--model", required=True, help="run folder, distillation run (latest round), steps-NNNN or "
                   "diffusers:PATH")
    m.add_argument("--steps", type=int, default=None, help="sampling steps (default: what the model was distilled for)")
    m.add_argument("--num", type=int, default=64)
    m.add_argument("--out", default=None, help="PNG grid (images) or scatter plot (vectors)")
    m.add_argument("--npz", default=None, help="also save samples as .npz (uint8 images / float vectors)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--sampler", default="ddim", choices=["ddim", "ancestral", "dpmpp2m", "stochastic"],
                   help="stochastic: the N-step sampler for distilled students (2/N DDIM jump, then re-noise)")
    m.add_argument("--logvar-frac", type=float, default=0.0, help="ancestral: 0 fixed_small .. 1 fixed_large")
    m.add_argument("--class", dest="class_label", type=int, default=None)
    m.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance w >= 0: x = (1 + w) x_c - w x_null (diffusers' guidance_scale "
                        "= 1 + w); class-conditional teachers (2 evaluations per step) and --guided students (1)")
    m.add_argument("--batch-size", type=int, default=500)
    _compile_arg(m)

    x = add("export", "write a model as a diffusers DDIMPipeline folder with a README model card")
    x.add_argument("model", metavar="MODEL", help="teacher run, distillation run (its last round), steps-NNNN folder "
                                                  "or diffusers:DIR (an imported teacher, exported with its own betas)")
    x.add_argument("--out", required=True, help="output folder (built beside it, then renamed into place)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")

    r = sub.add_parser("presets", help="list model presets: parameters, default shape, measured training speed")
    r.add_argument("--measure", action="store_true", help="also time each preset here (3 training steps at the "
                   "table's batch; slow for the paper presets)")

    try:
        from progdistill.eval.evaluate import add_eval_parser
        from progdistill.eval.report import add_report_parser
        add_eval_parser(sub)
        add_report_parser(sub)
        from progdistill.eval.guided import add_eval_guided_parser
        add_eval_guided_parser(sub)
    except ImportError:  # evaluation modules are optional until installed
        pass
    return p


def _common_run_args(p: argparse.ArgumentParser, checkpoint_every: int) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    p.add_argument("--keep-last", type=int, default=3, help="training states kept (model folders are never deleted)")
    p.add_argument("--time-limit", type=float, default=None, help="minutes; saves and exits cleanly, ready to --resume")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes reading streamed data "
                   "(prepared:, large folders); 0 reads in the training process, often fastest on CPU")
    p.add_argument("--log-every", type=int, default=25, help="steps between metrics lines in metrics.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _compile_arg(p)


def _compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the network (backend: inductor when not named; aot_eager only traces). "
                        "Compiling costs seconds to minutes once; saved weights are the same plain files")


def cmd_train(a) -> None:
    from progdistill.train.config import TrainConfig
    from progdistill.train.teacher import train
    cfg = TrainConfig(data=a.data, preset=a.preset, resolution=a.resolution, channels=a.channels, width=a.width,
                      depth=a.depth, iters=a.iters, batch_size=a.batch_size, lr=a.lr, param=a.param,
                      weighting=a.weighting, dropout=a.dropout, ema_decay=a.ema_decay, warmup=a.warmup,
                      class_cond=a.class_cond, label_dropout=a.label_dropout, normalize=a.normalize, seed=a.seed,
                      lr_decay=a.lr_decay, lr_final_frac=a.lr_final_frac, ema_warmup=a.ema_warmup,
                      precision=a.precision,
                      grad_accum=a.grad_accum, checkpoint_every=a.checkpoint_every, keep_last=a.keep_last,
                      time_limit=a.time_limit, log_every=a.log_every, workers=a.workers, compile=a.compile)
    if a.logsnr_shift:
        cfg.schedule = {**cfg.schedule, "logsnr_shift": a.logsnr_shift}
    out = train(cfg, a.out, resume=a.resume, progress=not a.no_progress)
    from progdistill.train.loop import init_distributed
    if init_distributed().is_main and (Path(out) / "ema").is_dir():
        from progdistill.data.images import save_samples
        from progdistill.pipeline import load
        model = load(out, compile=a.compile)
        x = model.sample(num=100, steps=a.sample_steps, seed=a.seed, progress=not a.no_progress)
        path = save_samples(x, Path(out) / f"samples-ddim{a.sample_steps}.png", title=f"teacher, DDIM {a.sample_steps}",
                            nrow=10)
        print(f"wrote {path}")


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes a comma list of integers, got {text!r}") from None


def cmd_distill(a) -> None:
    from progdistill.train.config import DistillConfig
    from progdistill.train.distill import distill
    cfg = DistillConfig(teacher=a.teacher, data=a.data, start_steps=a.start_steps, final_steps=a.final_steps,
                        iters_per_round=a.iters_per_round, last_rounds_factor=a.last_rounds_factor, lr=a.lr,
                        round_iters=_int_list(a.round_iters, '--round-iters'),
                        batch_size=a.batch_size, weighting=a.weighting, student_param=a.student_param,
                        ema_decay=a.student_ema, seed=a.seed, precision=a.precision, grad_accum=a.grad_accum,
                        checkpoint_every=a.checkpoint_every, keep_last=a.keep_last, time_limit=a.time_limit,
                        log_every=a.log_every, guided=a.guided, w_min=a.w_min, w_max=a.w_max,
                        guided_iters=a.guided_iters, workers=a.workers, compile=a.compile)
    out = distill(cfg, a.out, resume=a.resume, progress=not a.no_progress)
    print(f"distillation run: {out}")


def cmd_prepare(a) -> None:
    from progdistill.data.prepare import prepare
    prepare(a.data, a.out, split=a.split, resolution=a.resolution, channels=a.channels, progress=not a.no_progress)


def cmd_sample(a) -> None:
    import numpy as np

    from progdistill.data.images import save_samples, to_uint8
    from progdistill.nets.device import apply_global, device_settings
    from progdistill.pipeline import load
    model = load(a.model, compile=a.compile)
    apply_global(device_settings(model.device.type))     # TF32 matmuls on CUDA
    x = model.sample(num=a.num, steps=a.steps, seed=a.seed, sampler=a.sampler, logvar_frac=a.logvar_frac,
                     class_label=a.class_label, batch_size=a.batch_size, guidance=a.guidance, progress=True)
    title = f"{a.sampler} {a.steps or model.card.steps or 256}" + ("" if a.guidance is None else f", w = {a.guidance:g}")
    if a.out:
        print(f"wrote {save_samples(x, Path(a.out), title=title)}")
    if a.npz:
        arr = to_uint8(x) if x.dim() == 4 else x.numpy()
        np.savez_compressed(a.npz, x=arr)
        print(f"wrote {a.npz} ({arr.shape})")
    if not a.out and not a.npz:
        raise UserError("nothing to write: pass --out grid.png and/or --npz samples.npz")


def cmd_export(a) -> None:
    from progdistill.interop.export import export_model
    print(export_model(a.model, a.out, force=a.force))


def cmd_presets(a) -> None:
    import torch

    from progdistill.nets.build import build_network, count_parameters
    from progdistill.nets.presets import MEASURED_ON, MEASURED_SPEED, PRESETS
    from progdistill.train.teacher import measure_train_speed

    def rate(v: float) -> str:
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"

    print("A preset names an architecture and a size; the data gives the shape (--resolution, --channels and "
          "--width override).\n`train/s`: training examples/s at the preset's default shape and the batch in brackets, "
          f"measured on {MEASURED_ON}.")
    print(f"{'preset':<11} {'params':>12}  {'shape':<9} {'batch':>5} {'lr':>7} {'N0':>5}  {'train/s':>13}"
          + ("  here/s" if a.measure else "") + "  description")
    for name, p in PRESETS.items():
        n = count_parameters(build_network(p.model, p.param))
        shape = f"{p.model.channels}x{p.model.resolution}x{p.model.resolution}" if p.model.kind == "unet" else "vectors"
        value, batch = MEASURED_SPEED.get(name, (None, 1))
        speed = f"{rate(value)} ({batch})" if value else "n/a on CPU"
        here = f"  {rate(measure_train_speed(p, batch_size=batch)):>6}" if a.measure else ""
        print(f"{name:<11} {n:>12,}  {shape:<9} {p.batch_size:>5} {p.lr:>7.0e} {p.distill_start_steps:>5}  "
              f"{speed:>13}{here}  {p.description}")
    print(f"(torch threads now: {torch.get_num_threads()}; set with --threads)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    threads = args.threads or int(os.environ.get("PROGDISTILL_THREADS", "0") or 0)
    if threads:
        import torch
        torch.set_num_threads(threads)
    handlers = {"prepare": cmd_prepare, "train": cmd_train, "distill": cmd_distill, "sample": cmd_sample, "export": cmd_export,
                "presets": cmd_presets}
    try:
        if args.command == "demo" and args.guided:
            from progdistill.demo.guided import run_guided_demo
            run_guided_demo(out=Path(args.out if args.out != "runs/demo" else "runs/demo-guided"), quick=args.quick,
                            seed=args.seed, num_eval=args.num_eval)
        elif args.command == "demo":
            from progdistill.demo.plain import run_demo
            run_demo(out=Path(args.out), quick=args.quick, seed=args.seed, num_eval=args.num_eval,
                     teacher_iters=args.teacher_iters, iters_per_round=args.iters_per_round,
                     last_rounds_factor=args.last_rounds_factor)
        elif args.command in handlers:
            handlers[args.command](args)
        else:
            args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
