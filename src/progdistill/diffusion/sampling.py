"""Samplers over a time grid built once: DDIM, ancestral (docs/method.md §4), DPM-Solver++(2M) (§12),
stochastic (§9).

Every sampler has one signature: `sample_x(denoiser, z_1, *, schedule, num_steps, ...)` where
`denoiser(z_t, logsnr_t, class_labels) -> x_pred` and z_1 is the initial noise. Randomness is
passed in: the ancestral and stochastic samplers take a `noise(step_index) -> Tensor` callable.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from progdistill.diffusion.parameterization import eps_from_x
from progdistill.diffusion.schedules import Schedule, alpha_sigma, per_example
from progdistill.errors import UserError

SAMPLERS = ("ddim", "ancestral", "dpmpp2m", "stochastic")


class DenoiserFn(Protocol):
    def __call__(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor: ...


def check_num_steps(num_steps: int) -> int:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise UserError(f"number of sampling steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def time_grid(num_steps: int, schedule: Schedule | None = None) -> torch.Tensor:
    """t_N, ..., t_0 (float64, descending): i / N, or the schedule's own grid (whole timesteps k_i / T for an
    imported table, docs/method.md §10); samplers walk consecutive pairs."""
    n = check_num_steps(num_steps)
    if schedule is not None:
        return schedule.time_grid(n)
    return torch.arange(n, -1, -1, dtype=torch.float64) / n


def halve_grid(grid: torch.Tensor) -> torch.Tensor:
    """The N/2-step grid: every other point of the N-step grid."""
    return grid[::2]


def ddim_step(z_t: torch.Tensor, x_pred: torch.Tensor, *, logsnr_t: torch.Tensor, logsnr_s: torch.Tensor) -> torch.Tensor:
    """z_s = alpha_s x_pred + sigma_s (z_t - alpha_t x_pred) / sigma_t (DDIM, docs/method.md §4)."""
    alpha_t, sigma_t = alpha_sigma(per_example(logsnr_t, z_t, cast=True))
    alpha_s, sigma_s = alpha_sigma(per_example(logsnr_s, z_t, cast=True))
    return alpha_s * x_pred + sigma_s * eps_from_x(z_t, x_pred, alpha_t, sigma_t)


def ancestral_step(z_t: torch.Tensor, x_pred: torch.Tensor, noise: torch.Tensor, *, logsnr_t: torch.Tensor,
                   logsnr_s: torch.Tensor, logvar_frac: float) -> torch.Tensor:
    """z_s ~ q(z_s | z_t, x = x_pred): mean r (alpha_s/alpha_t) z_t + (1 - r) alpha_s x_pred, r = e^{lambda_t - lambda_s};
    log-variance interpolated: frac * log((1-r) sigma_t^2) + (1 - frac) * log((1-r) sigma_s^2)."""
    lt, ls = per_example(logsnr_t, z_t, cast=True), per_example(logsnr_s, z_t, cast=True)
    alpha_t, sigma_t = alpha_sigma(lt)
    alpha_s, sigma_s = alpha_sigma(ls)
    r = torch.exp(lt - ls)
    # r alpha_s / alpha_t = alpha_t sigma_s^2 / (sigma_t^2 alpha_s): finite (0) at alpha_t = 0 (lambda_t = -inf)
    mean = (alpha_t * sigma_s**2 / (sigma_t**2 * alpha_s)) * z_t + (1.0 - r) * alpha_s * x_pred
    log_small = torch.log1p(-r) + 2.0 * torch.log(sigma_s)
    log_large = torch.log1p(-r) + 2.0 * torch.log(sigma_t)
    logvar = logvar_frac * log_large + (1.0 - logvar_frac) * log_small
    return mean + torch.exp(0.5 * logvar) * noise


def renoise_step(z_k: torch.Tensor, noise: torch.Tensor, *, logsnr_k: torch.Tensor,
                 logsnr_s: torch.Tensor) -> torch.Tensor:
    """z_s ~ q(z_s | z_k), s later than k (lambda_s < lambda_k): (alpha_s / alpha_k) z_k + sigma_{s|k} eps,
    sigma_{s|k}^2 = (1 - e^{lambda_s - lambda_k}) sigma_s^2 (the forward process from k to s; docs/method.md §9)."""
    lk, ls = per_example(logsnr_k, z_k, cast=True), per_example(logsnr_s, z_k, cast=True)
    alpha_k, _ = alpha_sigma(lk)
    alpha_s, sigma_s = alpha_sigma(ls)
    var = -torch.expm1(ls - lk) * sigma_s**2
    return (alpha_s / alpha_k) * z_k + torch.sqrt(var) * noise


def _predict(denoiser: DenoiserFn, z: torch.Tensor, logsnr: torch.Tensor, class_labels, clip: bool,
             clip_range: float = 1.0) -> torch.Tensor:
    """x_pred = D(z_t, lambda_t), clamped to [-r, r] when clipping (diffusers' clip_sample_range).

    lambda stays float64 (the grid's own precision), so the time input tau = T t - 1 is exact."""
    logsnr = logsnr.to(torch.float64)
    x_pred = denoiser(z, logsnr.expand(z.shape[0]).to(z.device), class_labels)
    return x_pred.clamp(-clip_range, clip_range) if clip else x_pred


def _pairs(schedule: Schedule, num_steps: int, progress: bool, desc: str):
    logsnr = schedule.logsnr(time_grid(num_steps, schedule))
    pairs = list(zip(logsnr[:-1], logsnr[1:]))
    return tqdm(pairs, desc=desc, leave=False, disable=not progress)


@torch.no_grad()
def sample_ddim(denoiser: DenoiserFn, z_1: torch.Tensor, *, schedule: Schedule, num_steps: int,
                class_labels: torch.Tensor | None = None, clip: bool = True, clip_range: float = 1.0,
                progress: bool = False) -> torch.Tensor:
    """N-step deterministic DDIM from t = 1 to 0; the last step returns x_pred (N network calls)."""
    z = z_1
    pairs = _pairs(schedule, num_steps, progress, f"DDIM {num_steps}")
    for i, (logsnr_t, logsnr_s) in enumerate(pairs):
        x_pred = _predict(denoiser, z, logsnr_t, class_labels, clip, clip_range)
        if i == num_steps - 1:
            return x_pred
        z = ddim_step(z, x_pred, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
    return z


@torch.no_grad()
def sample_ancestral(denoiser: DenoiserFn, z_1: torch.Tensor, *, schedule: Schedule, num_steps: int,
                     noise: Callable[[int], torch.Tensor], logvar_frac: float = 0.0,
                     class_labels: torch.Tensor | None = None, clip: bool = True, clip_range: float = 1.0,
                     progress: bool = False) -> torch.Tensor:
    """N-step ancestral sampler (docs/method.md §4); the last step returns x_pred and adds no noise."""
    if not 0.0 <= logvar_frac <= 1.0:
        raise UserError(f"--logvar-frac must lie in [0, 1] (0 = fixed_small, 1 = fixed_large), got {logvar_frac}")
    z = z_1
    for i, (logsnr_t, logsnr_s) in enumerate(_pairs(schedule, num_steps, progress, f"ancestral {num_steps}")):
        x_pred = _predict(denoiser, z, logsnr_t, class_labels, clip, clip_range)
        if i == num_steps - 1:
            return x_pred
        z = ancestral_step(z, x_pred, noise(i), logsnr_t=logsnr_t, logsnr_s=logsnr_s, logvar_frac=logvar_frac)
    return z


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DenoiserFn, z_1: torch.Tensor, *, schedule: Schedule, num_steps: int,
                    class_labels: torch.Tensor | None = None, clip: bool = True, clip_range: float = 1.0,
                    progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; docs/method.md §12) in data prediction over
    h = (lambda_s - lambda_t) / 2.

    The final point t = 0 is treated as sigma = 0 (diffusers' final_sigmas_type="zero"), so the last
    step is always first order (h is infinite there; diffusers forces this too) and returns x_pred.
    """
    z = z_1
    grid = schedule.logsnr(time_grid(num_steps, schedule))
    x_prev, h_prev = None, None
    for i in tqdm(range(num_steps), desc=f"DPM-Solver++ {num_steps}", leave=False, disable=not progress):
        logsnr_t, logsnr_s = grid[i], grid[i + 1]
        x_pred = _predict(denoiser, z, logsnr_t, class_labels, clip, clip_range)
        last = i == num_steps - 1
        if x_prev is None or last:
            d = x_pred
        else:
            h = 0.5 * (logsnr_s - logsnr_t)
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x_pred - (0.5 / r) * x_prev
        if last:
            return d
        alpha_t, sigma_t = alpha_sigma(logsnr_t.to(z.dtype))
        alpha_s, sigma_s = alpha_sigma(logsnr_s.to(z.dtype))
        h = 0.5 * (logsnr_s - logsnr_t)
        z = (sigma_s / sigma_t) * z - alpha_s * torch.expm1(-h).to(z.dtype) * d
        x_prev, h_prev = x_pred, h
    return z


@torch.no_grad()
def sample_stochastic(denoiser: DenoiserFn, z_1: torch.Tensor, *, schedule: Schedule, num_steps: int,
                      noise: Callable[[int], torch.Tensor], class_labels: torch.Tensor | None = None,
                      clip: bool = True, clip_range: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Stochastic N-step sampler for distilled students (Meng et al. 2023 Alg. 3; docs/method.md §9), N evaluations.

    At each grid point t = i/N with i >= 2: x_pred = D(z_t); a DDIM step of length 2/N to k = t - 2/N;
    then forward re-noising to s = t - 1/N, z_s = (alpha_s/alpha_k) z_k + sigma_{s|k} eps. At i = 2 the
    jump lands on k = 0 and z_k = x_pred (as the last DDIM step returns x_pred). At t = 1/N the step is
    deterministic and returns x_pred; N = 1 is 1-step DDIM. Every evaluation is on the student's grid
    i/N; using a 1/N-step student's x_pred for a 2/N jump is the method's approximation. `noise(j)` is
    the re-noising noise after evaluation j (j = 0 .. N-2).
    """
    logsnr = schedule.logsnr(time_grid(num_steps, schedule))      # logsnr[j] belongs to t = (N - j) / N
    z = z_1
    for j in tqdm(range(num_steps), desc=f"stochastic {num_steps}", leave=False, disable=not progress):
        x_pred = _predict(denoiser, z, logsnr[j], class_labels, clip, clip_range)
        if j == num_steps - 1:
            return x_pred
        k, s = j + 2, j + 1
        z_k = x_pred if k == num_steps else ddim_step(z, x_pred, logsnr_t=logsnr[j], logsnr_s=logsnr[k])
        z = renoise_step(z_k, noise(j), logsnr_k=logsnr[k], logsnr_s=logsnr[s])
    return z
