"""The thin wrapper between a raw network and the diffusion maths.

`Denoiser(z_t, logsnr_t, class_labels) -> x_pred`: maps logSNR to the network's time input
tau = T t(lambda) - 1 (docs/method.md §8) and turns the raw output into x_pred for the
parameterization (docs/method.md §2). The network never sees the schedule. tau is computed from
lambda at its own precision (the samplers pass float64, so grid points give whole timesteps);
alpha and sigma in float32. lambda = -inf (zero terminal SNR) gives alpha = 0, sigma = 1.

Under bf16 autocast only the network runs in bf16: its output is cast to float32 before the
parameterization maths, so x_pred, the schedule and the loss stay float32 (benchmarks/bf16_error.py).
`call_net` (set by nets.compile.compile_denoiser) is a compiled call of `net`, kept out of the module tree.
"""

from __future__ import annotations

import torch
from torch import nn

from progdistill.diffusion.parameterization import check_param, eps_from_x, x_pred_from_output
from progdistill.diffusion.schedules import Schedule, alpha_sigma, per_example


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, *, schedule: Schedule, param: str):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.param = check_param(param)
        self.call_net = None     # a torch.compile'd call of self.net (nets.compile.compile_denoiser), or None

    def raw_output(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor | None = None,
                   w: torch.Tensor | None = None) -> torch.Tensor:
        tau = self.schedule.time_input(logsnr_t).to(z_t.device)
        extra = {} if w is None else {"w": w}     # guidance strength, for w-conditioned networks (nets/guided.py)
        out = (self.call_net or self.net)(z_t, tau, class_labels=class_labels, **extra)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        """x_pred(z_t[, c, w]) per the parameterization; computed in float32 even under autocast."""
        logsnr_t = torch.as_tensor(logsnr_t, device=z_t.device).expand(z_t.shape[0])
        out = self.raw_output(z_t, logsnr_t, class_labels, w).float()
        alpha, sigma = alpha_sigma(per_example(logsnr_t.float(), z_t))
        return x_pred_from_output(self.param, out, z_t.float(), alpha, sigma)

    def eps_pred(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps_pred = (z_t - alpha_t x_pred) / sigma_t."""
        x_pred = self(z_t, logsnr_t, class_labels)
        logsnr_t = torch.as_tensor(logsnr_t, device=z_t.device).expand(z_t.shape[0])
        alpha, sigma = alpha_sigma(per_example(logsnr_t.float(), z_t))
        return eps_from_x(z_t, x_pred, alpha, sigma)
