"""One training stage, resumable: the single loop behind teacher training, each distillation round and
guided stage 1.

A caller builds its network, optimizer and EMA (drawing their initial weights from the global RNG it
seeded), then gives `run_stage` a `Stage`: the plan of a step's batch (`plan_idx`, `batch`), its loss
and what to publish. `run_stage` owns the rest, the same for all three: restoring a training state
(weights, EMA, optimizer, RNG, step, seconds), this process's part of each micro-batch, the streamed
reader, saving states (gathered RNG states, atomic write, rotation), `optimize` and the time-limit line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from progdistill.data.datasets import Dataset
from progdistill.data.stream import StepLoader
from progdistill.nets.device import DeviceSettings
from progdistill.store.atomic import torch_save_atomic
from progdistill.store.states import rotate_states, state_name
from progdistill.train.loop import (
    EMA,
    DistInfo,
    LoopResult,
    MetricsLog,
    gathered_rng_states,
    local_slice,
    optimize,
    set_rng_state,
)
from progdistill.train.optim import load_optimizer_state


@dataclass
class Run:
    """What the stages of one command share: its resolved config (batch_size, grad_accum, grad_clip,
    precision, checkpoint_every, keep_last, log_every, workers), processes, data, metrics and deadline."""

    cfg: object
    dist_info: DistInfo
    settings: DeviceSettings
    data: Dataset
    metrics: MetricsLog
    deadline: float | None
    progress: bool = True


@dataclass
class Stage:
    """One resumable optimisation of `net` for `iters` steps.

    `batch(step, part, read)` gives examples `part` of step's global batch (`read(idx)` reads the
    images, streamed ahead by the loader from `plan_idx(step)`); `loss(model, batch)` its loss, with
    `model` = `wrap()`, built after the state is restored (the Denoiser, compiled, DDP-wrapped).
    """

    desc: str
    net: nn.Module
    optimizer: torch.optim.Optimizer
    iters: int
    lr_fn: Callable[[int], float]
    states: Path                                  # folder of its training states
    plan_idx: Callable[[int], torch.Tensor]
    batch: Callable[[int, slice, Callable], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    wrap: Callable[[], nn.Module]
    ema: EMA | None = None
    key: dict = field(default_factory=dict)       # {"round": r}: in every state and its file name
    extra_log: dict | None = None
    where: str = ""                               # in the time-limit line: " in round 2"
    publish: Callable[[int], None] | None = None  # rank 0, after each saved state (the teacher's model folder)
    resumed: Callable[[int], None] | None = None  # rank 0, once after restoring a state of step > 0


@dataclass
class StageResult:
    start: int              # the step it resumed at
    step: int
    finished: bool
    seconds: float          # this session's
    total_seconds: float    # across sessions (the states record it)


def restore(stage: Stage, state: dict | None, settings: DeviceSettings, dist_info: DistInfo) -> tuple[int, float]:
    """Load a training state into the stage's network, EMA, optimizer and the RNG; (step, seconds so far)."""
    if state is None:
        return 0, 0.0
    stage.net.load_state_dict(state["net"])
    if stage.ema is not None and "ema" in state:    # (distillation states of versions that ignored the EMA have none)
        stage.ema.net.load_state_dict(state["ema"])
    load_optimizer_state(stage.optimizer, state["optimizer"], settings)
    set_rng_state(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)])
    return int(state["step"]), float(state.get("seconds", 0.0))


def run_stage(run: Run, stage: Stage, state: dict | None = None) -> StageResult:
    """Restore `state` (if any), then train the stage to its end or the deadline, saving states on the way."""
    cfg, dist_info, t0 = run.cfg, run.dist_info, time.time()
    start, prev_seconds = restore(stage, state, run.settings, dist_info)
    if start > 0 and dist_info.is_main and stage.resumed is not None:
        stage.resumed(start)
    model = stage.wrap()

    def part(micro: int) -> slice:
        return local_slice(cfg.batch_size, dist_info, cfg.grad_accum, micro)

    loader = StepLoader(run.data, stage.plan_idx, part, start=start, iters=stage.iters, grad_accum=cfg.grad_accum,
                        device=dist_info.device, workers=cfg.workers)

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        batch = stage.batch(step, part(micro), lambda idx: loader(step, micro, idx))
        return stage.loss(model, batch)

    def save_fn(step: int) -> None:
        rngs = gathered_rng_states(dist_info)
        if not dist_info.is_main:
            return
        torch_save_atomic({**stage.key, "step": step, "net": stage.net.state_dict(),
                           **({"ema": stage.ema.net.state_dict()} if stage.ema is not None else {}),
                           "optimizer": stage.optimizer.state_dict(), "rng": rngs,
                           "seconds": prev_seconds + time.time() - t0},
                          stage.states / state_name(*stage.key.values(), step))
        rotate_states(stage.states, cfg.keep_last)
        if stage.publish is not None:
            stage.publish(step)

    try:
        result: LoopResult = optimize(
            model=model, params=list(stage.net.parameters()), optimizer=stage.optimizer, loss_fn=loss_fn,
            lr_fn=stage.lr_fn, start_step=start, iters=stage.iters, grad_accum=cfg.grad_accum,
            grad_clip=cfg.grad_clip, precision=cfg.precision, dist_info=dist_info, ema=stage.ema,
            ema_target=stage.net, save_fn=save_fn, checkpoint_every=cfg.checkpoint_every, deadline=run.deadline,
            metrics=run.metrics, log_every=cfg.log_every, desc=stage.desc, progress=run.progress,
            extra_log=stage.extra_log)
    finally:
        loader.close()
    if not result.finished and dist_info.is_main:
        print(f"time limit reached{stage.where} at step {result.step}/{stage.iters}; continue with --resume")
    return StageResult(start=start, step=result.step, finished=result.finished, seconds=result.seconds,
                       total_seconds=prev_seconds + result.seconds)
