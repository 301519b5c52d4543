"""Progressive distillation, one round's pieces (docs/method.md §6): the plan of the rounds, the student
(a copy of its teacher), the keyed batch plan of a step and the loss of Algorithm 2, the student's card.
The target is a pure function (`two_teacher_steps`, `x_target`, `distillation_target`)."""

from __future__ import annotations

import math

import dataclasses
from typing import Callable

import torch
from torch import nn

from progdistill.data.datasets import Dataset, random_hflip
from progdistill.data.stream import FLIP_KEY, chunk_noise
from progdistill.diffusion.guided import WDenoiser
from progdistill.diffusion.losses import weighted_x_loss
from progdistill.diffusion.parameterization import output_channels
from progdistill.diffusion.schedules import Schedule, noised
from progdistill.diffusion.targets import distillation_target
from progdistill.errors import UserError
from progdistill.nets.compile import plain_state_dict
from progdistill.nets.spec import spec_with_param
from progdistill.seeds import generator_for
from progdistill.store.card import ModelCard
from progdistill.store.folders import build_network_from_card
from progdistill.train.config import DistillConfig
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


def round_weights(n_rounds: int, last_rounds_factor: float, switch_factor: float = 1.0) -> list[float]:
    """Each round's weight w_r (N0/2 first): 1, times F (--last-rounds-factor) for the last two rounds, times
    S (--switch-factor) for the first round; pass S = 1 when the student's parameterisation is the teacher's."""
    weights = [1.0] * n_rounds
    for r in range(max(0, n_rounds - 2), n_rounds):
        weights[r] *= last_rounds_factor
    if weights:
        weights[0] *= switch_factor
    return weights


def budget_iters(examples: float, batch_size: int, weights: list[float]) -> list[int]:
    """The iterations of each round under a budget of E examples (iterations x global batch, summed over the
    rounds): iters_r = floor(E w_r / sum(w) / batch) (at least 1), then the iterations left of floor(E / batch)
    go one each to the rounds with the largest remainders (earlier rounds first on ties), so the rounds never
    spend more than E and each is within one iteration of its exact share."""
    total = sum(weights)
    share = [examples * w / total / batch_size for w in weights]
    iters = [max(1, int(math.floor(q))) for q in share]
    left = int(examples // batch_size) - sum(iters)
    for r in sorted(range(len(share)), key=lambda r: (-(share[r] - math.floor(share[r])), r))[:max(0, left)]:
        iters[r] += 1
    return iters


def plan_rounds(start_steps: int, final_steps: int, iters_per_round: int, last_rounds_factor: float,
                round_iters: list[int] | None = None, switch_factor: float = 1.0) -> list[dict]:
    """One entry per halving: the student's step count N and its iterations, round(iters_per_round x w_r)
    (`round_weights`: last two rounds x F, the first x `switch_factor`, which the caller passes only when the
    parameterisation switches; 1 leaves every round as before), or `round_iters` given explicitly, one per
    round in order (N0/2 first)."""
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
    for r, w in zip(rounds, round_weights(len(rounds), last_rounds_factor, switch_factor)):
        if w != 1.0:
            r["iters"] = int(round(iters_per_round * w))
    return rounds


def iters_text(rounds: list[dict]) -> str:
    its = [r["iters"] for r in rounds]
    return f"{its[0]} iters/round" if len(set(its)) == 1 else f"iters per round {','.join(map(str, its))}"


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
                      weighting: str, class_cond: bool, clip_range: float | None = None) -> torch.Tensor:
    """L = w(lambda_t) ||x~ - x_theta(z_t)||^2, z_t = alpha_t x + sigma_t eps at the student's grid point t_i (Algorithm 2).

    A batch with "w" (guided stage 2) gives teacher and student the same (c, w) per example; `clip_range`
    clamps the teacher's x predictions inside the target (`--target-clip`)."""
    x, i, eps = batch["x"][sl], batch["i"][sl], batch["eps"][sl]
    y = batch["y"][sl] if class_cond else None
    w = batch["w"][sl].float() if batch.get("w") is not None else None
    if w is not None:
        teacher = WDenoiser(teacher, w=w)
    logsnr_64 = schedule.logsnr(schedule.grid_time(i, num_steps))   # the student's grid point, float64 as in sampling
    logsnr_t = logsnr_64.float()
    z_t = noised(x, eps, logsnr_t)
    with torch.autocast(device_type=z_t.device.type, enabled=False):
        target = distillation_target(teacher, z_t.float(), i=i, num_steps=num_steps, schedule=schedule, class_labels=y,
                                     clip_range=clip_range)
    x_pred = student(z_t, logsnr_64, y) if w is None else student(z_t, logsnr_64, y, w=w)
    return weighted_x_loss(target, x_pred, logsnr_t, weighting).mean()
