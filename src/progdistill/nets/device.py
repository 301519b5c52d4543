"""Device settings that leave the maths alone: a pure function of the device type.

`device_settings(device_type)`: channels_last weights, TF32 matmuls and fused AdamW on CUDA, and
nothing on the CPU, so CPU runs stay bit-exact, resumable and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from progdistill.nets.compile import check_compile, compile_denoiser


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




