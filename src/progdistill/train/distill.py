"""Progressive distillation: paper Algorithm 2, round by round (docs/method.md §6).

The target is a pure function (`two_teacher_steps`, `x_target`, `distillation_target`); the round
loop is explicit: copy the teacher, fresh optimizer (and student EMA, if `ema_decay` > 0: it is then
the round's model), train, publish `steps-NNNN/` (written once), then name it `latest` in the run
card. The round and N live in the checkpoint, never in step arithmetic.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from progdistill.data.datasets import Dataset, load_data, random_hflip
from progdistill.data.normalize import Normalizer
from progdistill.data.stream import FLIP_KEY, StepLoader, chunk_noise
from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.guided import WDenoiser
from progdistill.diffusion.losses import weighted_x_loss
from progdistill.diffusion.parameterization import output_channels
from progdistill.diffusion.schedules import Schedule, default_start_steps, noised
from progdistill.diffusion.targets import distillation_target
from progdistill.errors import UserError
from progdistill.nets.build import count_parameters
from progdistill.nets.compile import plain_state_dict
from progdistill.nets.device import prepare_denoiser, prepare_network, run_note, run_settings
from progdistill.nets.presets import get_preset
from progdistill.nets.spec import spec_with_param
from progdistill.seeds import generator_for, seed_for
from progdistill.store.atomic import clean_run_folder, torch_save_atomic, write_json
from progdistill.store.card import CARD, ModelCard, is_diffusers_spec, num_classes, read_json, steps_folder_name
from progdistill.store.folders import build_network_from_card, publish_model_folder
from progdistill.store.guided import check_guidable
from progdistill.store.load import load_denoiser, resolved_teacher
from progdistill.store.states import latest_state, load_state, rotate_states, state_name
from progdistill.train.config import DistillConfig, from_dict, to_dict
from progdistill.train.loop import (EMA, MetricsLog, gathered_rng_states, init_distributed, local_slice,
                                    lr_linear_decay, optimize, set_rng_state)
from progdistill.train.optim import adamw, load_optimizer_state, warn_bf16
from progdistill.version import __version__


def student_param_for(teacher_param: str, requested: str | None) -> str:
    """Default: the teacher's parameterization, except eps (cannot predict at alpha ~ 0) -> v."""
    if requested is not None:
        if requested == "eps":
            raise UserError("an eps student cannot make few-step predictions (alpha_1 ~ 0): use v, x or both")
        return requested
    return "v" if teacher_param == "eps" else teacher_param


def init_student(teacher_net: nn.Module, teacher_card: ModelCard, student_param: str) -> nn.Module:
    """A copy of the teacher (dropout 0), built from its card: any recorded architecture, imported or own.

    Across a parameterization switch that changes the output channels (to or from `both`) the output
    layer starts fresh; every other tensor is copied, and a tensor that cannot be is an error, never a
    silent re-initialisation (the paper's eps -> v remedy keeps channels equal, so everything is copied).
    """
    student = build_network_from_card(teacher_card, student_param, dropout=0.0)
    src, own = plain_state_dict(teacher_net.state_dict()), student.state_dict()   # a compiled teacher too
    copied = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    switch = output_channels(teacher_card.param, 1) != output_channels(student_param, 1)
    out_layer = ("conv_out.", "out.")     # UNet2DModel's and MLPModel's output layers
    bad = sorted((set(own) ^ set(src)) | {k for k in set(own) - set(copied) if not (switch and k.startswith(out_layer))})
    if bad:
        raise UserError(f"cannot initialise the student from the teacher: tensors {bad[:4]} do not match "
                        f"(its card and weights disagree); re-export or re-train the teacher")
    student.load_state_dict({**own, **copied})
    return student


def plan_rounds(start_steps: int, final_steps: int, iters_per_round: int, last_rounds_factor: float,
                round_iters: list[int] | None = None) -> list[dict]:
    """One entry per halving: the student's step count N and its iterations (last two rounds x F),
    or `round_iters` given explicitly, one per round in order (N0/2 first)."""
    rounds, n = [], start_steps
    while n > final_steps:
        n //= 2
        rounds.append({"steps": n, "iters": iters_per_round})
    if round_iters is not None:
        if len(round_iters) != len(rounds):
            raise UserError(f"--round-iters lists {len(round_iters)} rounds but {start_steps} -> {final_steps} steps "
                            f"takes {len(rounds)}; give one count per round")
        for r, k in zip(rounds, round_iters):
            r["iters"] = int(k)
        return rounds
    for r in rounds[-2:]:
        r["iters"] = int(round(iters_per_round * last_rounds_factor))
    return rounds


