"""`progdistill train` and `progdistill distill`: parsers and handlers. Only typed flags reach the configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from progdistill.cli import common
from progdistill.cli.common import RUN_FIELDS, add_command, add_run_args, given_fields, needs, value
from progdistill.errors import UserError

TRAIN_EXAMPLES = """examples:
  progdistill train --data digits --out runs/teacher
  progdistill train --data toy:moons --out runs/moons --iters 2000
  progdistill train --data folder:~/pics --preset small --out runs/pics   # the images' own size and colour
  progdistill train --data folder:~/pics --preset small --resolution 32 --channels 1 --width 16 --out runs/p32
  progdistill train --data folder:~/pics --preset cifar10 --out runs/pics --precision bf16
  torchrun --nproc_per_node=2 -m progdistill.cli train --data digits --out runs/ddp
  progdistill train --out runs/teacher --resume   # continue exactly where it stopped"""
DISTILL_EXAMPLES = """examples:
  progdistill distill --teacher runs/teacher --out runs/distill
  progdistill distill --teacher runs/teacher --out runs/d4 --final-steps 4 --iters-per-round 500
  progdistill distill --teacher runs/eps-teacher --out runs/d --student-param v
  progdistill distill --teacher diffusers:~/ddpm-digits --data digits --out runs/d   # a diffusers DDPMPipeline folder
  progdistill distill --teacher runs/cond --guided --w-max 4 --final-steps 1 --out runs/gd   # guided: runs/gd/guided, steps-*
  progdistill distill --teacher runs/teacher --out runs/db --budget 1 --teacher-examples 192000   # what training spent
  progdistill distill --out runs/distill --resume   # continue exactly where it stopped"""

WEIGHTINGS = ["const", "snr", "snr_trunc", "snr_plus_one"]
# {args dest: TrainConfig field}; --logsnr-shift becomes `schedule`, --sample-steps is the handler's
TRAIN_FIELDS = {**{name: name for name in (
    "data", "preset", "resolution", "channels", "width", "depth", "iters", "batch_size", "lr", "param", "weighting",
    "dropout", "ema_decay", "warmup", "class_cond", "label_dropout", "normalize", "lr_decay", "lr_final_frac",
    "ema_warmup")}, **RUN_FIELDS}
# {args dest: DistillConfig field}; --round-iters is parsed into a list first
DISTILL_FIELDS = {**{name: name for name in (
    "teacher", "data", "start_steps", "final_steps", "iters_per_round", "last_rounds_factor", "lr", "batch_size",
    "weighting", "student_param", "guided", "w_min", "w_max", "guided_iters", "budget", "teacher_examples",
    "switch_factor", "target_clip")}, "student_ema": "ema_decay",
    **RUN_FIELDS}
BUDGET_HELP = ("distillation examples E (iterations x global batch) summed over all rounds, a whole number; with "
               "--teacher-examples E0 a fraction: E = F x E0. Round r gets weight w_r = 1, times "
               "--last-rounds-factor for the last two rounds, times --switch-factor for the first round when the "
               "student's parameterisation differs from the teacher's (eps -> v); iters_r = floor(E w_r / sum(w) / "
               "batch), the iterations left going to the largest remainders: never more than E in all. Not with "
               "--iters-per-round or --round-iters")


def train_given(a: argparse.Namespace) -> dict:
    """The TrainConfig fields typed on the command line."""
    given = given_fields(a, TRAIN_FIELDS)
    if a.logsnr_shift is not None:
        given["schedule"] = {"kind": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0, "logsnr_shift": a.logsnr_shift}
    return given


def distill_given(a: argparse.Namespace) -> dict:
    """The DistillConfig fields typed on the command line. Guidance flags are checked by `distill` once it knows the
    teacher (a guidance-distilled teacher takes them without --guided)."""
    given = given_fields(a, DISTILL_FIELDS)
    if a.round_iters is not None:
        given["round_iters"] = common.int_list(a.round_iters, "--round-iters")
    if not a.resume:     # on --resume the run records the teacher and whether it is guided
        if a.teacher is None:
            raise UserError("distill needs --teacher RUN (a teacher run folder or diffusers:PATH), or --resume to "
                            "continue the run in --out")
    return given


