"""Progressive distillation: paper Algorithm 2, round by round (docs/method.md §6).

The round loop is explicit: copy the teacher, fresh optimizer (and student EMA, if `ema_decay` > 0: it
is then the round's model), train (`stage.run_stage`), publish `steps-NNNN/` (written once), then name
it `latest` in the run card. The round and N live in the checkpoint, never in step arithmetic. With
guidance (--guided, or a w-conditioned teacher) every example of a round carries its own w.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from progdistill.data.datasets import Dataset, load_data
from progdistill.data.normalize import Normalizer
from progdistill.diffusion.denoiser import Denoiser
from progdistill.errors import UserError
from progdistill.nets.build import count_parameters
from progdistill.nets.device import prepare_denoiser, prepare_network, run_note, run_settings
from progdistill.seeds import seed_for
from progdistill.store.atomic import clean_run_folder, write_json
from progdistill.store.card import CARD, ModelCard, num_classes, read_json, steps_folder_name
from progdistill.store.folders import publish_model_folder
from progdistill.store.guided import check_guidable, describe_model, is_w_conditioned
from progdistill.store.load import load_denoiser, resolved_teacher
from progdistill.store.states import latest_state, load_state
from progdistill.train.config import DistillConfig, to_dict
from progdistill.train.distill_config import (
    IMPORTED_SMALL_PARAMS,
    distill_config,
    examples_text,
    resolve_budget,
    resolve_config,
    resolve_guidance,
    warn_if_unfinished,
)
from progdistill.train.guided import GUIDED_FOLDER, GUIDED_STATES, distill_guidance, stage2_w
from progdistill.train.loop import EMA, MetricsLog, init_distributed, lr_linear_decay
from progdistill.train.optim import adamw, warn_bf16
from progdistill.train.rounds import (
    distill_batch,
    distill_plan,
    distillation_loss,
    init_student,
    iters_text,
    plan_rounds,
    student_card,
    student_param_for,
)
from progdistill.train.stage import Run, Stage, run_stage
from progdistill.version import __version__

__all__ = ["IMPORTED_SMALL_PARAMS", "distill", "distill_batch", "distill_plan", "distillation_loss", "init_student",
           "plan_rounds", "resolve_config", "student_card", "student_param_for", "warn_if_unfinished"]


def distill(cfg: DistillConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Distil `cfg.teacher` from N0 down to N1 steps into run folder `out` (one `steps-NNNN/` per round)."""
    out = Path(out)
    dist_info = init_distributed()
    asked, cfg = cfg, distill_config(cfg, out, resume=resume)
    settings = run_settings(dist_info.device, cfg.compile)   # CUDA: channels_last, TF32, fused AdamW; CPU: none
    teacher_run = cfg.teacher          # a run folder, or diffusers:PATH (an imported teacher), as given
    if dist_info.is_main:
        warn_if_unfinished(teacher_run)
    teacher0, card0 = load_denoiser(teacher_run, device=dist_info.device, compile=cfg.compile)
    cfg = resolve_guidance(resolve_config(cfg, card0, teacher_run, count_parameters(teacher0.net)), card0, asked,
                           teacher_run)
    card0 = grid_of_run(card0, out, resume)
    card0.schedule.check_steps(cfg.start_steps, "--start-steps")
    w_teacher = is_w_conditioned(card0)     # guidance-distilled already: no stage 1, the rounds take w
    null_label = check_guidable(card0, teacher_run) if cfg.guided and not w_teacher else None   # one-line refusal
    student_param = student_param_for(card0.param, cfg.student_param)
    data = distill_data(cfg, card0, dist_info)
    switch = student_param != card0.param     # eps -> v: the first round may weigh --switch-factor more
    cfg = resolve_budget(cfg, switch)          # --budget: the resolved plan becomes round_iters (config.json)
    rounds = plan_rounds(cfg.start_steps, cfg.final_steps, cfg.iters_per_round, cfg.last_rounds_factor,
                         cfg.round_iters, switch_factor=cfg.switch_factor if switch else 1.0)
    teacher_ref = resolved_teacher(teacher_run)
    cfg = dataclasses.replace(cfg, teacher=teacher_ref, student_param=student_param)   # a resume finds it too
    run_card = {"kind": "distillation", "teacher": teacher_ref, "teacher_spec": teacher_run, "start_steps": cfg.start_steps,
                "final_steps": cfg.final_steps, "student_param": student_param, "rounds": [], "latest": None,
                "progdistill": __version__, "guided": None if not cfg.guided else {"finished": False},
                "grid": card0.schedule.grid}
    if w_teacher:
        run_card["guided"] = {"w_min": cfg.w_min, "w_max": cfg.w_max, "stage1": "the teacher"}
    if (out / CARD).is_file() and resume:
        run_card = read_json(out / CARD, "distillation card")
    state_path = latest_state(out / "state") if resume else None
    st = load_state(state_path) if state_path is not None else None
    first_round = len(run_card["rounds"]) if st is None else int(st["round"])
    hflip = bool(cfg.hflip) and data.kind == "image"
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_run_folder(out, [])          # temp folders of a killed promote
        write_json(out / "config.json", to_dict(cfg))
        write_json(out / CARD, run_card)
        print(f"distill: {cfg.start_steps} -> {cfg.final_steps} steps in {len(rounds)} rounds, "
              f"{iters_text(rounds)}, batch {cfg.batch_size}{examples_text(cfg, rounds, teacher_run)}, lr {cfg.lr}, "
              f"student param {student_param}"
              f"{', random horizontal flips (as the teacher trained)' if hflip else ''}"
              f"{', data read per batch' if data.stream is not None else ''}{run_note(settings, cfg.compile)}")
        if w_teacher:
            print(f"teacher {teacher_run} is {describe_model(card0)}: no guidance stage 1; every round draws "
                  f"w ~ U[{cfg.w_min:g}, {cfg.w_max:g}] per example")
        warn_bf16(student_param, cfg.precision)
    run = Run(cfg, dist_info, settings, data, MetricsLog(out / "metrics.jsonl", dist_info.is_main),
              deadline=time.time() + 60 * cfg.time_limit if cfg.time_limit else None, progress=progress)
    torch.manual_seed(seed_for(cfg.seed, 20_000 + dist_info.rank))
    if cfg.guided and not w_teacher:   # stage 1, then the rounds distil the w-conditioned model (train/guided.py)
        if not (run_card.get("guided") or {}).get("iters"):
            g_state = latest_state(out / GUIDED_STATES)
            if not distill_guidance(run, out, teacher=teacher0, card0=card0, student_param=student_param,
                                    null_label=null_label, teacher_ref=teacher_ref, run_card=run_card,
                                    state=load_state(g_state) if g_state is not None else None):
                return out
        teacher0, card0 = load_denoiser(out / GUIDED_FOLDER, device=dist_info.device, compile=cfg.compile)
    for r in range(first_round, len(rounds)):
        if not distill_round(run, out, r, rounds, teacher0=teacher0, card0=card0, student_param=student_param,
                             hflip=hflip, state=st if st is not None and int(st["round"]) == r else None,
                             run_card=run_card, teacher_ref=teacher_ref):
            return out
    return out


