"""Guided sampling (method.md §9) and the stochastic N-step sampler, against closed forms."""

import pytest
import torch
from class_gaussian import make
from gaussian import GaussianDenoiser

from progdistill.diffusion.guided import GuidedDenoiser, guided_x
from progdistill.diffusion.sampling import ddim_step, renoise_step, sample_ddim, sample_stochastic, time_grid
from progdistill.diffusion.schedules import Schedule, alpha_sigma
from progdistill.errors import UserError
from progdistill.nets.presets import ModelConfig
from progdistill.store.card import ModelCard
from progdistill.store.guided import check_guidable, guided_denoiser

SCHED = Schedule()


def _z(b=64, d=2, seed=1):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ guided combination
def test_guided_teacher_is_the_closed_form_combination_with_w_per_example():
    teacher = make()
    z, y = _z(), torch.arange(64) % 3
    logsnr = SCHED.logsnr(torch.rand(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    w = torch.linspace(0, 4, 64, dtype=torch.float64)
    got = GuidedDenoiser(teacher, w=w, null_label=3)(z, logsnr, y)
    want = (1 + w[:, None]) * teacher.conditional(z, logsnr, y) - w[:, None] * teacher.unconditional(z, logsnr)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the null label appears only in the unconditional half of the one batched call
    seen = teacher.labels_seen[-1]
    assert torch.equal(seen[:64], y) and (seen[64:] == 3).all()


def test_negative_control_a_real_class_as_null_is_not_guidance():
    teacher = make()
    z, y, logsnr = _z(), torch.arange(64) % 3, SCHED.logsnr(torch.tensor(0.5, dtype=torch.float64))
    right = GuidedDenoiser(teacher, w=2.0, null_label=3)(z, logsnr, y)
    wrong = GuidedDenoiser(teacher, w=2.0, null_label=0)(z, logsnr, y)
    assert (right - wrong).abs().max() > 1e-2


def test_guided_x_and_nfe():
    xc, xu = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(guided_x(xc, xu, w=0.5), 1.5 * xc)
    teacher = make()
    g = GuidedDenoiser(teacher, w=0.0, null_label=3)
    sample_ddim(g, _z(8), schedule=SCHED, num_steps=4, class_labels=torch.zeros(8, dtype=torch.long), clip=False)
    assert g.nfe == 4 and teacher.calls == 4          # w = 0: the conditional alone, 1 evaluation per step
    g = GuidedDenoiser(teacher, w=1.0, null_label=3)
    sample_ddim(g, _z(8), schedule=SCHED, num_steps=4, class_labels=torch.zeros(8, dtype=torch.long), clip=False)
    assert g.nfe == 8                                  # w > 0: 2 evaluations per step


def _card(*, classes=10, kind="teacher", provenance=None, null_class=True):
    return ModelCard(model=ModelConfig(num_classes=classes), param="v", schedule=SCHED,
                     data={"spec": "digits", "kind": "image", "shape": [1, 8, 8], "num_classes": classes},
                     kind=kind, null_class=null_class,
                     provenance={"label_dropout": 0.1} if provenance is None else provenance)


@pytest.mark.parametrize("card, message", [
    (_card(classes=0), "unconditional"),
    (_card(kind="student"), "plainly distilled student"),
    (_card(provenance={}), "does not record label dropout"),
    (_card(provenance={"label_dropout": 0.0}), "without label dropout"),
    (_card(null_class=False), "no null class"),
])
def test_unguidable_models_are_refused_in_one_line(card, message):
    with pytest.raises(UserError, match=message) as e:
        check_guidable(card, "M")
    assert "\n" not in str(e.value)


def test_guidable_teacher_and_bad_w():
    assert check_guidable(_card()) == 10
    assert guided_denoiser(make(), _card(), 0.0)[1] == 1 and guided_denoiser(make(), _card(), 2.0)[1] == 2
    assert guided_denoiser(make(), _card(classes=0), None)[1] == 1      # no guidance asked: anything samples
    with pytest.raises(UserError, match=">= 0"):
        guided_denoiser(make(), _card(), -1.0)


# ------------------------------------------------------------------ stochastic sampler
@pytest.mark.parametrize("t_k, t_s", [(0.25, 0.5), (0.0, 0.125), (0.5, 0.75)])
def test_renoising_has_the_forward_conditional_q_zs_given_zk(t_k, t_s):
    """Mean (alpha_s/alpha_k) z_k and variance (1 - e^{lambda_s - lambda_k}) sigma_s^2, per z_k (4 sigma bounds)."""
    l_k, l_s = SCHED.logsnr(torch.tensor(t_k, dtype=torch.float64)), SCHED.logsnr(torch.tensor(t_s, dtype=torch.float64))
    z_k = torch.tensor([[-1.0, 0.0, 2.0]], dtype=torch.float64).expand(200_000, 3)
    eps = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z_s = renoise_step(z_k, eps, logsnr_k=l_k, logsnr_s=l_s)
    (a_k, _), (a_s, s_s) = alpha_sigma(l_k), alpha_sigma(l_s)
    var = (1 - torch.exp(l_s - l_k)) * s_s**2
    n = z_s.shape[0]
    assert ((z_s.mean(0) - a_s / a_k * z_k[0]).abs() < 4 * (var / n).sqrt()).all()
    assert ((z_s.var(0) / var - 1).abs() < 4 * (2 / n) ** 0.5).all()


def test_renoising_keeps_the_data_marginal_and_a_wrong_variance_does_not():
    """z_k ~ q(z_k) for x ~ N(mu, s^2) -> z_s ~ q(z_s) = N(alpha_s mu, alpha_s^2 s^2 + sigma_s^2); negative
    control: sigma_k^2 in place of sigma_s^2 misses the variance."""
    mu, s, n = 0.7, 0.4, 400_000
    g = torch.Generator().manual_seed(3)
    l_k, l_s = SCHED.logsnr(torch.tensor(0.25, dtype=torch.float64)), SCHED.logsnr(torch.tensor(0.5, dtype=torch.float64))
    (a_k, s_k), (a_s, s_s) = alpha_sigma(l_k), alpha_sigma(l_s)
    x = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    z_k = a_k * x + s_k * torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    z_s = renoise_step(z_k, eps, logsnr_k=l_k, logsnr_s=l_s)
    var = a_s**2 * s**2 + s_s**2
    assert abs(z_s.mean() - a_s * mu) < 4 * (var / n).sqrt()
    assert abs(z_s.var() / var - 1) < 4 * (2 / n) ** 0.5
    wrong = a_s / a_k * z_k + ((1 - torch.exp(l_s - l_k)) * s_k**2).sqrt() * eps
    assert abs(wrong.var() / var - 1) > 20 * (2 / n) ** 0.5


class _Recorder:
    def __init__(self, inner):
        self.inner, self.logsnrs, self.inputs, self.outputs = inner, [], [], []

    def __call__(self, z, logsnr, c):
        x = self.inner(z, logsnr, c)
        self.logsnrs.append(float(logsnr[0]))
        self.inputs.append(z.clone())
        self.outputs.append(x.clone())
        return x


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_stochastic_sampler_evaluates_on_the_grid_n_times(n):
    den = _Recorder(GaussianDenoiser(mu=torch.tensor([0.3, -0.2]), s=0.5))
    noise = lambda j: torch.randn(16, 2, generator=torch.Generator().manual_seed(j), dtype=torch.float64)  # noqa: E731
    sample_stochastic(den, _z(16), schedule=SCHED, num_steps=n, noise=noise, clip=False)
    assert den.logsnrs == SCHED.logsnr(time_grid(n)[:-1]).tolist()


def test_stochastic_edges_one_step_is_ddim_and_the_jump_to_zero_lands_on_x_pred():
    gauss = GaussianDenoiser(mu=torch.tensor([0.3, -0.2]), s=0.5)
    z = _z(16)
    one = sample_stochastic(gauss, z, schedule=SCHED, num_steps=1, noise=None, clip=False)
    torch.testing.assert_close(one, sample_ddim(gauss, z, schedule=SCHED, num_steps=1, clip=False), rtol=0, atol=0)
    # N = 2: from t = 1 the 2/N jump lands on k = 0 (z_k = x_pred), then noise to s = 1/2 (zero noise here)
    den = _Recorder(gauss)
    sample_stochastic(den, z, schedule=SCHED, num_steps=2, noise=lambda j: torch.zeros_like(z), clip=False)
    g = SCHED.logsnr(time_grid(2))
    a_half, a_0 = alpha_sigma(g[1])[0], alpha_sigma(g[2])[0]
    torch.testing.assert_close(den.inputs[1], a_half / a_0 * den.outputs[0], rtol=0, atol=1e-12)
    # N = 4, i = 4: a DDIM step of length 2/N to k = 1/2, then re-noising to s = 3/4
    den = _Recorder(gauss)
    eps = torch.randn_like(z)
    sample_stochastic(den, z, schedule=SCHED, num_steps=4, noise=lambda j: eps, clip=False)
    g = SCHED.logsnr(time_grid(4))
    z_k = ddim_step(z, den.outputs[0], logsnr_t=g[0], logsnr_s=g[2])
    torch.testing.assert_close(den.inputs[1], renoise_step(z_k, eps, logsnr_k=g[2], logsnr_s=g[1]), rtol=0, atol=0)
