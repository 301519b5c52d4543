"""Model FLOPs and device peaks, for MFU: torch's FlopCounterMode, with the CPU attention kernels it
has no formula for counted by formula, and dense bf16 peaks by device name."""

from __future__ import annotations

from typing import Callable

import torch


# ------------------------------------------------------------------------------- FLOPs and peaks
def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """Attention forward: Q K^T and P V, 2 B H L S (E + Ev) for q (B, H, L, E), k (B, H, S, E), v (B, H, S, Ev)."""
    *bh, L, E = q_shape
    S, Ev = k_shape[-2], v_shape[-1]
    n = 1
    for d in bh:
        n *= d
    return 2 * n * L * S * (E + Ev)


def _sdpa_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """Attention backward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: twice the forward."""
    return 2 * _sdpa_flops(q_shape, k_shape, v_shape)


def _attention_formulas() -> dict:
    """Formulas for fused attention ops FlopCounterMode has none for (the CPU flash kernels): with
    them, attention counts on the CPU as torch counts it on CUDA (flash / efficient / cudnn)."""
    from torch.utils.flop_counter import flop_registry
    aten, out = torch.ops.aten, {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops),
                          ("_scaled_dot_product_fused_attention_overrideable", _sdpa_flops),
                          ("_scaled_dot_product_fused_attention_overrideable_backward", _sdpa_backward_flops)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:
            out[op] = formula
    return out


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per op) of running `fn` once, eagerly (FlopCounterMode sees aten ops)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as mode:
        fn()
    return mode.get_total_flops(), {str(k): int(v) for k, v in mode.get_flop_counts()["Global"].items()}


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by its name (torch.cuda.get_device_name), None when unknown (or a CPU)."""
    name = (device_name or "").lower()
    return next((v for key, v in DENSE_BF16_TFLOPS if key in name), None)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in order
# against the lower-cased device name (so "h100 pcie" comes before "h100", "l40s" before "l4").
DENSE_BF16_TFLOPS = (("h200", 989.0), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0),
                     ("a100", 312.0), ("l40s", 362.0), ("l4", 121.0), ("rtx 4090", 165.0))
