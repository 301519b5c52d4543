"""Schedules against closed forms (method.md §1 and §8)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from progdistill.diffusion.sampling import time_grid
from progdistill.diffusion.schedules import (NUM_TRAIN_TIMESTEPS, Schedule, abar_from_betas, alpha_sigma,
                                             linear_betas, logsnr_cosine, t_from_logsnr_cosine)
from progdistill.errors import UserError

T = NUM_TRAIN_TIMESTEPS
F64 = torch.float64


def dense_t(n: int = 10001) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, n, dtype=F64)


def pure_cosine_logsnr(t: torch.Tensor) -> torch.Tensor:
    """The paper's unrescaled cosine: -2 log tan(pi t / 2)."""
    return -2.0 * torch.log(torch.tan(0.5 * math.pi * t))


# ---------------------------------------------------------------- cosine


def test_cosine_endpoints_are_the_logsnr_range():
    s = Schedule()
    ends = s.logsnr(torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    assert abs(ends[0].item() - 20.0) < 1e-10
    assert abs(ends[1].item()) < 1e-12  # a t + b = pi / 4 at t = 1/2 (a + 2b = pi/2)
    assert abs(ends[2].item() + 20.0) < 1e-10
    # Other ranges land on their ends too.
    ends = Schedule(logsnr_min=-15.0, logsnr_max=12.0).logsnr(torch.tensor([0.0, 1.0], dtype=F64))
    assert torch.allclose(ends, torch.tensor([12.0, -15.0], dtype=F64), atol=1e-10, rtol=0)


def test_cosine_is_antisymmetric_and_strictly_decreasing():
    s = Schedule()
    t = dense_t()
    lam = s.logsnr(t)
    assert lam.dtype == F64
    assert bool((lam[1:] < lam[:-1]).all())
    # a (1 - t) + b = pi/2 - (a t + b), so lambda(1 - t) = -lambda(t) for the symmetric range.
    assert torch.allclose(lam.flip(0), -lam, atol=1e-9, rtol=0)


def test_cosine_inverse_round_trips():
    s = Schedule()
    t = dense_t()
    assert (s.t_from_logsnr(s.logsnr(t)) - t).abs().max().item() < 1e-10
    lam = torch.linspace(-20.0, 20.0, 4001, dtype=F64)
    assert (s.logsnr(s.t_from_logsnr(lam)) - lam).abs().max().item() < 1e-9
    # the pure functions agree with the class
    assert torch.equal(logsnr_cosine(t), s.logsnr(t))
    assert torch.equal(t_from_logsnr_cosine(lam), s.t_from_logsnr(lam))


def test_alpha_sigma_closed_forms():
    lam = torch.linspace(-25.0, 25.0, 1001, dtype=F64)
    alpha, sigma = alpha_sigma(lam)
    assert (alpha**2 + sigma**2 - 1.0).abs().max().item() < 1e-14
    # lambda = log(alpha^2 / sigma^2)
    assert (torch.log(alpha**2 / sigma**2) - lam).abs().max().item() < 1e-9
    # on the cosine schedule, well inside the range: alpha ~ cos(pi t / 2) (rescaling moves it by < 1e-4)
    t = torch.linspace(0.05, 0.95, 91, dtype=F64)
    alpha, sigma = alpha_sigma(Schedule().logsnr(t))
    assert (alpha - torch.cos(0.5 * math.pi * t)).abs().max().item() < 1e-4
    assert (sigma - torch.sin(0.5 * math.pi * t)).abs().max().item() < 1e-4


def test_alpha_at_one_and_sigma_at_zero_are_about_4p5e_minus_5():
    s = Schedule()
    alpha, sigma = alpha_sigma(s.logsnr(torch.tensor([1.0, 0.0], dtype=F64)))
    expected = math.exp(-10.0) / math.sqrt(1.0 + math.exp(-20.0))  # sqrt(sigmoid(-20)) = 4.539993e-5
    assert abs(alpha[0].item() - expected) < 1e-12
    assert abs(sigma[1].item() - expected) < 1e-12
    assert 4.53e-5 < expected < 4.55e-5


def test_cosine_differs_from_pure_cosine_only_as_documented():
    """method.md §1: a clamp of the pure cosine differs by 0.058 at t = 1/1024, by up to ~1.4 below 1e-4."""
    s = Schedule()
    # Away from the ends: within [1/1024, 1 - 1/1024] the largest gap is at the ends of that
    # interval (0.058, by symmetry at both), and it is tiny in the middle.
    t = torch.linspace(1.0 / T, 1.0 - 1.0 / T, 20001, dtype=F64)
    diff = (s.logsnr(t) - pure_cosine_logsnr(t)).abs()
    assert 0.055 < diff.max().item() < 0.06
    assert abs(diff[0].item() - diff.max().item()) < 1e-9 and abs(diff[-1].item() - diff.max().item()) < 1e-9
    mid = (t > 0.25) & (t < 0.75)
    assert diff[mid].max().item() < 3e-4
    # Near t = 0: the clamped pure cosine reaches 20 at tan(pi t / 2) = e^-10, where the rescaled form is
    # -2 log(2 e^-10) = 20 - 2 log 2: the largest gap, 1.386.
    t = torch.linspace(1e-7, 1e-4, 100001, dtype=F64)
    gap = (pure_cosine_logsnr(t).clamp(-20.0, 20.0) - s.logsnr(t)).abs().max().item()
    assert abs(gap - 2.0 * math.log(2.0)) < 1e-3


def test_cosine_time_input_is_1024_t_minus_1():
    s = Schedule()
    assert s.num_train_timesteps == 1024
    t = dense_t(4097)
    tau = s.time_input(s.logsnr(t))
    assert tau.dtype == torch.float32
    assert (tau.double() - (1024.0 * t - 1.0)).abs().max().item() < 1e-3
    # every grid point of an N-step sampler with N | 1024 lands exactly on an integer timestep
    for n in (1, 2, 4, 8, 16, 64, 1024):
        ti = time_grid(n)
        assert torch.equal(s.time_input(s.logsnr(ti)), (1024.0 * ti - 1.0).float())


def test_float32_inputs_keep_their_dtype():
    s = Schedule()
    t = torch.linspace(0, 1, 11)
    lam = s.logsnr(t)
    assert lam.dtype == torch.float32
    assert torch.allclose(lam.double(), s.logsnr(t.double()), atol=1e-5, rtol=1e-6)
    assert s.t_from_logsnr(lam).dtype == torch.float32


# ---------------------------------------------------------------- discrete (DDPM linear betas)


@pytest.fixture(scope="module")
def ddpm():
    return Schedule(kind="discrete", betas=linear_betas(1000))


def test_linear_betas_are_ddpms():
    from diffusers import DDPMScheduler

    b = np.asarray(linear_betas(1000))
    assert b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas.double().numpy()
    assert np.abs(b - ref).max() < 1e-8  # diffusers keeps float32


def test_discrete_logsnr_at_knots(ddpm):
    b = np.asarray(linear_betas(1000))
    abar = np.cumprod(1.0 - b)  # abar_j belongs to t = (j + 1) / T
    assert np.allclose(abar_from_betas(linear_betas(1000)).numpy(), abar, rtol=1e-13, atol=0)
    j = np.arange(1000)
    lam = ddpm.logsnr(torch.as_tensor((j + 1) / 1000.0, dtype=F64)).numpy()
    ref = np.log(abar / (1.0 - abar))
    assert np.abs(lam - ref).max() < 1e-10
    # linear in t between knots
    mid = ddpm.logsnr(torch.as_tensor((j[:-1] + 1.5) / 1000.0, dtype=F64)).numpy()
    assert np.abs(mid - 0.5 * (ref[:-1] + ref[1:])).max() < 1e-10
    assert bool((np.diff(lam) < 0).all())


def test_discrete_inverse_and_time_input(ddpm):
    t = torch.linspace(1.0 / 1000, 1.0, 7001, dtype=F64)
    assert (ddpm.t_from_logsnr(ddpm.logsnr(t)) - t).abs().max().item() < 1e-10
    assert ddpm.num_train_timesteps == 1000
    knots = torch.arange(1, 1001, dtype=F64) / 1000.0
    tau = ddpm.time_input(ddpm.logsnr(knots))
    assert (tau.double() - torch.arange(1000, dtype=F64)).abs().max().item() < 1e-3
    assert torch.equal(tau.round().long(), torch.arange(1000))
    # fractional timesteps in between (UNet2DModel accepts them)
    half = ddpm.time_input(ddpm.logsnr(knots[:-1] + 0.5 / 1000))
    assert (half.double() - (torch.arange(999, dtype=F64) + 0.5)).abs().max().item() < 1e-3


def test_discrete_clamps_beyond_its_range(ddpm):
    lam_first = ddpm.logsnr(torch.tensor([1.0 / 1000], dtype=F64))
    lam_last = ddpm.logsnr(torch.tensor([1.0], dtype=F64))
    # t below the first knot: clamped to the first knot's logSNR (~9.2 for DDPM, not 20)
    below = ddpm.logsnr(torch.tensor([0.0, 1e-4, 0.5 / 1000], dtype=F64))
    assert torch.equal(below, lam_first.expand(3))
    assert 9.0 < lam_first.item() < 9.5 and -10.5 < lam_last.item() < -10.0
    # logSNR outside the table: t clamped to [1/T, 1], tau to [0, T - 1]
    t = ddpm.t_from_logsnr(torch.tensor([30.0, 20.0, -20.0, -30.0], dtype=F64))
    assert torch.equal(t, torch.tensor([1e-3, 1e-3, 1.0, 1.0], dtype=F64))
    tau = ddpm.time_input(torch.tensor([30.0, -30.0], dtype=F64))
    assert torch.allclose(tau, torch.tensor([0.0, 999.0]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- diffusers betas (method.md §8)


def test_diffusers_betas_cumprod_to_our_abar():
    s = Schedule()
    betas = torch.tensor(s.diffusers_betas(), dtype=F64)
    assert betas.shape == (1024,)
    assert bool(((betas > 0) & (betas < 1)).all())
    j = torch.arange(1024, dtype=F64)
    abar = torch.sigmoid(s.logsnr((j + 1) / T))  # abar_j belongs to t = (j + 1) / T
    # the product telescopes to abar((j+1)/T) / abar(0), and abar(0) = sigmoid(20) = 1 - 2.06e-9
    cum = torch.cumprod(1.0 - betas, 0)
    assert (cum - abar).abs().max().item() < 3e-9
    assert (cum * torch.sigmoid(torch.tensor(20.0, dtype=F64)) - abar).abs().max().item() < 1e-13
    # An off-by-one (abar_j at t = j/T) would be off by ~2e-3 somewhere: make sure we are far from that.
    off_by_one = torch.sigmoid(s.logsnr(j / T))
    assert (cum - off_by_one).abs().max().item() > 1e-3


def test_diffusers_betas_as_a_discrete_table_reproduce_the_cosine():
    s = Schedule()
    d = Schedule(kind="discrete", betas=tuple(s.diffusers_betas()))
    knots = torch.arange(1, T + 1, dtype=F64) / T
    # at the knots the table's abar is ours divided by abar(0) = 1 - 2e-9: a logSNR gap of at most
    # 2e-9 / sigma^2(1/T) ~ 7e-4 at t = 1/T and far less elsewhere (knot-to-knot steps are >= 1e-2).
    gap = (d.logsnr(knots) - s.logsnr(knots)).abs()
    assert gap.max().item() < 1e-3
    assert gap[T // 8:].max().item() < 1e-5
    assert d.num_train_timesteps == T
    assert (d.time_input(s.logsnr(knots)).double() - (T * knots - 1)).abs().max().item() < 0.05


def test_diffusers_ddim_scheduler_alphas_cumprod_match():
    from diffusers import DDIMScheduler

    s = Schedule()
    sched = DDIMScheduler(num_train_timesteps=1024, trained_betas=s.diffusers_betas(), set_alpha_to_one=True,
                          timestep_spacing="trailing", steps_offset=0)
    j = torch.arange(1024, dtype=F64)
    abar = torch.sigmoid(s.logsnr((j + 1) / T))
    # diffusers works in float32: ~3e-7 (method.md §8)
    assert (sched.alphas_cumprod.double() - abar).abs().max().item() < 5e-7
    assert float(sched.final_alpha_cumprod) == 1.0


# ---------------------------------------------------------------- validation and serialisation


def test_schedule_validation():
    with pytest.raises(UserError):
        Schedule(kind="linear")
    with pytest.raises(UserError):
        Schedule(kind="discrete")
    with pytest.raises(UserError):
        Schedule(kind="discrete", betas=(0.1,))
    with pytest.raises(UserError):
        Schedule(kind="discrete", betas=(0.1, 1.0))
    with pytest.raises(UserError):
        Schedule(logsnr_min=5.0, logsnr_max=5.0)


@pytest.mark.parametrize("shift", [-3.0, 2.0, math.log(16.0)])
def test_shifted_cosine_is_the_cosine_plus_the_shift(shift):
    """Shifted cosine (Hoogeboom et al. 2023): lambda_s(t) = lambda(t) + s away from the clipped ends,
    exactly lambda_min / lambda_max at t = 1 / 0, and t_from_logsnr inverts it."""
    sched = Schedule(logsnr_shift=shift)
    t = dense_t()
    lam = sched.logsnr(t)
    # the range rescaling moves the ends of tan's argument by ~e^{-(20 -|s|)/2}: < 1e-2 on [0.05, 0.95]
    inner = (t > 0.05) & (t < 0.95)
    assert torch.allclose(lam[inner], pure_cosine_logsnr(t[inner]) + shift, atol=1e-2)
    mid = (t > 0.25) & (t < 0.75)
    assert torch.allclose(lam[mid], Schedule().logsnr(t[mid]) + shift, atol=2e-3)
    assert lam[0].item() == pytest.approx(20.0, abs=1e-9) and lam[-1].item() == pytest.approx(-20.0, abs=1e-9)
    assert bool((lam[1:] < lam[:-1]).all())
    assert torch.allclose(sched.t_from_logsnr(lam), t, atol=1e-9)
    # the network's time input follows the schedule's own t: grid points stay whole timesteps
    grid = time_grid(256)[:-1]
    assert torch.equal(sched.time_input(sched.logsnr(grid)), (T * grid - 1.0).round().float())


def test_shift_zero_is_the_plain_cosine_and_is_not_written():
    assert Schedule(logsnr_shift=0.0).to_dict() == Schedule().to_dict() == \
        {"kind": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0}
    for bad in (25.0, float("nan")):
        with pytest.raises(UserError, match="logsnr shift"):
            Schedule(logsnr_shift=bad)
    with pytest.raises(UserError, match="cosine schedule only"):
        Schedule(kind="discrete", betas=linear_betas(50), logsnr_shift=1.0)


@pytest.mark.parametrize("sched", [Schedule(), Schedule(logsnr_min=-15.0, logsnr_max=12.0),
                                   Schedule(logsnr_shift=2.0), Schedule(kind="discrete", betas=linear_betas(50))])
def test_to_dict_round_trip(sched):
    d = json.loads(json.dumps(sched.to_dict()))
    back = Schedule.from_dict(d)
    assert back == sched
    t = dense_t(101)
    assert torch.equal(back.logsnr(t), sched.logsnr(t))


# ---------------------------------------------------------------- exact time inputs, table export, zero terminal SNR


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("sched", [Schedule(), Schedule(kind="discrete", betas=linear_betas(1000)),
                                   Schedule(kind="discrete", betas=linear_betas(1024))], ids=["cosine", "ddpm1000", "ddpm1024"])
def test_time_input_is_an_exact_integer_at_every_grid_point(sched):
    """tau = T t - 1 from float64 lambda: whole timesteps exactly, for every N dividing T (1000 and 1024).

    A float32 round trip of t left ~6e-5 here for T = 1000; diffusers feeds the UNet the integers themselves.
    """
    T = sched.num_train_timesteps
    for n in divisors(T):
        t = time_grid(n)[:-1]  # t = 1 .. 1/N; t = 0 is never fed to the network
        tau = sched.time_input(sched.logsnr(t))
        assert tau.dtype == torch.float32
        assert torch.equal(tau, (T * t - 1.0).round().float()), n


def test_discrete_diffusers_betas_give_back_the_table():
    betas = linear_betas(1000)
    s = Schedule(kind="discrete", betas=betas)
    assert s.diffusers_betas() == list(betas)
    assert s.diffusers_betas(1000) == list(betas)
    with pytest.raises(UserError, match="num_train_timesteps"):
        s.diffusers_betas(1024)


def zero_snr_betas(T: int = 1000) -> tuple[float, ...]:
    from diffusers import DDPMScheduler

    return tuple(DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True).betas.double().tolist())


def test_zero_terminal_snr_table_is_accepted_and_has_no_nan():
    betas = zero_snr_betas()
    assert betas[-1] == 1.0
    s = Schedule(kind="discrete", betas=betas)
    assert s.zero_terminal_snr and not Schedule(kind="discrete", betas=linear_betas(1000)).zero_terminal_snr
    t = torch.linspace(0.0, 1.0, 100001, dtype=F64)
    lam = s.logsnr(t)
    assert not bool(lam.isnan().any())
    assert bool(torch.isfinite(lam[:-1]).all()) and lam[-1].item() == -math.inf
    assert bool((lam[1:] <= lam[:-1]).all())
    # lambda -> t is the exact inverse everywhere on [1/T, 1], including the last segment and t = 1
    back = s.t_from_logsnr(lam)
    inside = t >= 1.0 / 1000
    assert (back[inside] - t[inside]).abs().max().item() < 1e-10
    tau = s.time_input(lam)
    assert not bool(tau.isnan().any()) and tau[-1].item() == 999.0
    # the last segment is linear in abar: abar(t) = abar_{T-2} (1 - w), w = T t - (T - 1)
    abar = abar_from_betas(betas)
    last = torch.tensor([0.9991, 0.9995, 0.9999], dtype=F64)
    w = 1000 * last - 999
    assert torch.allclose(torch.sigmoid(s.logsnr(last)), abar[-2] * (1 - w), rtol=1e-9, atol=0)
    # lambda = -inf: t = 1, tau = T - 1; alpha = 0, sigma = 1
    inf = torch.tensor([-math.inf], dtype=F64)
    assert s.t_from_logsnr(inf).item() == 1.0 and s.time_input(inf).item() == 999.0
    alpha, sigma = alpha_sigma(inf.float())
    assert alpha.item() == 0.0 and sigma.item() == 1.0
    # the knots are the table's (and diffusers' alphas_cumprod, abar_{T-1} = 0)
    knots = torch.arange(1, 1001, dtype=F64) / 1000
    assert torch.allclose(torch.sigmoid(s.logsnr(knots)), abar, rtol=1e-12, atol=0)
    assert s.diffusers_betas() == list(betas)


def test_samplers_step_from_zero_terminal_snr_without_nan():
    """DDIM, ancestral and DPM-Solver++ start at lambda = -inf (alpha = 0): finite, and DDIM's first step is exact."""
    from progdistill.diffusion.sampling import ddim_step, sample_ancestral, sample_ddim, sample_dpmpp_2m

    s = Schedule(kind="discrete", betas=zero_snr_betas())
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 3, generator=g, dtype=F64)
    x0 = torch.full((6, 3), 0.25, dtype=F64)
    const = lambda z, lam, y: x0.to(z.dtype).expand_as(z)  # noqa: E731
    lam1, lam_half = s.logsnr(torch.tensor([1.0, 0.5], dtype=F64))
    # from alpha_t = 0: eps = z_t, so z_s = alpha_s x + sigma_s z_t
    a_s, s_s = alpha_sigma(lam_half)
    assert torch.allclose(ddim_step(z1, x0, logsnr_t=lam1, logsnr_s=lam_half), a_s * x0 + s_s * z1, atol=1e-12)
    for n in (1, 2, 4, 8):
        for out in (sample_ddim(const, z1, schedule=s, num_steps=n, clip=False),
                    sample_dpmpp_2m(const, z1, schedule=s, num_steps=n, clip=False),
                    sample_ancestral(const, z1, schedule=s, num_steps=n, clip=False,
                                     noise=lambda i: torch.randn(6, 3, generator=g, dtype=F64))):
            assert torch.allclose(out, x0)


def test_clip_range_clamps_x_pred():
    from progdistill.diffusion.sampling import sample_ddim

    s = Schedule()
    z1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    wide = lambda z, lam, y: 5.0 * torch.ones_like(z)  # noqa: E731
    assert torch.equal(sample_ddim(wide, z1, schedule=s, num_steps=1), torch.ones_like(z1))
    assert torch.equal(sample_ddim(wide, z1, schedule=s, num_steps=1, clip_range=2.5), torch.full_like(z1, 2.5))
    assert torch.equal(sample_ddim(wide, z1, schedule=s, num_steps=1, clip=False, clip_range=2.5), 5.0 * torch.ones_like(z1))


def test_samplers_hand_the_denoiser_float64_logsnr():
    from progdistill.diffusion.sampling import sample_ddim

    seen = []
    s = Schedule(kind="discrete", betas=linear_betas(1000))

    def rec(z, lam, y):
        seen.append(lam)
        return torch.zeros_like(z)

    sample_ddim(rec, torch.zeros(2, 1, 2, 2), schedule=s, num_steps=8)
    assert all(lam.dtype == F64 for lam in seen)
    assert torch.equal(s.time_input(torch.stack([lam[0] for lam in seen])), torch.arange(999.0, 0, -125))


def test_zero_snr_validation():
    with pytest.raises(UserError, match="last entry"):
        Schedule(kind="discrete", betas=(0.1, 1.0, 0.5))
    with pytest.raises(UserError):
        Schedule(kind="discrete", betas=(0.1, 1.5))
    Schedule(kind="discrete", betas=(0.1, 0.2, 1.0))
