"""The distillation target (method.md §6) against an analytic teacher, plus the round plan."""

import pytest
import torch
from gaussian import GaussianDenoiser

from progdistill.diffusion.sampling import ddim_step, halve_grid, time_grid
from progdistill.diffusion.schedules import Schedule
from progdistill.diffusion.targets import distillation_target, two_teacher_steps, x_target
from progdistill.errors import UserError
from progdistill.train.distill import plan_rounds, student_param_for

SCHED = Schedule()


def _setup(n: int, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = GaussianDenoiser(mu=torch.tensor([0.3, -0.5, 0.1]), s=0.4)
    i = torch.randint(2, n + 1, (batch,), generator=g) if n >= 2 else torch.ones(batch, dtype=torch.long)
    z_t = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    return teacher, i, z_t


@pytest.mark.parametrize("n", [2, 4, 16, 256])
def test_one_student_step_lands_on_two_teacher_steps(n):
    teacher, i, z_t = _setup(n)
    t = i.double() / n
    l_t, l_t1, l_t2 = SCHED.logsnr(t), SCHED.logsnr(t - 0.5 / n), SCHED.logsnr(t - 1.0 / n)
    z_t2, _ = two_teacher_steps(teacher, z_t, logsnr_t=l_t, logsnr_t1=l_t1, logsnr_t2=l_t2)
    target = distillation_target(teacher, z_t, i=i, num_steps=n, schedule=SCHED)
    z_student = ddim_step(z_t, target, logsnr_t=l_t, logsnr_s=l_t2)
    torch.testing.assert_close(z_student, z_t2, rtol=0, atol=1e-9)


def test_swapped_intermediate_times_fail_the_check():
    """Negative control: with t' and t'' swapped the student step must miss the teacher's z_t''."""
    n = 8
    teacher, i, z_t = _setup(n)
    t = i.double() / n
    l_t, l_t1, l_t2 = SCHED.logsnr(t), SCHED.logsnr(t - 0.5 / n), SCHED.logsnr(t - 1.0 / n)
    z_t2, _ = two_teacher_steps(teacher, z_t, logsnr_t=l_t, logsnr_t1=l_t1, logsnr_t2=l_t2)
    z_wrong, _ = two_teacher_steps(teacher, z_t, logsnr_t=l_t, logsnr_t1=l_t2, logsnr_t2=l_t1)
    wrong_target = x_target(z_t, z_wrong, logsnr_t=l_t, logsnr_t2=l_t1)
    z_student = ddim_step(z_t, wrong_target, logsnr_t=l_t, logsnr_s=l_t2)
    assert (z_student - z_t2).abs().max() > 1e-3


def test_target_at_i_equal_one_is_the_teachers_second_prediction():
    n = 4
    teacher, _, z_t = _setup(n)
    i = torch.ones(z_t.shape[0], dtype=torch.long)
    t = i.double() / n
    l_t, l_t1 = SCHED.logsnr(t), SCHED.logsnr(t - 0.5 / n)
    z_t1 = ddim_step(z_t, teacher(z_t, l_t), logsnr_t=l_t, logsnr_s=l_t1)
    expected = teacher(z_t1, l_t1)
    got = distillation_target(teacher, z_t, i=i, num_steps=n, schedule=SCHED)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # ... and it differs from the general formula by about sigma_0 = 4.5e-5, which is why it is special-cased
    z_t2, _ = two_teacher_steps(teacher, z_t, logsnr_t=l_t, logsnr_t1=l_t1, logsnr_t2=SCHED.logsnr(t - 1.0 / n))
    general = x_target(z_t, z_t2, logsnr_t=l_t, logsnr_t2=SCHED.logsnr(t - 1.0 / n))
    assert 1e-7 < (general - expected).abs().max() < 1e-3


def test_mixed_batch_uses_special_case_only_at_i_one():
    n = 8
    teacher, _, z_t = _setup(n, batch=4)
    i = torch.tensor([1, 2, 1, 8])
    got = distillation_target(teacher, z_t, i=i, num_steps=n, schedule=SCHED)
    for k in range(4):
        one = distillation_target(teacher, z_t[k:k + 1], i=i[k:k + 1], num_steps=n, schedule=SCHED)
        torch.testing.assert_close(got[k:k + 1], one, rtol=0, atol=1e-12)


def test_student_grid_is_every_other_teacher_point():
    for n in [2, 8, 256]:
        teacher_grid = time_grid(2 * n)
        assert torch.equal(halve_grid(teacher_grid), time_grid(n))
        # the distillation's intermediate time t' = t - 0.5/N is exactly the teacher grid point between
        t = time_grid(n)[:-1]
        assert torch.equal(teacher_grid[1::2], t - 0.5 / n)


def test_plan_rounds_halves_to_final_and_lengthens_last_two():
    rounds = plan_rounds(256, 1, 100, 2.0)
    assert [r["steps"] for r in rounds] == [128, 64, 32, 16, 8, 4, 2, 1]
    assert [r["iters"] for r in rounds] == [100] * 6 + [200, 200]
    assert [r["steps"] for r in plan_rounds(8192, 4, 10, 1.0)] == [4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4]


def test_student_parameterization_defaults():
    assert student_param_for("eps", None) == "v"
    assert student_param_for("x", None) == "x"
    assert student_param_for("both", None) == "both"
    assert student_param_for("eps", "x") == "x"
    with pytest.raises(UserError, match="eps student"):
        student_param_for("v", "eps")


def test_plan_rounds_takes_explicit_iterations_per_round():
    rounds = plan_rounds(16, 1, 100, 3.0, round_iters=[40, 30, 20, 10])
    assert [(r["steps"], r["iters"]) for r in rounds] == [(8, 40), (4, 30), (2, 20), (1, 10)]
    with pytest.raises(UserError, match="takes 4"):
        plan_rounds(16, 1, 100, 3.0, round_iters=[40, 30])


def test_target_clip_clamps_the_teachers_x_predictions_as_its_sampler_does():
    """--target-clip: both teacher x predictions inside the target are clamped to [-r, r]; unclipped by default."""
    from progdistill.diffusion.sampling import ddim_step
    from progdistill.diffusion.schedules import Schedule
    from progdistill.diffusion.targets import distillation_target, x_target

    s = Schedule()
    z = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    i, n = torch.tensor([2, 3, 4, 2, 3, 4]), 4

    def teacher(z_t, logsnr, labels=None):      # predicts x far outside the data range
        return 3.0 * z_t + 2.0

    t, t1, t2 = s.step_times(i, n)
    lt, l1, l2 = (s.logsnr(v) for v in (t, t1, t2))
    clipped = distillation_target(teacher, z, i=i, num_steps=n, schedule=s, clip_range=1.0)
    z1 = ddim_step(z, teacher(z, lt).clamp(-1, 1), logsnr_t=lt, logsnr_s=l1)
    z2 = ddim_step(z1, teacher(z1, l1).clamp(-1, 1), logsnr_t=l1, logsnr_s=l2)
    torch.testing.assert_close(clipped, x_target(z, z2, logsnr_t=lt.float(), logsnr_t2=l2.float()))
    plain = distillation_target(teacher, z, i=i, num_steps=n, schedule=s)
    assert not torch.allclose(plain, clipped)
