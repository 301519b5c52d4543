"""The optimizer: AdamW (fused where the device settings say so), its state across devices, and the
bf16 warning for outputs whose rounding dominates the weighted loss."""

from __future__ import annotations

import sys

import torch

from progdistill.nets.device import DeviceSettings


def adamw(params, *, lr: float, weight_decay: float, settings: DeviceSettings) -> torch.optim.Optimizer:
    """AdamW, fused where the settings say so (CUDA)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             **({"fused": True} if settings.fused_adamw else {}))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, settings: DeviceSettings) -> None:
    """Load an optimizer state, keeping this device's fused choice (a state saved on another device
    carries its own): the update maths is the same, only the kernel differs."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"] = True if settings.fused_adamw else None


def warn_bf16(param: str, precision: str) -> str | None:
    """Print (stderr) and return one line for a bf16 run whose output lets bf16 rounding dominate the weighted
    loss somewhere in t (benchmarks/bf16_error.py, a trained digits teacher: a v output stays within about 1%)."""
    if precision != "bf16" or param not in ("x", "eps"):
        return None
    where = "t < 0.125 (high SNR)" if param == "x" else "t > 0.875 (x = (z - sigma eps) / alpha amplifies it)"
    line = (f"warning: --precision bf16 with an {param} output: bf16 rounding in the network is 15-20% of the "
            f"truncated-SNR loss at {where} (benchmarks/bf16_error.py); a v output keeps it near 1%")
    print(line, file=sys.stderr)
    return line
