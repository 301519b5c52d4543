"""The targets of distillation, as pure functions of a frozen teacher (docs/method.md §6, §9).

Algorithm 2: two teacher DDIM steps t -> t' -> t'' and the x~ whose single student step from t lands
on z_t''; guidance distillation (stage 1): the guided teacher's x^w(z_t, c)."""

from __future__ import annotations

import torch

from progdistill.diffusion.guided import GuidedDenoiser
from progdistill.diffusion.sampling import ddim_step
from progdistill.diffusion.schedules import Schedule, alpha_sigma, per_example


def x_target(z_t: torch.Tensor, z_t2: torch.Tensor, *, logsnr_t: torch.Tensor, logsnr_t2: torch.Tensor) -> torch.Tensor:
    """x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t): one DDIM step from t lands on z_t''."""
    alpha_t, sigma_t = alpha_sigma(per_example(logsnr_t, z_t))
    alpha_t2, sigma_t2 = alpha_sigma(per_example(logsnr_t2, z_t))
    ratio = sigma_t2 / sigma_t
    return (z_t2 - ratio * z_t) / (alpha_t2 - ratio * alpha_t)


def _clipped(x: torch.Tensor, clip_range: float | None) -> torch.Tensor:
    return x if clip_range is None else x.clamp(-clip_range, clip_range)


@torch.no_grad()
def two_teacher_steps(teacher, z_t: torch.Tensor, *, logsnr_t: torch.Tensor, logsnr_t1: torch.Tensor,
                      logsnr_t2: torch.Tensor, class_labels: torch.Tensor | None = None,
                      clip_range: float | None = None):
    """Two teacher DDIM steps t -> t' -> t''; returns (z_t'', x_eta(z_t')). Unclipped as in the released code,
    or with each x prediction clamped to [-r, r] as the teacher's own image sampler does (`clip_range` r)."""
    x_1 = _clipped(teacher(z_t, logsnr_t, class_labels), clip_range)
    z_t1 = ddim_step(z_t, x_1, logsnr_t=logsnr_t, logsnr_s=logsnr_t1)
    x_2 = _clipped(teacher(z_t1, logsnr_t1, class_labels), clip_range)
    z_t2 = ddim_step(z_t1, x_2, logsnr_t=logsnr_t1, logsnr_s=logsnr_t2)
    return z_t2, x_2


@torch.no_grad()
def distillation_target(teacher, z_t: torch.Tensor, *, i: torch.Tensor, num_steps: int, schedule: Schedule,
                        class_labels: torch.Tensor | None = None, clip_range: float | None = None) -> torch.Tensor:
    """x~ for a student taking `num_steps` (N) steps at its grid point i, from teacher steps t -> t' -> t''
    (points 2i, 2i - 1, 2i - 2 of the 2N-step grid: t = i/N, t' = t - 0.5/N, t'' = t - 1/N on the uniform one).

    At i = 1 (t'' = 0) the target is the teacher's second x prediction, as in the released code (docs/method.md §6).
    """
    # float64 logSNR: the teacher's time input stays exact (docs/method.md §8, §10, §13)
    logsnr_t, logsnr_t1, logsnr_t2 = (schedule.logsnr(t) for t in schedule.step_times(i, num_steps))
    z_t2, x_2 = two_teacher_steps(teacher, z_t, logsnr_t=logsnr_t, logsnr_t1=logsnr_t1, logsnr_t2=logsnr_t2,
                                  class_labels=class_labels, clip_range=clip_range)
    target = x_target(z_t, z_t2, logsnr_t=logsnr_t.to(z_t.dtype), logsnr_t2=logsnr_t2.to(z_t.dtype))
    return torch.where(per_example(i == 1, z_t), x_2, target)


@torch.no_grad()
def guidance_target(teacher, z_t: torch.Tensor, *, logsnr_t: torch.Tensor, class_labels: torch.Tensor,
                    w: torch.Tensor, null_label: int) -> torch.Tensor:
    """x^w_theta(z_t, c) = (1 + w) x_theta(z_t, c) - w x_theta(z_t, null), w per example (the stage-1 target)."""
    return GuidedDenoiser(teacher, w=w, null_label=null_label)(z_t, logsnr_t, class_labels)
