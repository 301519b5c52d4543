"""Fault injection for tests of what survives a crash or a NaN: `PROGDISTILL_FAULT`, read once per process.

A comma list of faults; nothing is injected when the variable is unset or empty:
  nan_loss@STEP[:RANK]   the loss of optimizer step STEP (0-based, as in `loss_fn(step, micro)`; in
                         distillation the step within each round) is NaN on rank RANK (every rank if omitted)
  nan_grad@STEP[:RANK]   the loss stays finite but its gradient is NaN on that rank (DDP then spreads it)
  die@POINT[#N]          os._exit(137) (a kill -9) the N-th time (default 1st) publication reaches POINT
  pause@POINT[#N]        print `fault: paused at POINT` to stderr and sleep an hour there (kill it yourself)
POINTs are named where store/atomic.py calls `reached(...)`: version-written, public-linked, current-swapped,
old-removed (a training run's model folder); dir-written, dir-published (a write-once folder, and an export
built beside --out); dir-swapped (export --force: after the atomic exchange, before the old copy is removed);
moved-aside (export --force where no atomic exchange exists); file-written (a training state saved).
`PROGDISTILL_FAULT=die@?` prints each as it is reached.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass

import torch

from progdistill.errors import UserError

ENV = "PROGDISTILL_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str          # nan_loss, nan_grad, die, pause
    step: int = -1     # nan_*: the optimizer step
    rank: int | None = None
    point: str = ""    # die/pause: the publication point
    nth: int = 1


def parse(text: str) -> list[Fault]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, sep, where = item.partition("@")
        try:
            if kind in ("nan_loss", "nan_grad") and sep:
                step, _, rank = where.partition(":")
                out.append(Fault(kind, step=int(step), rank=int(rank) if rank else None))
                continue
            if kind in ("die", "pause") and sep and where:
                point, _, nth = where.partition("#")
                out.append(Fault(kind, point=point, nth=int(nth) if nth else 1))
                continue
        except ValueError:
            pass
        raise UserError(f"${ENV}: cannot read {item!r}; write nan_loss@STEP[:RANK], nan_grad@STEP[:RANK], "
                        f"die@POINT[#N] or pause@POINT[#N]")
    return out


_counts: dict[str, int] = {}   # times each publication point was reached under the current faults


@functools.lru_cache(maxsize=1)
def active() -> tuple[Fault, ...]:
    """The faults of $PROGDISTILL_FAULT, parsed once (cache_clear() re-reads it and restarts the counts)."""
    _counts.clear()
    return tuple(parse(os.environ.get(ENV, "")))


def nan_at(kind: str, step: int, rank: int) -> bool:
    return any(f.kind == kind and f.step == step and f.rank in (None, rank) for f in active())


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a broken gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def inject_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """The loss with any fault for (step, rank) applied (unchanged in normal runs)."""
    if not active():
        return loss
    if nan_at("nan_loss", step, rank):
        loss = loss * float("nan")
    if nan_at("nan_grad", step, rank):
        loss = _NanGrad.apply(loss)
    return loss


def reached(point: str) -> None:
    """A publication step is done: die or pause here if $PROGDISTILL_FAULT asks for it."""
    faults = active()
    if not faults:
        return
    _counts[point] = _counts.get(point, 0) + 1
    for f in faults:
        if f.point == "?":
            print(f"fault point: {point}", file=sys.stderr, flush=True)
        if f.kind in ("die", "pause") and f.point == point and f.nth == _counts[point]:
            if f.kind == "die":
                os._exit(137)
            print(f"fault: paused at {point}", file=sys.stderr, flush=True)
            time.sleep(3600)
