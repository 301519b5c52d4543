"""Guided distillation (Meng et al., CVPR 2023; docs/method.md §9): stage 1 and the w draws of stage 2.

Stage 1 (guidance distillation) trains one w-conditioned student x_eta(z_t, c, w) (nets/guided.py) on
data: z_t = alpha_t x + sigma_t eps, t ~ U[0, 1], w ~ U[w_min, w_max], real labels c only, loss
w(lambda_t) ||x_eta(z_t, c, w) - x^w_theta(z_t, c)||^2 with the teacher's weighting, where
x^w_theta = (1 + w) x_theta(z_t, c) - w x_theta(z_t, null) is the guided teacher (the null label is used
inside it alone). The student starts as the teacher (w = 0 conditional) and already has the stage-2
parameterisation (eps teacher -> v student). It is saved as RUN2/guided/, a complete model folder
(any step count, any w). Stage 2 is Algorithm 2 (distill.py) with the same (c, w) given to teacher
and student; `stage2_w` draws w per example from its own keyed generator, so that the round's other
draws are those of plain distillation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from progdistill.data.datasets import Dataset, random_hflip
from progdistill.data.stream import FLIP_KEY, chunk_noise
from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.losses import check_weighting, weighted_x_loss
from progdistill.diffusion.schedules import Schedule, noised
from progdistill.diffusion.targets import guidance_target
from progdistill.errors import UserError
from progdistill.nets.compile import plain_state_dict
from progdistill.nets.device import prepare_denoiser, prepare_network
from progdistill.nets.guided import GuidedNet, base_spec_for
from progdistill.nets.spec import network_spec, spec_with_param
from progdistill.seeds import generator_for
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, ModelCard
from progdistill.store.folders import save_model_folder
from progdistill.train.loop import lr_linear_decay
from progdistill.train.optim import adamw
from progdistill.train.stage import Run, Stage, run_stage
from progdistill.version import __version__

STAGE1_KEY, STAGE1_W_KEY, STAGE2_W_KEY = 3_000_000, 3_000_001, 2_000_000   # keys of their own generators
GUIDED_FOLDER, GUIDED_STATES = "guided", "state-guided"


def draw_w(g: torch.Generator, batch_size: int, *, w_min: float, w_max: float) -> torch.Tensor:
    """w ~ U[w_min, w_max] per example (float64)."""
    return w_min + (w_max - w_min) * torch.rand(batch_size, generator=g, dtype=torch.float64)


def guidance_plan(n: int, *, seed: int, step: int, batch_size: int, w_min: float, w_max: float,
                  hflip: bool = False) -> dict:
    """The stage-1 global batch plan of one step, a function of (seed, step): example indices, t ~ U[0, 1];
    w ~ U[w_min, w_max] and (with hflip) flips from generators of their own."""
    g = generator_for(torch.device("cpu"), seed, STAGE1_KEY, step)
    idx = torch.randint(n, (batch_size,), generator=g)
    t = torch.rand(batch_size, generator=g, dtype=torch.float64)
    w = draw_w(generator_for(torch.device("cpu"), seed, STAGE1_W_KEY, step), batch_size, w_min=w_min, w_max=w_max)
    flip = None
    if hflip:
        flip = torch.rand(batch_size, generator=generator_for("cpu", seed, STAGE1_KEY, step, FLIP_KEY)) < 0.5
    return {"idx": idx, "t": t, "w": w, "flip": flip}


def guidance_batch(data: Dataset, *, seed: int, step: int, batch_size: int, w_min: float, w_max: float,
                   device: torch.device, hflip: bool = False, part: slice = slice(None),
                   read: Callable | None = None) -> dict:
    """Examples `part` of the stage-1 global batch of one step: x (flipped as in teacher training), y (real
    labels), t, eps, w. As `teacher.teacher_batch`: noise per chunk of positions, so a process draws and
    reads only its part; `read(idx)` gives the images (default: `data.examples`)."""
    plan = guidance_plan(len(data), seed=seed, step=step, batch_size=batch_size, w_min=w_min, w_max=w_max,
                         hflip=hflip)
    idx = plan["idx"][part]
    x = (read or data.examples)(idx).to(device)
    if hflip:
        x = random_hflip(x, plan["flip"][part])
    eps = chunk_noise((seed, STAGE1_KEY, step), part, batch_size, data.shape)
    return {"x": x, "y": data.y[idx].to(device), "t": plan["t"][part].to(device), "eps": eps.to(device),
            "w": plan["w"][part].to(device)}


def stage2_w(*, seed: int, round_idx: int, step: int, batch_size: int, w_min: float, w_max: float,
             device: torch.device) -> torch.Tensor:
    """w per example of a stage-2 batch (seed, round, step), from its own generator."""
    g = generator_for(torch.device("cpu"), seed, STAGE2_W_KEY + round_idx, step)
    return draw_w(g, batch_size, w_min=w_min, w_max=w_max).to(device)


def guidance_loss(student, teacher, batch: dict, sl: slice, *, schedule: Schedule, weighting: str,
                  null_label: int) -> torch.Tensor:
    """L = w(lambda_t) ||x^w_theta(z_t, c) - x_eta(z_t, c, w)||^2, z_t = alpha_t x + sigma_t eps from data."""
    x, t, eps, y, w = (batch[k][sl] for k in ("x", "t", "eps", "y", "w"))
    logsnr_64 = schedule.logsnr(t)
    logsnr_t = logsnr_64.float()
    z_t = noised(x, eps, logsnr_t)
    with torch.autocast(device_type=z_t.device.type, enabled=False):
        target = guidance_target(teacher, z_t.float(), logsnr_t=logsnr_64, class_labels=y, w=w.float(),
                                 null_label=null_label)
    x_pred = student(z_t, logsnr_64, y, w=w.float())
    return weighted_x_loss(target, x_pred, logsnr_t, weighting).mean()


def guided_card(card0: ModelCard, net, student_param: str, cfg, *, iters: int, teacher_ref: str) -> ModelCard:
    """The stage-1 student's card: GuidedNet, the student's parameterisation, [w_min, w_max]; the rest the teacher's."""
    model = dataclasses.replace(card0.model, dropout=0.0) if card0.model is not None else None
    prov = card0.provenance or {}
    return ModelCard(model=model, network=network_spec(net), param=student_param, schedule=card0.schedule,
                     data=dict(card0.data), iteration=iters, kind="student", steps=None, weights="model",
                     clip=card0.clip, clip_range=card0.clip_range, null_class=card0.null_class,
                     normalizer=card0.normalizer, source=card0.source,
                     guidance={"w_min": cfg.w_min, "w_max": cfg.w_max},
                     provenance={"progdistill": __version__, "teacher": teacher_ref, "stage": "guidance distillation",
                                 "seed": cfg.seed, "preset": prov.get("preset"), "weighting": prov.get("weighting"),
                                 "label_dropout": prov.get("label_dropout")})


