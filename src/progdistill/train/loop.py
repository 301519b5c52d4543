"""The optimisation loop shared by teacher training and distillation.

It owns what both need and nothing of the diffusion maths: distributed set-up, per-step
generators from (seed, step) so global batches do not depend on the process count, gradient
accumulation, bf16 autocast, gradient clipping, EMA, learning-rate schedules, progress bar,
JSONL metrics, periodic checkpoints and the time limit. A non-finite loss (checked on every rank
with one all-reduced flag before backward) or gradient norm (of the all-reduced gradient, before
the optimizer step) stops every process with a UserError and saves nothing; `faults.py` injects both.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from progdistill.errors import UserError
from progdistill.nets.compile import compile_errors, unwrap
from progdistill.store import faults


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed() -> DistInfo:
    """One process, or torchrun's env (WORLD_SIZE/RANK/LOCAL_RANK): gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return DistInfo(0, 1, device)
    if not cuda:  # K CPU processes share the cores: oversubscribed OpenMP threads slow everything down 5-10x
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def finish_distributed() -> None:
    """End this process's part of a torchrun job: a barrier, then the process group torn down, so that no
    rank exits while a peer still holds its connection (gloo aborts a process that exits with a live group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_slice(global_batch: int, dist_info: DistInfo, grad_accum: int, micro: int) -> slice:
    """This process's part of micro-batch `micro` of a global batch."""
    parts = dist_info.world * grad_accum
    if global_batch % parts:
        raise UserError(f"batch size {global_batch} must be divisible by processes x --grad-accum = {parts}")
    b = global_batch // parts
    start = (micro * dist_info.world + dist_info.rank) * b
    return slice(start, start + b)


class EMA:
    """Exponential moving average of weights; decay min(decay, (1 + n) / (10 + n)) with warm-up."""

    def __init__(self, net: nn.Module, decay: float, warmup: bool = True):
        self.net = copy.deepcopy(unwrap(net)).eval().requires_grad_(False)   # never torch.compile's wrapper
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update(self, net: nn.Module, num_updates: int) -> None:
        d = min(self.decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else self.decay
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


def lr_warmup_constant(base: float, warmup: int) -> Callable[[int], float]:
    """lr = base * min(1, (step + 1) / warmup) (teacher training, docs/method.md §5)."""
    return lambda step: base * min(1.0, (step + 1) / max(1, warmup))


def lr_warmup_cosine(base: float, warmup: int, total: int, final_frac: float) -> Callable[[int], float]:
    """Warm-up as above, then lr = base (f + (1 - f)(1 + cos(pi p)) / 2) with p = (step - warmup) / (total - warmup):
    a cosine decay to f x base at the last step."""
    def lr(step: int) -> float:
        if step < warmup:
            return base * (step + 1) / max(1, warmup)
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return base * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * p)))
    return lr


def lr_linear_decay(base: float, total: int) -> Callable[[int], float]:
    """lr = base * (1 - step / total): decays linearly to 0 within a round (docs/method.md §6)."""
    return lambda step: base * max(0.0, 1.0 - step / total)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MetricsLog:
    """Append-only JSONL metrics file (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gathered_rng_states(dist_info: "DistInfo") -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it), for exact resume."""
    rngs = [rng_state()]
    if dist_info.enabled:
        gathered = [None] * dist_info.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    return rngs


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _agree(flag: bool, dist_info: DistInfo) -> bool:
    """Rank 0's decision, shared with every process (time limits must stop all ranks together)."""
    if not dist_info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dist_info.device)
    dist.broadcast(t, 0)
    return bool(t.item() > 0.5)


def _all_finite(x: torch.Tensor, dist_info: DistInfo) -> bool:
    """Whether `x` is finite on every process (one all-reduce of a flag; MIN over ranks)."""
    t = torch.isfinite(x).all().to(torch.float32).reshape(1)
    if dist_info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def _on_rank(loss: torch.Tensor, dist_info: DistInfo) -> str:
    if not dist_info.enabled:
        return f" ({float(loss.detach())})"
    return f" on this rank ({float(loss.detach())})" if not torch.isfinite(loss) else " on another rank"


def _mean_across(x: float, dist_info: DistInfo) -> float:
    if not dist_info.enabled:
        return x
    t = torch.tensor([x], device=dist_info.device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist_info.world


@dataclass
class LoopResult:
    step: int
    finished: bool
    seconds: float


def optimize(*, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
             loss_fn: Callable[[int, int], torch.Tensor], lr_fn: Callable[[int], float], start_step: int, iters: int,
             grad_accum: int, grad_clip: float | None, precision: str, dist_info: DistInfo,
             ema: EMA | None = None, ema_target: nn.Module | None = None,
             save_fn: Callable[[int], None], checkpoint_every: int, deadline: float | None,
             metrics: MetricsLog, log_every: int, desc: str, progress: bool = True,
             extra_log: dict | None = None) -> LoopResult:
    """Run optimizer steps start_step..iters-1; `loss_fn(step, micro)` gives this process's micro-batch loss.

    Saves with `save_fn(step_done)` every `checkpoint_every` steps, at the end, and when the
    deadline (time.time()) passes; returns whether all `iters` steps are done.
    """
    use_sync = dist_info.enabled and hasattr(model, "no_sync")
    t0, step = time.time(), start_step
    bar = tqdm(total=iters, initial=start_step, desc=desc, disable=not (progress and dist_info.is_main),
               dynamic_ncols=True, leave=True)
    window_t, window_n, loss_acc = time.time(), 0, 0.0
    try:
        while step < iters:
            lr = lr_fn(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_val = 0.0
            for micro in range(grad_accum):
                sync_ctx = model.no_sync() if (use_sync and micro < grad_accum - 1) else contextlib.nullcontext()
                with sync_ctx:
                    with autocast(precision, dist_info.device):
                        loss = faults.inject_loss(loss_fn(step, micro) / grad_accum, step, dist_info.rank)
                    # every rank stops together, before backward (DDP's gradient all-reduce would hang)
                    if not _all_finite(loss.detach(), dist_info):
                        raise UserError(f"the loss became non-finite at step {step}{_on_rank(loss, dist_info)}; "
                                        f"nothing was saved after the last checkpoint: lower --lr or use --precision fp32")
                    with compile_errors():    # a compiled network's backward is compiled at its first call
                        loss.backward()
                loss_val += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
            if not torch.isfinite(grad_norm):   # the norm of the all-reduced gradient: the same on every rank
                raise UserError(f"the gradient norm became {float(grad_norm)} at step {step} (finite loss); "
                                f"nothing was saved after the last checkpoint: lower --lr or use --precision fp32")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(ema_target if ema_target is not None else model, step - 1)
            loss_acc += loss_val
            window_n += 1
            bar.update(1)
            if step % log_every == 0 or step == iters:
                mean_loss = _mean_across(loss_acc / window_n, dist_info)
                rate = window_n / max(1e-9, time.time() - window_t)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                metrics.write(step=step, loss=mean_loss, lr=lr, grad_norm=float(grad_norm), it_per_s=rate,
                              elapsed_s=time.time() - t0, **(extra_log or {}))
                window_t, window_n, loss_acc = time.time(), 0, 0.0
            out_of_time = _agree(deadline is not None and time.time() > deadline, dist_info)
            if step % checkpoint_every == 0 or step == iters or out_of_time:
                save_fn(step)
            if out_of_time and step < iters:
                return LoopResult(step, False, time.time() - t0)
    finally:
        bar.close()
    return LoopResult(step, True, time.time() - t0)