def grid_of_run(card0: ModelCard, out: Path, resume: bool) -> ModelCard:
    """The teacher's card on the time grid the run records (a run from before grids existed: i/N, so it
    resumes as it started; docs/method.md §10)."""
    if not (resume and (out / CARD).is_file()):
        return card0
    grid = read_json(out / CARD, "distillation card").get("grid", "uniform")
    if grid == card0.schedule.grid:
        return card0
    return dataclasses.replace(card0, schedule=dataclasses.replace(card0.schedule, grid=grid))


def distill_data(cfg: DistillConfig, card0: ModelCard, dist_info) -> Dataset:
    """The data of the rounds at the teacher's shape, normalised by the teacher's normaliser, on the device."""
    n_classes = num_classes(card0)
    shape = tuple(card0.data["shape"])
    res = ch = None
    if card0.data["kind"] == "image" and not cfg.data.startswith("toy:"):   # images take the teacher's shape (said in one line)
        ch, res = shape[0], shape[1]
    data = load_data(cfg.data, split="train", resolution=res, channels=ch, seed=cfg.seed)
    if data.note and dist_info.is_main:
        print(f"data: {data.note}")
    if tuple(data.shape) != shape:
        raise UserError(f"--data {cfg.data} has shape {tuple(data.shape)} but the teacher was trained on {shape}")
    if n_classes and (data.y is None or data.num_classes > n_classes):
        have = "no labels" if data.y is None else f"{data.num_classes} classes"
        raise UserError(f"the teacher is conditioned on {n_classes} classes but --data {cfg.data} has {have}; "
                        f"use the labelled data it was trained on")
    normalizer = Normalizer.from_dict(card0.normalizer)   # the teacher's, never recomputed
    if normalizer is not None:
        data.x = normalizer.encode(data.x.double()).float()
    if data.x is not None:
        data.x = data.x.to(dist_info.device)
    return data


