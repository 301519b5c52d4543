"""Classifier-free guidance (Ho & Salimans 2022) for sampling and distillation (docs/method.md §9).

x^w(z_t, c) = (1 + w) x(z_t, c) - w x(z_t, null)  (diffusers' guidance_scale = 1 + w). A guided teacher
costs 2 network evaluations per step at w > 0 (1 at w = 0); a w-conditioned (guidance-distilled)
model x_eta(z_t, c, w) costs 1. Each class here is a `DenoiserFn` for the samplers.
"""

from __future__ import annotations

import torch

from progdistill.diffusion.schedules import per_example


def guided_x(x_cond: torch.Tensor, x_uncond: torch.Tensor, *, w) -> torch.Tensor:
    """x^w = (1 + w) x_c - w x_null; w a scalar or one per example (B,)."""
    w = per_example(w, x_cond, cast=True)
    return (1.0 + w) * x_cond - w * x_uncond


class GuidedDenoiser:
    """A guided teacher as a DenoiserFn: x^w(z_t, c) from one batched call on [(z_t, c); (z_t, null)].

    `nfe` counts network evaluations per sample: 2 per call when any w > 0, else 1 (the conditional alone).
    """

    def __init__(self, denoiser, *, w, null_label: int):
        self.denoiser, self.w, self.null_label, self.nfe = denoiser, w, int(null_label), 0

    def __call__(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(self.w)
        if not bool((w != 0).any()):
            self.nfe += 1
            return self.denoiser(z_t, logsnr_t, class_labels)
        n = z_t.shape[0]
        logsnr = torch.as_tensor(logsnr_t, device=z_t.device).expand(n)
        null = torch.full_like(class_labels, self.null_label)
        x = self.denoiser(torch.cat([z_t, z_t]), torch.cat([logsnr, logsnr]), torch.cat([class_labels, null]))
        self.nfe += 2
        return guided_x(x[:n], x[n:], w=w.to(x.device))


class WDenoiser:
    """A w-conditioned denoiser with w bound (a scalar or one per example): x_eta(z_t, c, w), 1 evaluation."""

    def __init__(self, denoiser, *, w):
        self.denoiser, self.w, self.nfe = denoiser, w, 0

    def __call__(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        w = torch.as_tensor(self.w, dtype=torch.float32, device=z_t.device).expand(z_t.shape[0])
        return self.denoiser(z_t, logsnr_t, class_labels, w=w)