def distill_guidance(run: Run, out: Path, *, teacher: Denoiser, card0: ModelCard, student_param: str, null_label: int,
                     teacher_ref: str, run_card: dict, state: dict | None) -> bool:
    """Stage 1 into OUT/guided/ (resumable from `state`, the latest of OUT/state-guided/); True once finished."""
    cfg, dist_info, settings, data = run.cfg, run.dist_info, run.settings, run.data
    iters = cfg.guided_iters
    weighting = check_weighting((card0.provenance or {}).get("weighting") or cfg.weighting)   # the teacher's
    teacher.eval().requires_grad_(False)
    t_spec = card0.network or network_spec(teacher.net)
    student_net = init_guided_student(teacher.net, t_spec, student_spec=spec_with_param(t_spec, student_param, dropout=0.0),
                                      w_min=cfg.w_min, w_max=cfg.w_max).to(dist_info.device)
    prepare_network(student_net, settings)
    optimizer = adamw(student_net.parameters(), lr=cfg.lr, weight_decay=0.0, settings=settings)
    hflip = bool(cfg.hflip) and data.kind == "image"

    def plan_idx(step: int) -> torch.Tensor:
        return guidance_plan(len(data), seed=cfg.seed, step=step, batch_size=cfg.batch_size, w_min=cfg.w_min,
                             w_max=cfg.w_max)["idx"]

    def batch(step: int, part: slice, read) -> dict:
        return guidance_batch(data, seed=cfg.seed, step=step, batch_size=cfg.batch_size, w_min=cfg.w_min,
                              w_max=cfg.w_max, device=dist_info.device, hflip=hflip, part=part, read=read)

    def loss(model, b: dict) -> torch.Tensor:
        return guidance_loss(model, teacher, b, slice(None), schedule=card0.schedule, weighting=weighting,
                             null_label=null_label)

    def wrap():
        student = prepare_denoiser(Denoiser(student_net, schedule=card0.schedule, param=student_param), settings,
                                   cfg.compile)
        return DistributedDataParallel(student) if dist_info.enabled else student

    result = run_stage(run, Stage(
        desc=f"guidance distillation w~U[{cfg.w_min:g},{cfg.w_max:g}]", net=student_net, optimizer=optimizer,
        iters=iters, lr_fn=lr_linear_decay(cfg.lr, iters), states=out / GUIDED_STATES, plan_idx=plan_idx, batch=batch,
        loss=loss, wrap=wrap, extra_log={"stage": "guidance"}, where=" in guidance distillation"), state)
    if not result.finished:
        return False
    if dist_info.is_main:
        card = guided_card(card0, student_net, student_param, cfg, iters=iters, teacher_ref=teacher_ref)
        save_model_folder(out / GUIDED_FOLDER, card, {"model": student_net})
        run_card["guided"] = {"iters": iters, "seconds": result.total_seconds, "w_min": cfg.w_min,
                              "w_max": cfg.w_max}
        run_card["latest"] = run_card.get("latest") or GUIDED_FOLDER
        write_json(out / CARD, run_card)
    if dist_info.enabled:
        torch.distributed.barrier()
    return True


