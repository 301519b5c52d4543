"""Speed settings that leave the maths alone, and the figures that say how fast a run is.

- `compile_denoiser` (`--compile [BACKEND]`): torch.compile of the network call inside a Denoiser.
  The module that is saved, averaged (EMA), copied into students and loaded stays the plain network
  (`Denoiser.net`), so no file progdistill writes ever holds torch.compile's `_orig_mod.` prefix;
  `plain_state_dict` strips a stray prefix from weights compiled and saved elsewhere.
- `device_settings(device_type)`: channels_last weights, TF32 matmuls and fused AdamW on CUDA, and
  nothing on the CPU, so CPU runs stay bit-exact, resumable and deterministic.
- `count_flops`, `peak_tflops`: model FLOPs from torch's FlopCounterMode (with the CPU attention
  kernels it has no formula for counted by formula) and dense bf16 peaks by device name, for MFU.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UserError

COMPILE_PREFIX = "_orig_mod"   # what torch.compile's wrapper module puts before every state-dict key


# ------------------------------------------------------------------------------- torch.compile
def check_compile(backend: str | None) -> str | None:
    """The backend to compile with (None: no compile); a one-line UserError where torch.compile cannot run."""
    if backend is None:
        return None
    if not isinstance(backend, str) or not backend:
        raise UserError(f"--compile takes a torch.compile backend name (default inductor), got {backend!r}")
    if not hasattr(torch, "compile"):
        raise UserError(f"--compile needs torch.compile (torch >= 2.0; this is {torch.__version__}); drop --compile")
    import torch._dynamo as dynamo
    try:
        dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as e:
        raise UserError(f"--compile: torch.compile is unavailable here ({str(e).splitlines()[0]}); drop --compile") from None
    known = dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--compile: unknown torch.compile backend {backend!r}; use inductor (the default), "
                        f"or one of {', '.join(known)}")
    return backend


@contextlib.contextmanager
def compile_errors(backend: str | None = None):
    """Turn a failure of torch.compile (tracing or the backend's compiler) into a one-line UserError.
    Compilation happens at the first call, so this wraps calls (forward, and backward in `optimize`)."""
    try:
        yield
    except Exception as e:
        from torch._dynamo.exc import TorchDynamoException
        if not isinstance(e, TorchDynamoException):
            raise
        lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.strip().endswith("raised:")
                 and not x.startswith(("Set TORCHDYNAMO", "For even more"))]   # the cause, not dynamo's framing
        first = lines[0] if lines else type(e).__name__
        raise UserError(f"--compile{f' {backend}' if backend else ''} failed: {first[:300]}; run without "
                        f"--compile (inductor needs a working C++ compiler on the CPU, Triton on the GPU)") from None


def compile_denoiser(denoiser, backend: str | None):
    """Make `denoiser` call a torch.compile'd `denoiser.net` (the same parameters); returns it.

    The compiled wrapper is kept out of the module tree (a plain function attribute), so state
    dicts, `save_pretrained`, EMA and DDP all see only the plain network."""
    backend = check_compile(backend)
    if backend is None:
        return denoiser
    compiled = torch.compile(denoiser.net, backend=backend)

    def call(*args, **kwargs):
        with compile_errors(backend):
            return compiled(*args, **kwargs)

    denoiser.call_net = call
    return denoiser


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module behind a torch.compile wrapper (itself if not compiled)."""
    return getattr(net, COMPILE_PREFIX, net)


def plain_state_dict(state: dict) -> dict:
    """The state dict with every `_orig_mod.` component of its keys removed (weights saved from a
    torch.compile'd module, at the top or at any sub-module); other keys as they are."""
    return {".".join(p for p in k.split(".") if p != COMPILE_PREFIX): v for k, v in state.items()}


# ------------------------------------------------------------------------------- device settings
@dataclass(frozen=True)
class DeviceSettings:
    channels_last: bool = False   # NHWC weights (and so activations): the tensor cores' native conv layout
    tf32: bool = False            # float32 matmuls on TF32 tensor cores (torch's "high" matmul precision)
    fused_adamw: bool = False     # one fused kernel per AdamW step instead of a loop over tensors

    def names(self) -> list[str]:
        return [n for n, v in (("channels_last", self.channels_last), ("TF32 matmuls", self.tf32),
                               ("fused AdamW", self.fused_adamw)) if v]


def run_note(settings: DeviceSettings, backend: str | None) -> str:
    """", channels_last, TF32 matmuls, fused AdamW, torch.compile inductor" for a run's first line ("" if none)."""
    return "".join(f", {x}" for x in settings.names() + ([f"torch.compile {backend}"] if backend else []))


def device_settings(device_type: str) -> DeviceSettings:
    """The speed settings for a device type: all on for "cuda", none elsewhere (CPU runs unchanged)."""
    cuda = device_type == "cuda"
    return DeviceSettings(channels_last=cuda, tf32=cuda, fused_adamw=cuda)


def apply_global(settings: DeviceSettings) -> None:
    """Process-wide settings (TF32): called by the commands that own the process (train, distill, sample)."""
    if settings.tf32:
        torch.set_float32_matmul_precision("high")


def run_settings(device: torch.device, backend: str | None) -> DeviceSettings:
    """What train and distill do first: check that torch.compile can run (when asked), decide the device's
    settings and apply the process-wide ones."""
    check_compile(backend)
    settings = device_settings(device.type)
    apply_global(settings)
    return settings


def prepare_network(net: nn.Module, settings: DeviceSettings) -> nn.Module:
    """The network in the device's memory format (channels_last moves only 4-D weights; in place)."""
    if settings.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def prepare_denoiser(denoiser, settings: DeviceSettings, backend: str | None):
    """A Denoiser (already on its device) ready to run: its network in the device's memory format, and
    compiled when `backend` is given."""
    prepare_network(denoiser.net, settings)
    return compile_denoiser(denoiser, backend)


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


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in order
# against the lower-cased device name (so "h100 pcie" comes before "h100", "l40s" before "l4").
DENSE_BF16_TFLOPS = (("h200", 989.0), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0),
                     ("a100", 312.0), ("l40s", 362.0), ("l4", 121.0), ("rtx 4090", 165.0))


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by its name (torch.cuda.get_device_name), None when unknown (or a CPU)."""
    name = (device_name or "").lower()
    return next((v for key, v in DENSE_BF16_TFLOPS if key in name), None)