# Imported teachers have no preset: the digits preset's distillation settings serve small (CPU-sized)
# networks, the paper's lr 1e-4 (docs/method.md §6) larger ones; --lr / --iters-per-round / --batch-size override.
IMPORTED_SMALL_PARAMS = 10_000_000


def _iters_text(rounds: list[dict]) -> str:
    its = [r["iters"] for r in rounds]
    return f"{its[0]} iters/round" if len(set(its)) == 1 else f"iters per round {','.join(map(str, its))}"


def resolve_config(cfg: DistillConfig, teacher_card: ModelCard, teacher_run: str, teacher_params: int) -> DistillConfig:
    """Fill unset fields from the teacher's preset and run config (imported teachers: see above)."""
    if is_diffusers_spec(teacher_run):
        if cfg.data is None:
            raise UserError(f"--data is required for an imported teacher ({teacher_run}): the data it was trained on, "
                            f"e.g. --data folder:PATH")
        small = get_preset("digits")
        fill = dict(start_steps=default_start_steps(teacher_card.schedule), iters_per_round=small.distill_iters_per_round,
                    lr=small.distill_lr if teacher_params <= IMPORTED_SMALL_PARAMS else 1e-4, batch_size=64,
                    hflip=False)
    else:
        kind = teacher_card.model.kind if teacher_card.model is not None else "unet"
        preset = get_preset((teacher_card.provenance or {}).get("preset") or ("digits" if kind == "unet" else "mlp"))
        batch, hflip = preset.batch_size, preset.hflip
        if (Path(teacher_run) / "config.json").is_file():
            run = read_json(Path(teacher_run) / "config.json")
            batch, hflip = run.get("batch_size") or batch, run.get("hflip", hflip)   # flips as the teacher trained
        fill = dict(start_steps=preset.distill_start_steps, iters_per_round=preset.distill_iters_per_round,
                    lr=preset.distill_lr, batch_size=batch, data=teacher_card.data["spec"], hflip=bool(hflip))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fill.items() if getattr(cfg, k) is None})
    return cfg.validate()


def student_card(card0: ModelCard, t_card: ModelCard, student_param: str, cfg: DistillConfig, *, n_student: int,
                 iters: int, round_idx: int, teacher_ref: str) -> ModelCard:
    """The card of a round's student: the teacher's architecture with dropout 0 and the student's output;
    schedule, data, clipping, classes and normaliser of the original teacher."""
    model = dataclasses.replace(t_card.model, dropout=0.0) if t_card.model is not None else None
    network = spec_with_param(t_card.network, student_param, dropout=0.0) if t_card.network is not None else None
    data = dict(card0.data, spec=card0.data.get("spec") or cfg.data)
    return ModelCard(model=model, network=network, param=student_param, schedule=card0.schedule, data=data,
                     iteration=iters, kind="student", steps=n_student, weights="model", clip=card0.clip,
                     clip_range=card0.clip_range, null_class=card0.null_class, normalizer=card0.normalizer,
                     source=card0.source, guidance=card0.guidance,
                     provenance={"progdistill": __version__, "teacher": teacher_ref, "round": round_idx,
                                 "teacher_steps": 2 * n_student, "seed": cfg.seed,
                                 "preset": (card0.provenance or {}).get("preset")})


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


def distill_plan(n: int, *, seed: int, round_idx: int, step: int, batch_size: int, num_steps: int,
                 hflip: bool = False) -> dict:
    """The global batch plan of one step, a function of (seed, round, step): example indices, i ~ U{1..N},
    and (with hflip) flips from their own generator, so the other draws are those of runs without flips."""
    g = generator_for(torch.device("cpu"), seed, 1_000_000 + round_idx, step)
    idx = torch.randint(n, (batch_size,), generator=g)
    i = torch.randint(1, num_steps + 1, (batch_size,), generator=g)
    flip = None
    if hflip:
        flip = torch.rand(batch_size, generator=generator_for("cpu", seed, 1_000_000 + round_idx, step, FLIP_KEY)) < 0.5
    return {"idx": idx, "i": i, "flip": flip}