def cmd_train(a: argparse.Namespace) -> None:
    given = train_given(a)
    common.check_typed_seed(a)
    sample_steps = value(a.sample_steps, 256)
    with needs("train"):
        from progdistill.data.images import save_samples
        from progdistill.pipeline import load
        from progdistill.train.config import TrainConfig
        from progdistill.train.loop import finish_distributed, init_distributed
        from progdistill.train.teacher import train
    out = train(TrainConfig(**given), a.out, resume=bool(a.resume), progress=not a.no_progress)
    is_main = init_distributed().is_main
    finish_distributed()                 # every rank leaves together; rank 0 then samples alone
    if is_main and (Path(out) / "ema").is_dir():
        model = load(out, compile=a.compile)
        x = model.sample(num=100, steps=sample_steps, seed=value(a.seed, 0), progress=not a.no_progress)
        path = save_samples(x, Path(out) / f"samples-ddim{sample_steps}.png", title=f"teacher, DDIM {sample_steps}",
                            nrow=10)
        print(f"wrote {path}")


def cmd_distill(a: argparse.Namespace) -> None:
    given = distill_given(a)
    common.check_typed_seed(a)
    with needs("distill"):
        from progdistill.train.config import DistillConfig
        from progdistill.train.distill import distill
        from progdistill.train.loop import finish_distributed
    out = distill(DistillConfig(**given), a.out, resume=bool(a.resume), progress=not a.no_progress)
    finish_distributed()
    print(f"distillation run: {out}")


def add_train_parser(sub) -> None:
    t = add_command(sub, "train", "train a teacher (paper Algorithm 1)", cmd_train,
                    TRAIN_EXAMPLES + common.resume_help("train"))
    t.add_argument("--data", default=None,
                   help="digits | toy:NAME | folder:PATH | npz:PATH | cifar10:PATH | prepared:DIR (default: digits)")
    t.add_argument("--preset", default=None, help="model preset (see `progdistill presets`)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resolution", type=int, help="image side (default: the data's own; folder: the most common size); "
                   "other sizes are resized and centre-cropped, said in one line. Frozen for --resume")
    t.add_argument("--channels", type=int, choices=[1, 3], help="1 (grayscale) or 3 (RGB); default: the data's own "
                   "(folder: 3 if any image has colour)")
    t.add_argument("--width", type=int, help="base width: the UNet's first-level channels, the others scaled in "
                   "proportion (MLP: hidden size); default: the preset's")
    t.add_argument("--depth", type=int, help="residual blocks per UNet level (MLP: hidden layers); default: the preset's")
    t.add_argument("--iters", type=int, help="training iterations (default: the preset's); may grow on --resume")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--param", choices=["x", "v", "eps", "both"])
    t.add_argument("--weighting", default=None, choices=WEIGHTINGS, help="default snr_trunc")
    t.add_argument("--dropout", type=float)
    t.add_argument("--logsnr-shift", type=float, default=None,
                   help="shift the cosine logSNR schedule by S (Hoogeboom et al. 2023; range kept [-20, 20]): S > 0 "
                        "adds less noise at every t, S < 0 more; stored in the model card; default 0, the paper's "
                        "schedule (on 8x8 digits both signs measured worse: README)")
    t.add_argument("--ema-decay", type=float)
    t.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false", default=None,
                   help="use --ema-decay from the first step (default: min(decay, (1 + n) / (10 + n)), which stays "
                        "below 0.999 for the first 9,000 steps)")
    t.add_argument("--lr-decay", choices=["constant", "cosine"], default=None,
                   help="after warm-up: constant lr, or a cosine decay to --lr-final-frac x lr (default: the preset's)")
    t.add_argument("--lr-final-frac", type=float, default=None, help="default 0.02")
    t.add_argument("--warmup", type=int)
    t.add_argument("--class-cond", action="store_true", default=None,
                   help="class-conditional (with a null class for guidance)")
    t.add_argument("--label-dropout", type=float, default=None, help="default 0.1")
    t.add_argument("--normalize", default=None, choices=["standard", "minmax", "none"],
                   help="vector data: per-dimension zero mean / unit variance (standard, the default), range to "
                        "[-1, 1] (minmax) or none; stored in the model card and inverted when sampling. Images stay "
                        "in [-1, 1]")
    t.add_argument("--sample-steps", type=int, default=None, help="DDIM steps for the final sample grid (default 256)")
    add_run_args(t, checkpoint_every=1000)


