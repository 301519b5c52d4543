"""Whole timesteps for discrete (T-entry) teachers (docs/method.md §10): the grid k_i / T with
k_i = round-half-even(i T / N), its relation to i/N and to diffusers' trailing timesteps, and the
network time inputs it gives (only whole numbers in [0, T - 1])."""

from __future__ import annotations

import pytest
import torch

from progdistill.diffusion.sampling import sample_ddim, time_grid
from progdistill.diffusion.schedules import Schedule, linear_betas, whole_timesteps
from progdistill.diffusion.targets import distillation_target
from progdistill.errors import UserError

diffusers = pytest.importorskip("diffusers")


def table(T: int, grid: str = "timesteps") -> Schedule:
    return Schedule(kind="discrete", betas=linear_betas(T), grid=grid)


def test_round_half_even_in_exact_integers():
    # i T / N = 2.5, 3.5, 7.5 round to the even neighbour; others to the nearest
    assert whole_timesteps(torch.tensor([1, 1, 3]), 4, 10).tolist() == [2, 2, 8]   # 2.5 -> 2, 7.5 -> 8
    assert whole_timesteps(torch.tensor([7]), 2, 1).tolist() == [4]                  # 3.5 -> 4
    assert whole_timesteps(torch.arange(0, 513), 512, 1000)[[0, -1]].tolist() == [0, 1000]


@pytest.mark.parametrize("T", [1000, 200, 999, 64])
def test_equal_to_diffusers_trailing_timesteps_plus_one_for_powers_of_two(T):
    for n in [2 ** k for k in range(0, 11) if 2 ** k <= T]:
        sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        sched.set_timesteps(n)
        k = whole_timesteps(torch.arange(n, 0, -1), n, T)
        assert k.tolist() == (sched.timesteps + 1).tolist(), n


@pytest.mark.parametrize("T, n", [(1000, 8), (1000, 250), (200, 8), (64, 64), (1000, 1000)])
def test_equal_to_i_over_n_whenever_n_divides_t(T, n):
    i = torch.arange(n, -1, -1)
    assert whole_timesteps(i, n, T).tolist() == (i * T // n).tolist()
    assert torch.equal(table(T).time_grid(n), table(T, "uniform").time_grid(n))    # bit for bit
    assert torch.equal(time_grid(n, table(T)), time_grid(n))


@pytest.mark.parametrize("T, n", [(1000, 256), (200, 64), (999, 128)])
def test_the_student_grid_is_every_other_point_of_the_teachers(T, n):
    assert torch.equal(table(T).time_grid(2 * n)[::2], table(T).time_grid(n))


@pytest.mark.parametrize("T", [1000, 200])
@pytest.mark.parametrize("n", [1, 2, 4, 16, 128, 512])
def test_time_inputs_are_whole_timesteps_in_range(T, n):
    if n > T:
        pytest.skip("more steps than timesteps")
    s = table(T)
    tau = s.time_input(s.logsnr(s.time_grid(n)[:-1]))        # every evaluated point (t_0 = 0 never is)
    assert torch.equal(tau, tau.round()) and 0 <= tau.min() and tau.max() == T - 1
    assert tau.tolist() == (whole_timesteps(torch.arange(n, 0, -1), n, T) - 1).tolist()


def test_distillation_targets_use_points_2i_2i_minus_1_2i_minus_2_of_the_2n_grid():
    s, n = table(1000), 256           # N does not divide T: 2N = 512 points, many fractional under i/N
    i = torch.arange(1, n + 1)
    t, t1, t2 = s.step_times(i, n)
    fine = s.time_grid(2 * n).flip(0)                        # ascending: fine[j] = t_j of the 2N grid
    assert torch.equal(t, fine[2 * i]) and torch.equal(t1, fine[2 * i - 1]) and torch.equal(t2, fine[2 * i - 2])
    for tt in (t, t1):
        tau = s.time_input(s.logsnr(tt))
        assert torch.equal(tau, tau.round())
    # the uniform grid keeps the released code's t - 0.5/N and t - 1/N exactly
    u = table(1000, "uniform")
    ut, ut1, ut2 = u.step_times(i, n)
    assert torch.equal(ut1, i.double() / n - 0.5 / n) and torch.equal(ut2, i.double() / n - 1.0 / n)


def test_a_teacher_only_ever_sees_whole_timesteps_while_sampling_and_in_targets():
    s, seen = table(1000), []

    def teacher(z, logsnr, labels=None):
        seen.append(s.time_input(logsnr.to(torch.float64)))
        return torch.zeros_like(z)

    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    sample_ddim(teacher, z, schedule=s, num_steps=64, clip=False)
    distillation_target(teacher, z, i=torch.tensor([1, 17, 64]), num_steps=64, schedule=s)
    tau = torch.cat([x.reshape(-1) for x in seen])
    assert len(seen) == 64 + 2 and torch.equal(tau, tau.round()) and 0 <= tau.min() and tau.max() <= 999


def test_more_steps_than_timesteps_are_refused_in_one_line():
    with pytest.raises(UserError, match="exceed the teacher's 200 timesteps") as e:
        table(200).time_grid(256)
    assert "\n" not in str(e.value)
    assert len(table(200, "uniform").time_grid(256)) == 257          # i/N: fractional inputs, as before
    with pytest.raises(UserError, match="discrete"):
        Schedule(grid="timesteps")
    with pytest.raises(UserError, match="unknown time grid"):
        Schedule(kind="discrete", betas=linear_betas(10), grid="fine")


def test_the_grid_round_trips_through_the_card_and_old_cards_stay_uniform():
    s = table(50)
    assert s.to_dict()["grid"] == "timesteps" and Schedule.from_dict(s.to_dict()) == s
    old = table(50, "uniform").to_dict()
    assert "grid" not in old and Schedule.from_dict(old).grid == "uniform"