def distill_round(run: Run, out: Path, r: int, rounds: list[dict], *, teacher0, card0: ModelCard, student_param: str,
                  hflip: bool, state: dict | None, run_card: dict, teacher_ref: str) -> bool:
    """Round r: its teacher (the original's EMA weights, or the previous round's student), a fresh student,
    optimizer and EMA, trained and promoted to `steps-NNNN/`; False when the time limit stopped it."""
    cfg, dist_info, settings, data = run.cfg, run.dist_info, run.settings, run.data
    n_student, iters = rounds[r]["steps"], rounds[r]["iters"]
    if r == 0:
        teacher, t_card = teacher0, card0
    else:
        teacher, t_card = load_denoiser(out / steps_folder_name(rounds[r - 1]["steps"]), device=dist_info.device,
                                        compile=cfg.compile)
    teacher.eval().requires_grad_(False)
    student_net = prepare_network(init_student(teacher.net, t_card, student_param).to(dist_info.device), settings)
    optimizer = adamw(student_net.parameters(), lr=cfg.lr, weight_decay=0.0, settings=settings)  # fresh each round
    ema = EMA(student_net, cfg.ema_decay) if cfg.ema_decay > 0 else None                  # so is the EMA
    class_cond = num_classes(card0) > 0
    clip_range = card0.clip_range if cfg.target_clip and card0.clip else None    # as the teacher's sampler clips

    def plan_idx(step: int) -> torch.Tensor:
        return distill_plan(len(data), seed=cfg.seed, round_idx=r, step=step, batch_size=cfg.batch_size,
                            num_steps=n_student)["idx"]

    def batch(step: int, part: slice, read) -> dict:
        b = distill_batch(data, seed=cfg.seed, round_idx=r, step=step, batch_size=cfg.batch_size, num_steps=n_student,
                          device=dist_info.device, hflip=hflip, part=part, read=read)
        if cfg.guided:   # w per example from its own generator: the batch's other draws do not move
            b["w"] = stage2_w(seed=cfg.seed, round_idx=r, step=step, batch_size=cfg.batch_size, w_min=cfg.w_min,
                              w_max=cfg.w_max, device=dist_info.device)[part]
        return b

    def loss(model, b: dict) -> torch.Tensor:
        return distillation_loss(model, teacher, b, slice(None), num_steps=n_student, schedule=card0.schedule,
                                 weighting=cfg.weighting, class_cond=class_cond, clip_range=clip_range)

    def wrap():
        student = prepare_denoiser(Denoiser(student_net, schedule=card0.schedule, param=student_param), settings,
                                   cfg.compile)
        return DistributedDataParallel(student) if dist_info.enabled else student

    result = run_stage(run, Stage(
        desc=f"round {r + 1}/{len(rounds)} N={n_student}", net=student_net, optimizer=optimizer, iters=iters,
        lr_fn=lr_linear_decay(cfg.lr, iters), states=out / "state", plan_idx=plan_idx, batch=batch, loss=loss,
        wrap=wrap, ema=ema, key={"round": r}, extra_log={"round": r, "steps": n_student}, where=f" in round {r + 1}"),
        state)
    if not result.finished:
        return False
    if dist_info.is_main:   # promote: the student becomes a complete model and the next teacher
        card = student_card(card0, t_card, student_param, cfg, n_student=n_student, iters=iters, round_idx=r,
                            teacher_ref=teacher_ref)
        publish_model_folder(out / steps_folder_name(n_student), card,
                             {"model": ema.net if ema is not None else student_net})
        run_card["rounds"] = [x for x in run_card["rounds"] if x["round"] != r] + [
            {"round": r, "steps": n_student, "iters": iters, "examples": iters * cfg.batch_size,
             "seconds": result.total_seconds}]
        run_card["examples"] = sum(x.get("examples", x["iters"] * cfg.batch_size) for x in run_card["rounds"])
        run_card["latest"] = steps_folder_name(n_student)
        write_json(out / CARD, run_card)
    if dist_info.enabled:
        torch.distributed.barrier()
    return True