def add_distill_parser(sub) -> None:
    s = add_command(sub, "distill", "progressive distillation (paper Algorithm 2) of a trained teacher", cmd_distill,
                    DISTILL_EXAMPLES + common.resume_help("distill"))
    s.add_argument("--teacher", default=None, help="teacher run folder (its EMA weights are used), or diffusers:PATH "
                   "(a diffusers pipeline folder with a UNet2DModel unet and a DDPM/DDIM-style scheduler); required "
                   "unless --resume")
    s.add_argument("--out", required=True, help="distillation run folder")
    s.add_argument("--data", default=None, help="data to draw x from (default: the teacher's; required for diffusers:)")
    s.add_argument("--start-steps", type=int, help="N0, the teacher's DDIM steps (power of two; default: the preset's, "
                   "or for an imported T-step teacher the largest power of two <= T, e.g. 512 for T = 1000: on a "
                   "diffusers-trained teacher it measured far better than 64, README)")
    s.add_argument("--final-steps", type=int, default=None, help="N1 (power of two, < N0; default 1)")
    s.add_argument("--iters-per-round", type=int)
    s.add_argument("--last-rounds-factor", type=float, default=None,
                   help="train the last two rounds F x longer (default 1; imported diffusers: teachers 3, which "
                        "measured best on a diffusers-trained teacher: README)")
    s.add_argument("--round-iters", default=None,
                   help="iterations per round as a comma list, N0/2 first (e.g. 200,150,100,100,100,100,150,300); "
                        "overrides --iters-per-round and --last-rounds-factor")
    s.add_argument("--budget", type=float, default=None, help=BUDGET_HELP)
    s.add_argument("--teacher-examples", type=int, default=None,
                   help="E0, the teacher's training examples (iterations x batch): --budget F is then the fraction "
                        "F of E0 (1: spend what training spent). An own teacher run's is said in the start line")
    s.add_argument("--switch-factor", type=float, default=None,
                   help="weight S of the first round when the student's parameterisation differs from the teacher's "
                        "(eps teacher -> v student), in --budget's sharing or, without it, times --iters-per-round "
                        "(default 1)")
    s.add_argument("--target-clip", action="store_true", default=None,
                   help="clamp the teacher's x predictions inside the distillation target to its sampling range, as "
                        "its own image sampler does (default: unclipped, as in the paper's released code)")
    s.add_argument("--lr", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--weighting", default=None, choices=WEIGHTINGS, help="default snr_trunc")
    s.add_argument("--student-param", choices=["v", "x", "both"])
    s.add_argument("--student-ema", type=float, default=None, help="EMA decay of the student within each round, "
                   "reset every round; the round's model (and next teacher) is then the EMA (default 0: none, as in "
                   "the paper's released configs)")
    s.add_argument("--guided", action="store_true", default=None, help="guided distillation (Meng et al. 2023) of a "
                   "class-conditional teacher trained with label dropout: stage 1 into OUT/guided (a w-conditioned "
                   "model), then the rounds")
    s.add_argument("--w-min", type=float, default=None, help="--guided: smallest guidance strength w trained (default 0)")
    s.add_argument("--w-max", type=float, default=None,
                   help="--guided: largest w trained (default 4, the paper's pixel-space range)")
    s.add_argument("--guided-iters", type=int, default=None, help="--guided: stage-1 iterations (default --iters-per-round)")
    add_run_args(s, checkpoint_every=200)


def add_parsers(sub) -> None:
    add_train_parser(sub)
    add_distill_parser(sub)
