"""Schedules against closed forms (method.md §1 and §8)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from progdistill.errors import UserError
from progdistill.sampling import time_grid
from progdistill.schedules import (NUM_TRAIN_TIMESTEPS, Schedule, abar_from_betas, alpha_sigma, linear_betas,
                                   logsnr_cosine, t_from_logsnr_cosine)

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


@pytest.mark.parametrize("sched", [Schedule(), Schedule(logsnr_min=-15.0, logsnr_max=12.0),
                                   Schedule(kind="discrete", betas=linear_betas(50))])
def test_to_dict_round_trip(sched):
    d = json.loads(json.dumps(sched.to_dict()))
    back = Schedule.from_dict(d)
    assert back == sched
    t = dense_t(101)
    assert torch.equal(back.logsnr(t), sched.logsnr(t))