def distill_batch(data: Dataset, *, seed: int, round_idx: int, step: int, batch_size: int, num_steps: int,
                  device: torch.device, hflip: bool = False, part: slice = slice(None),
                  read: Callable | None = None) -> dict:
    """Examples `part` of the global batch of one step: x (flipped as in teacher training), y, i, eps.

    As `teacher.teacher_batch`: the plan is drawn whole, the noise per chunk of positions, so a process
    draws and reads only its part; `read(idx)` gives the images (default: `data.examples`).
    """
    plan = distill_plan(len(data), seed=seed, round_idx=round_idx, step=step, batch_size=batch_size,
                        num_steps=num_steps, hflip=hflip)
    idx = plan["idx"][part]
    x = (read or data.examples)(idx).to(device)
    if hflip:
        x = random_hflip(x, plan["flip"][part])
    y = data.y[idx].to(device) if data.y is not None else None
    eps = chunk_noise((seed, 1_000_000 + round_idx, step), part, batch_size, data.shape)
    return {"x": x, "y": y, "i": plan["i"][part].to(device), "eps": eps.to(device)}


def distillation_loss(student, teacher, batch: dict, sl: slice, *, num_steps: int, schedule: Schedule,
                      weighting: str, class_cond: bool) -> torch.Tensor:
    """L = w(lambda_t) ||x~ - x_theta(z_t)||^2, with z_t = alpha_t x + sigma_t eps at t = i/N (Algorithm 2).

    A batch with "w" (guided stage 2) gives teacher and student the same (c, w) per example."""
    x, i, eps = batch["x"][sl], batch["i"][sl], batch["eps"][sl]
    y = batch["y"][sl] if class_cond else None
    w = batch["w"][sl].float() if batch.get("w") is not None else None
    if w is not None:
        teacher = WDenoiser(teacher, w=w)
    logsnr_64 = schedule.logsnr(i.double() / num_steps)    # the student's time input from float64, as in sampling
    logsnr_t = logsnr_64.float()
    z_t = noised(x, eps, logsnr_t)
    with torch.autocast(device_type=z_t.device.type, enabled=False):
        target = distillation_target(teacher, z_t.float(), i=i, num_steps=num_steps, schedule=schedule, class_labels=y)
    x_pred = student(z_t, logsnr_64, y) if w is None else student(z_t, logsnr_64, y, w=w)
    return weighted_x_loss(target, x_pred, logsnr_t, weighting).mean()


