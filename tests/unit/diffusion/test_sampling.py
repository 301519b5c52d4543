"""Samplers against closed forms (method.md §4): grids, DDIM, ancestral and DPM-Solver++(2M).

The end-to-end checks use Gaussian data x ~ N(mu, s^2 I), whose exact denoiser and exact
probability-flow ODE map are in tests/gaussian.py, in float64 so that only discretisation error is left.
"""

from __future__ import annotations

import math

import pytest
import torch
from gaussian import GaussianDenoiser

from progdistill.diffusion.sampling import (ancestral_step, check_num_steps, ddim_step, halve_grid, sample_ancestral,
                                            sample_ddim, sample_dpmpp_2m, time_grid)
from progdistill.diffusion.schedules import Schedule, alpha_sigma
from progdistill.errors import UserError

F64 = torch.float64
SCHED = Schedule()
MU = torch.tensor([0.3, -0.5], dtype=F64)
S = 0.5
LAM1 = SCHED.logsnr(torch.tensor(1.0, dtype=F64))
LAM0 = SCHED.logsnr(torch.tensor(0.0, dtype=F64))


def gaussian() -> GaussianDenoiser:
    return GaussianDenoiser(MU, S)


def noise_fn(seed: int, shape, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return lambda i: torch.randn(*shape, generator=g, dtype=dtype)


@pytest.fixture(scope="module")
def z1_small():
    return torch.randn(1000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)


class Recorder:
    """Wraps a denoiser; records every (z_t, logsnr_t) it is called with and every x_pred it returns."""

    def __init__(self, den):
        self.den, self.inputs, self.outputs = den, [], []

    def __call__(self, z_t, logsnr_t, class_labels=None):
        out = self.den(z_t, logsnr_t, class_labels)
        self.inputs.append((z_t.clone(), logsnr_t.clone()))
        self.outputs.append(out.clone())
        return out


# ---------------------------------------------------------------- grids


def test_time_grid_points():
    for n in (1, 3, 4, 1000):
        g = time_grid(n)
        assert g.dtype == F64 and g.shape == (n + 1,)
        assert g[0].item() == 1.0 and g[-1].item() == 0.0
        assert bool((g[1:] < g[:-1]).all())
        assert torch.allclose(g, torch.arange(n, -1, -1, dtype=F64) / n, atol=0, rtol=0)
    for bad in (0, -2, 2.5, "4"):
        with pytest.raises(UserError):
            check_num_steps(bad)


def test_halving_the_grid_is_every_other_point():
    for k in range(1, 14):  # N = 2 ... 8192
        n = 2**k
        assert torch.equal(time_grid(n // 2), time_grid(n)[::2])
        assert torch.equal(halve_grid(time_grid(n)), time_grid(n // 2))
        # and so are the logSNRs the sampler evaluates
        assert torch.equal(SCHED.logsnr(time_grid(n // 2)), SCHED.logsnr(time_grid(n))[::2])


# ---------------------------------------------------------------- single steps


def test_ddim_step_with_true_x_is_exact():
    """DDIM consistency: from z_t = alpha_t x + sigma_t eps, the step with x_pred = x lands on alpha_s x + sigma_s eps."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 3, 4, 4, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(32, 3, 4, 4, generator=g, dtype=F64)
    lam_t = torch.rand(32, generator=g, dtype=F64) * 30 - 20  # per example
    lam_s = lam_t + torch.rand(32, generator=g, dtype=F64) * 10
    a_t, s_t = alpha_sigma(lam_t.reshape(-1, 1, 1, 1))
    a_s, s_s = alpha_sigma(lam_s.reshape(-1, 1, 1, 1))
    z_s = ddim_step(a_t * x + s_t * eps, x, logsnr_t=lam_t, logsnr_s=lam_s)
    assert torch.allclose(z_s, a_s * x + s_s * eps, atol=1e-9, rtol=0)
    # scalar logSNRs broadcast too
    z_s = ddim_step(a_t[:1] * x[:1] + s_t[:1] * eps[:1], x[:1], logsnr_t=lam_t[0], logsnr_s=lam_s[0])
    assert torch.allclose(z_s, a_s[:1] * x[:1] + s_s[:1] * eps[:1], atol=1e-9, rtol=0)


def test_ancestral_step_is_the_ddpm_posterior():
    """Mean and variance of q(z_s | z_t, x) in the usual DDPM form (alpha_{t|s} = alpha_t / alpha_s,
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2): mean alpha_{t|s} sigma_s^2 / sigma_t^2 z_t
    + alpha_s sigma_{t|s}^2 / sigma_t^2 x; small variance sigma_{t|s}^2 sigma_s^2 / sigma_t^2, large sigma_{t|s}^2."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 5, generator=g, dtype=F64) * 2 - 1
    z_t = torch.randn(16, 5, generator=g, dtype=F64)
    lam_t = torch.rand(16, generator=g, dtype=F64) * 20 - 12
    lam_s = lam_t + 0.05 + torch.rand(16, generator=g, dtype=F64) * 4
    a_t, s_t = alpha_sigma(lam_t[:, None])
    a_s, s_s = alpha_sigma(lam_s[:, None])
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    mean = a_ts * s_s**2 / s_t**2 * z_t + a_s * var_ts / s_t**2 * x
    small, large = var_ts * s_s**2 / s_t**2, var_ts
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    for frac, var in ((0.0, small), (1.0, large), (0.5, torch.sqrt(small * large))):
        got_mean = ancestral_step(z_t, x, zero, logsnr_t=lam_t, logsnr_s=lam_s, logvar_frac=frac)
        assert torch.allclose(got_mean, mean, atol=1e-12, rtol=0)
        got_sd = ancestral_step(z_t, x, one, logsnr_t=lam_t, logsnr_s=lam_s, logvar_frac=frac) - got_mean
        assert torch.allclose(got_sd, var.sqrt().expand_as(x), atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- sampler mechanics


@pytest.mark.parametrize("sampler", ["ddim", "ancestral", "dpmpp2m"])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_sampler_calls_and_final_step_returns_x_pred(sampler, n):
    """N calls at t = 1, (N-1)/N, ..., 1/N with (B,) logSNRs; the result is the last x_pred (nothing added:
    t = 0 is sigma = 0)."""
    rec = Recorder(gaussian())
    z1 = torch.randn(7, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    if sampler == "ddim":
        out = sample_ddim(rec, z1, schedule=SCHED, num_steps=n, clip=False)
    elif sampler == "ancestral":
        out = sample_ancestral(rec, z1, schedule=SCHED, num_steps=n, noise=noise_fn(0, (7, 2)), clip=False)
    else:
        out = sample_dpmpp_2m(rec, z1, schedule=SCHED, num_steps=n, clip=False)
    assert len(rec.inputs) == n
    lams = torch.stack([lam for _, lam in rec.inputs])
    assert lams.shape == (n, 7)
    assert torch.equal(lams, SCHED.logsnr(time_grid(n))[:-1, None].expand(n, 7))
    assert torch.equal(rec.inputs[0][0], z1)
    assert torch.equal(out, rec.outputs[-1])


def test_two_step_samplers_first_order_agree():
    """DPM-Solver++'s first step is first order, i.e. a DDIM step; with N = 2 the two samplers coincide."""
    z1 = torch.randn(50, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    a = sample_ddim(gaussian(), z1, schedule=SCHED, num_steps=2, clip=False)
    b = sample_dpmpp_2m(gaussian(), z1, schedule=SCHED, num_steps=2, clip=False)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    c = sample_dpmpp_2m(gaussian(), z1, schedule=SCHED, num_steps=3, clip=False)
    d = sample_ddim(gaussian(), z1, schedule=SCHED, num_steps=3, clip=False)
    assert (c - d).abs().max().item() > 1e-3  # the second step is second order


def test_ddim_clip_clips_x_pred_before_the_step():
    def wide(z_t, logsnr_t, class_labels=None):  # an x_pred far outside [-1, 1]
        return 3.0 * z_t + 0.5

    z1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    lam = SCHED.logsnr(time_grid(2))
    x1 = wide(z1, lam[0]).clamp(-1, 1)
    z_half = ddim_step(z1, x1, logsnr_t=lam[0], logsnr_s=lam[1])
    expected = wide(z_half, lam[1]).clamp(-1, 1)
    out = sample_ddim(wide, z1, schedule=SCHED, num_steps=2, clip=True)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert out.abs().max().item() <= 1.0
    assert (sample_ddim(wide, z1, schedule=SCHED, num_steps=2, clip=False) - out).abs().max().item() > 0.1


def test_ancestral_noise_calls_and_reproducibility():
    z1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    n = 10
    calls = []

    def counting(i):
        calls.append(i)
        return torch.ones(8, 2, dtype=F64)

    sample_ancestral(gaussian(), z1, schedule=SCHED, num_steps=n, noise=counting, logvar_frac=0.5, clip=False)
    assert calls == list(range(n - 1))  # N - 1 noise draws: the last step adds none

    def run(seed):
        return sample_ancestral(gaussian(), z1, schedule=SCHED, num_steps=n, noise=noise_fn(seed, (8, 2)), clip=False)

    assert torch.equal(run(0), run(0))
    assert (run(0) - run(1)).abs().max().item() > 1e-2
    with pytest.raises(UserError):
        sample_ancestral(gaussian(), z1, schedule=SCHED, num_steps=n, noise=counting, logvar_frac=1.5)


# ---------------------------------------------------------------- Gaussian data: DDIM


def test_gaussian_ode_map_solves_the_ddim_ode():
    """Check the reference itself (derivation in gaussian.py): the closed-form map is a flow (it composes) and
    a single small DDIM step with the exact denoiser follows it with an O(d^2) local error."""
    den = gaussian()
    z1 = torch.randn(5, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    la, lb = torch.tensor(-3.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    lm = torch.tensor(-0.5, dtype=F64)
    assert torch.allclose(den.ode_map(den.ode_map(z1, la, lm), lm, lb), den.ode_map(z1, la, lb), atol=1e-13)
    # tiny DDIM step from lambda to lambda + d matches the map up to O(d^2)
    errs = []
    for d in (1e-2, 5e-3):
        step = ddim_step(z1, den(z1, la), logsnr_t=la, logsnr_s=la + d)
        errs.append((step - den.ode_map(z1, la, la + d)).abs().max().item())
    assert errs[0] < 1e-4 and 3.5 < errs[0] / errs[1] < 4.5


def test_ddim_gaussian_distribution():
    """512-step DDIM maps N(0, I) to N(mu, s^2 I): 20k samples, float64."""
    z1 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    out = sample_ddim(gaussian(), z1, schedule=SCHED, num_steps=512, clip=False)
    # standard errors: s / sqrt(n) = 3.5e-3 (mean), s / sqrt(2n) = 2.5e-3 (std); allow 4 of them
    assert (out.mean(0) - MU).abs().max().item() < 0.014
    assert (out.std(0) - S).abs().max().item() < 0.01
    # a deterministic map: each sample keeps its rank
    assert torch.equal(out[:, 0].argsort(), z1[:, 0].argsort())


def test_ddim_converges_to_the_ode_map_at_first_order(z1_small):
    den = gaussian()
    ref = den.ode_map(z1_small, LAM1, LAM0)  # the exact PF-ODE endpoint at t = 0
    err, err_last = {}, {}
    for n in (64, 128, 256, 512):
        out = sample_ddim(den, z1_small, schedule=SCHED, num_steps=n, clip=False)
        err[n] = (out - ref).abs().max().item()
        # the last step returns x_pred at t = 1/N; the ideal solver would return E[x | z exact at 1/N]
        lam_last = SCHED.logsnr(torch.tensor(1.0 / n, dtype=F64))
        ideal = den(den.ode_map(z1_small, LAM1, lam_last), lam_last)
        err_last[n] = (out - ideal).abs().max().item()
        # ... which differs from the endpoint by O(1/N^2) only: ideal - ref = s c (f - 1) + O(sigma_0^2) with
        # c = (z_1 - alpha_1 mu) / sd_1 and f = alpha s / sd = (1 + e^-lambda / s^2)^-1/2, 1 - f <= e^-lambda / (2 s^2),
        # and e^-lambda(1/N) ~ (pi / 2N)^2.
        c_max = ((z1_small - alpha_sigma(LAM1)[0] * MU) / den.marginal_sd(LAM1, z1_small)).abs().max().item()
        bound = S * c_max * math.exp(-lam_last.item()) / (2 * S**2)
        gap = (ideal - ref).abs().max().item()
        assert 0.9 * bound < gap < bound + 1e-8
        assert bound < 1.1 * S * c_max * (math.pi / (2 * n)) ** 2 / (2 * S**2)
    assert err[512] < 6e-3
    for n in (64, 128, 256):  # first order: halving the step halves the error
        assert 1.8 < err[n] / err[2 * n] < 2.2
        assert 1.8 < err_last[n] / err_last[2 * n] < 2.2
    assert err[512] < err[64] / 7


# ---------------------------------------------------------------- Gaussian data: ancestral


def exact_ancestral_moments(n: int, frac: float):
    """Mean and variance of the ancestral sampler's output, exactly: with the Gaussian denoiser and no clipping
    the sampler is affine in (z_1, noise_0, ..., noise_{N-2}), so one batch of unit inputs gives every
    coefficient. Row 0: all zero; row 1: z_1 = 1; row k + 2: noise_k = 1."""
    b = n + 1
    z1 = torch.zeros(b, 2, dtype=F64)
    z1[1] = 1.0

    def unit_noise(i):
        e = torch.zeros(b, 2, dtype=F64)
        e[i + 2] = 1.0
        return e

    out = sample_ancestral(gaussian(), z1, schedule=SCHED, num_steps=n, noise=unit_noise, logvar_frac=frac,
                           clip=False)
    return out[0], ((out[1:] - out[0]) ** 2).sum(0)


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_ancestral_gaussian_moments_are_exact_in_the_limit(frac):
    sd_err = {}
    for n in (64, 256, 1024):
        mean, var = exact_ancestral_moments(n, frac)
        # with the exact denoiser the posterior mean keeps E[z_t] = alpha_t mu at every step
        assert (mean - MU).abs().max().item() < 1e-8
        sd_err[n] = (var.sqrt() - S).max().item()
        assert abs((var.sqrt() - S).min().item() - sd_err[n]) < 1e-10  # same in every dimension
    # fixed_small under-disperses, fixed_large over-disperses; both vanish like 1/N
    if frac == 0.0:
        assert all(e < 0 for e in sd_err.values())
    if frac == 1.0:
        assert all(e > 0 for e in sd_err.values())
    assert abs(sd_err[1024]) < 2.5e-3
    assert abs(sd_err[1024]) < abs(sd_err[256]) / 3 < abs(sd_err[64]) / 9


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_ancestral_gaussian_samples(frac):
    z1 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(10), dtype=F64)
    out = sample_ancestral(gaussian(), z1, schedule=SCHED, num_steps=256, noise=noise_fn(11, (20000, 2)),
                           logvar_frac=frac, clip=False)
    # sampling error as for DDIM, plus the 256-step bias (|sd error| < 7.5e-3, see the test above)
    assert (out.mean(0) - MU).abs().max().item() < 0.014
    assert (out.std(0) - S).abs().max().item() < 0.0175


# ---------------------------------------------------------------- Gaussian data: DPM-Solver++(2M)


def test_dpmpp_2m_converges_at_second_order(z1_small):
    den = gaussian()
    ref = den.ode_map(z1_small, LAM1, LAM0)
    err, err_ddim = {}, {}
    for n in (16, 32, 64, 128, 256, 512, 1024):
        err[n] = (sample_dpmpp_2m(den, z1_small, schedule=SCHED, num_steps=n, clip=False) - ref).abs().max().item()
        if n <= 128:
            out = sample_ddim(den, z1_small, schedule=SCHED, num_steps=n, clip=False)
            err_ddim[n] = (out - ref).abs().max().item()
            assert err[n] < err_ddim[n] / 4
    # second order: error ratio per halving of the step -> 4 (3.25, 3.4, 3.5 here: the logSNR steps near
    # t = 0 and 1 are not small, so it approaches 4 slowly; first order would give 2)
    for n in (128, 256, 512):
        assert 3.0 < err[n] / err[2 * n] < 4.5
    assert err[1024] < 1e-4
    # a regression guard: the final step at N >= 15 must be first order (no extrapolation to logSNR 20),
    # which used to make N = 15..32 worse than N = 14
    assert err[16] < 0.02 and err[32] < 0.02