def init_guided_student(teacher_net: nn.Module, teacher_spec: dict, *, student_spec: dict, w_min: float,
                        w_max: float) -> GuidedNet:
    """A GuidedNet whose every teacher tensor is copied by an explicit name map (asserted complete):
    class_embedding.* -> the wrapper's label table, everything else -> net.*; new are only w_embedding.*.

    `student_spec` is the teacher's spec with the student's output parameterisation and dropout (same channels).
    """
    src = plain_state_dict(teacher_net.state_dict())    # a torch.compile'd teacher too
    if "class_embedding.weight" not in src:
        raise UserError("guided distillation needs a class-conditional teacher with a label table (class_embedding)")
    rows, dim = src["class_embedding.weight"].shape
    student = GuidedNet(base=base_spec_for(student_spec), num_class_embeds=rows, embed_dim=dim, w_min=w_min,
                        w_max=w_max)
    own = student.state_dict()
    mapping = {k: ("" if k.startswith("class_embedding.") else "net.") + k for k in src}
    bad = [k for k, s in mapping.items() if s not in own or own[s].shape != src[k].shape]
    new = sorted(set(own) - set(mapping.values()))
    if bad or any(not k.startswith("w_embedding.") for k in new):
        raise UserError(f"cannot initialise the guided student from the teacher: tensors {(bad or new)[:4]} do not "
                        f"map (the output channels must stay equal: use --student-param v or x)")
    state = dict(own)
    state.update({mapping[k]: v for k, v in src.items()})
    student.load_state_dict(state)
    assert all(torch.equal(student.state_dict()[mapping[k]], v.to(own[mapping[k]].dtype)) for k, v in src.items())
    return student