def distill(cfg: DistillConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Distil `cfg.teacher` from N0 down to N1 steps into run folder `out` (one `steps-NNNN/` per round)."""
    out = Path(out)
    dist_info = init_distributed()
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"--resume: {out} has no config.json; start a new distillation without --resume")
        saved = from_dict(DistillConfig, read_json(out / "config.json", "run config"))
        cfg = dataclasses.replace(saved, time_limit=cfg.time_limit, workers=cfg.workers, compile=cfg.compile)
    elif (out / "config.json").exists():
        raise UserError(f"{out} already holds a distillation run: pass --resume, or choose another --out")
    cfg.validate()
    settings = run_settings(dist_info.device, cfg.compile)   # CUDA: channels_last, TF32, fused AdamW; CPU: none
    teacher_run = cfg.teacher          # a run folder, or diffusers:PATH (an imported teacher), as given
    if dist_info.is_main:
        warn_if_unfinished(teacher_run)
    teacher0, card0 = load_denoiser(teacher_run, device=dist_info.device, compile=cfg.compile)
    cfg = resolve_config(cfg, card0, teacher_run, count_parameters(teacher0.net))
    student_param = student_param_for(card0.param, cfg.student_param)
    null_label = check_guidable(card0, teacher_run) if cfg.guided else None   # before any work: one-line refusal
    if cfg.guided and cfg.guided_iters is None:
        cfg = dataclasses.replace(cfg, guided_iters=cfg.iters_per_round)
    n_classes = num_classes(card0)
    class_cond = n_classes > 0
    shape = tuple(card0.data["shape"])
    res = ch = None
    if card0.data["kind"] == "image" and not cfg.data.startswith("toy:"):   # images take the teacher's shape (said in one line)
        ch, res = shape[0], shape[1]
    data = load_data(cfg.data, split="train", resolution=res, channels=ch, seed=cfg.seed)
    if data.note and dist_info.is_main:
        print(f"data: {data.note}")
    if tuple(data.shape) != shape:
        raise UserError(f"--data {cfg.data} has shape {tuple(data.shape)} but the teacher was trained on {shape}")
    if class_cond and (data.y is None or data.num_classes > n_classes):
        have = "no labels" if data.y is None else f"{data.num_classes} classes"
        raise UserError(f"the teacher is conditioned on {n_classes} classes but --data {cfg.data} has {have}; "
                        f"use the labelled data it was trained on")
    normalizer = Normalizer.from_dict(card0.normalizer)   # the teacher's, never recomputed
    if normalizer is not None:
        data.x = normalizer.encode(data.x.double()).float()
    if data.x is not None:
        data.x = data.x.to(dist_info.device)
    hflip = bool(cfg.hflip) and data.kind == "image"
    rounds = plan_rounds(cfg.start_steps, cfg.final_steps, cfg.iters_per_round, cfg.last_rounds_factor,
                         cfg.round_iters)

    teacher_ref = resolved_teacher(teacher_run)
    cfg = dataclasses.replace(cfg, teacher=teacher_ref)   # a resume from another folder finds it too
    run_card = {"kind": "distillation", "teacher": teacher_ref, "teacher_spec": teacher_run, "start_steps": cfg.start_steps,
                "final_steps": cfg.final_steps, "student_param": student_param, "rounds": [], "latest": None,
                "progdistill": __version__, "guided": None if not cfg.guided else {"finished": False}}
    if (out / CARD).is_file() and resume:
        run_card = read_json(out / CARD, "distillation card")
    state_path = latest_state(out / "state") if resume else None
    st = load_state(state_path) if state_path is not None else None
    first_round = len(run_card["rounds"]) if st is None else int(st["round"])
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_run_folder(out, [])          # temp folders of a killed promote
        write_json(out / "config.json", to_dict(cfg))
        write_json(out / CARD, run_card)
        print(f"distill: {cfg.start_steps} -> {cfg.final_steps} steps in {len(rounds)} rounds, "
              f"{_iters_text(rounds)}, batch {cfg.batch_size}, lr {cfg.lr}, student param {student_param}"
              f"{', random horizontal flips (as the teacher trained)' if hflip else ''}"
              f"{', data read per batch' if data.stream is not None else ''}{run_note(settings, cfg.compile)}")
        warn_bf16(student_param, cfg.precision)
    metrics = MetricsLog(out / "metrics.jsonl", dist_info.is_main)
    deadline = time.time() + 60 * cfg.time_limit if cfg.time_limit else None
    torch.manual_seed(seed_for(cfg.seed, 20_000 + dist_info.rank))
    if cfg.guided:   # stage 1, then the rounds distil the w-conditioned model (train/guided.py)
        from progdistill.train.guided import GUIDED_FOLDER, distill_guidance
        if not (run_card.get("guided") or {}).get("iters"):
            if not distill_guidance(cfg, out, teacher=teacher0, card0=card0, data=data, student_param=student_param,
                                    null_label=null_label, teacher_ref=teacher_ref, run_card=run_card,
                                    dist_info=dist_info, deadline=deadline, metrics=metrics, progress=progress):
                return out
        teacher0, card0 = load_denoiser(out / GUIDED_FOLDER, device=dist_info.device, compile=cfg.compile)

    for r in range(first_round, len(rounds)):
        n_student, iters = rounds[r]["steps"], rounds[r]["iters"]
        # Teacher of this round: the original teacher's EMA weights, or the previous round's student.
        if r == 0:
            teacher, t_card = teacher0, card0
        else:
            teacher, t_card = load_denoiser(out / steps_folder_name(rounds[r - 1]["steps"]), device=dist_info.device,
                                            compile=cfg.compile)
        teacher.eval().requires_grad_(False)
        student_net = prepare_network(init_student(teacher.net, t_card, student_param).to(dist_info.device), settings)
        optimizer = adamw(student_net.parameters(), lr=cfg.lr, weight_decay=0.0, settings=settings)  # fresh each round
        ema = EMA(student_net, cfg.ema_decay) if cfg.ema_decay > 0 else None                  # so is the EMA
        start, prev_seconds, round_t0 = 0, 0.0, time.time()
        if st is not None and int(st["round"]) == r:
            prev_seconds = float(st.get("seconds", 0.0))
            student_net.load_state_dict(st["net"])
            if ema is not None and "ema" in st:    # (states of older versions, which ignored ema_decay, have none)
                ema.net.load_state_dict(st["ema"])
            load_optimizer_state(optimizer, st["optimizer"], settings)
            set_rng_state(st["rng"][min(dist_info.rank, len(st["rng"]) - 1)])
            start = int(st["step"])
        student = prepare_denoiser(Denoiser(student_net, schedule=card0.schedule, param=student_param), settings,
                                   cfg.compile)
        model = DistributedDataParallel(student) if dist_info.enabled else student

        def part(micro: int) -> slice:
            return local_slice(cfg.batch_size, dist_info, cfg.grad_accum, micro)

        def plan_idx(step: int, r=r, n_student=n_student) -> torch.Tensor:
            return distill_plan(len(data), seed=cfg.seed, round_idx=r, step=step, batch_size=cfg.batch_size,
                                num_steps=n_student)["idx"]

        loader = StepLoader(data, plan_idx, part, start=start, iters=iters, grad_accum=cfg.grad_accum,
                            device=dist_info.device, workers=cfg.workers)

        def loss_fn(step: int, micro: int, r=r, n_student=n_student, model=model, teacher=teacher,
                    loader=loader) -> torch.Tensor:
            batch = distill_batch(data, seed=cfg.seed, round_idx=r, step=step, batch_size=cfg.batch_size,
                                  num_steps=n_student, device=dist_info.device, hflip=hflip, part=part(micro),
                                  read=lambda idx: loader(step, micro, idx))
            if cfg.guided:   # w per example from its own generator: the batch's other draws do not move
                from progdistill.train.guided import stage2_w
                batch["w"] = stage2_w(seed=cfg.seed, round_idx=r, step=step, batch_size=cfg.batch_size,
                                      w_min=cfg.w_min, w_max=cfg.w_max, device=dist_info.device)[part(micro)]
            return distillation_loss(model, teacher, batch, slice(None), num_steps=n_student,
                                     schedule=card0.schedule, weighting=cfg.weighting, class_cond=class_cond)

        def save_fn(step: int, r=r, student_net=student_net, optimizer=optimizer, ema=ema, prev_seconds=prev_seconds,
                    round_t0=round_t0) -> None:
            rngs = gathered_rng_states(dist_info)
            if dist_info.is_main:
                torch_save_atomic({"round": r, "step": step, "net": student_net.state_dict(),
                                   **({"ema": ema.net.state_dict()} if ema is not None else {}),
                                   "optimizer": optimizer.state_dict(), "rng": rngs,
                                   "seconds": prev_seconds + time.time() - round_t0},
                                  out / "state" / state_name(r, step))
                rotate_states(out / "state", cfg.keep_last)

        desc = f"round {r + 1}/{len(rounds)} N={n_student}"
        result = optimize(model=model, params=list(student_net.parameters()), optimizer=optimizer, loss_fn=loss_fn,
                          lr_fn=lr_linear_decay(cfg.lr, iters), start_step=start, iters=iters,
                          grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, precision=cfg.precision,
                          dist_info=dist_info, ema=ema, ema_target=student_net, save_fn=save_fn,
                          checkpoint_every=cfg.checkpoint_every,
                          deadline=deadline, metrics=metrics, log_every=cfg.log_every, desc=desc, progress=progress,
                          extra_log={"round": r, "steps": n_student})
        loader.close()
        st = None
        if not result.finished:
            if dist_info.is_main:
                print(f"time limit reached in round {r + 1} at step {result.step}/{iters}; continue with --resume")
            return out
        if dist_info.is_main:   # promote: the student becomes a complete model and the next teacher
            card = student_card(card0, t_card, student_param, cfg, n_student=n_student, iters=iters, round_idx=r,
                                teacher_ref=teacher_ref)
            publish_model_folder(out / steps_folder_name(n_student), card,
                                 {"model": ema.net if ema is not None else student_net})
            run_card["rounds"] = [x for x in run_card["rounds"] if x["round"] != r] + [
                {"round": r, "steps": n_student, "iters": iters, "seconds": prev_seconds + result.seconds}]
            run_card["latest"] = steps_folder_name(n_student)
            write_json(out / CARD, run_card)
        if dist_info.enabled:
            torch.distributed.barrier()
    return out
