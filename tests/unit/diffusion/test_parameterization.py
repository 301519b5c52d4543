"""x / eps / v / both conversions, the Denoiser wrapper and the loss weightings (method.md §2, §3, §8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.losses import loss_weight, mean_flat, weighted_x_loss
from progdistill.diffusion.parameterization import (check_param, eps_from_x, output_channels, v_from_x_eps,
                                                    x_from_both, x_from_eps, x_from_v, x_pred_from_output)
from progdistill.diffusion.schedules import Schedule, alpha_sigma
from progdistill.errors import UserError

F64 = torch.float64


def make_problem(seed: int = 0, batch: int = 64, shape=(3, 4, 4), lo: float = -10.0, hi: float = 10.0):
    """Random x, eps, logSNR per example; z_t = alpha x + sigma eps. alpha/sigma shaped (B, 1, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(batch, *shape, generator=g, dtype=F64)
    logsnr = torch.rand(batch, generator=g, dtype=F64) * (hi - lo) + lo
    alpha, sigma = alpha_sigma(logsnr.reshape(-1, 1, 1, 1))
    return x, eps, logsnr, alpha, sigma, alpha * x + sigma * eps


def per_example_mse(a, b):
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)


def test_round_trips_x_eps_v():
    x, eps, _, alpha, sigma, z = make_problem()
    assert torch.allclose(eps_from_x(z, x, alpha, sigma), eps, atol=1e-9, rtol=0)
    assert torch.allclose(x_from_eps(z, eps, alpha, sigma), x, atol=1e-9, rtol=0)
    v = v_from_x_eps(x, eps, alpha, sigma)
    # closed forms: v = alpha eps - sigma x = (alpha z - x) / sigma, and eps = sigma z + alpha v
    assert torch.allclose(v, (alpha * z - x) / sigma, atol=1e-9, rtol=0)
    assert torch.allclose(sigma * z + alpha * v, eps, atol=1e-12, rtol=0)
    assert torch.allclose(x_from_v(z, v, alpha, sigma), x, atol=1e-12, rtol=0)
    # v has unit variance when x and eps do: alpha^2 + sigma^2 = 1
    assert torch.allclose(v**2 + (alpha * x + sigma * eps) ** 2, x**2 + eps**2, atol=1e-12, rtol=0)


def test_x_from_v_is_stable_at_both_ends():
    """At alpha ~ 4.5e-5 (t = 1) x = -v exactly enough; at sigma ~ 4.5e-5 (t = 0) x = z: no division."""
    x, eps, _, _, _, _ = make_problem(seed=1)
    for lam in (-20.0, 20.0):
        alpha, sigma = alpha_sigma(torch.tensor(lam, dtype=F64))
        z = alpha * x + sigma * eps
        v = v_from_x_eps(x, eps, alpha, sigma)
        assert torch.allclose(x_from_v(z, v, alpha, sigma), x, atol=1e-12, rtol=0)


def test_both_combines_the_heads_with_the_documented_weights():
    x, eps, _, alpha, sigma, z = make_problem(seed=2)
    assert torch.allclose(x_from_both(z, x, eps, alpha, sigma), x, atol=1e-12, rtol=0)
    # An error in one head reaches x_pred weighted by sigma^2 (x head) or alpha sigma (eps head):
    # the x head dominates at high noise, the eps head at low noise.
    delta = torch.randn_like(x)
    assert torch.allclose(x_from_both(z, x + delta, eps, alpha, sigma) - x, sigma**2 * delta, atol=1e-12, rtol=0)
    assert torch.allclose(x_from_both(z, x, eps + delta, alpha, sigma) - x, -alpha * sigma * delta, atol=1e-12,
                          rtol=0)


@pytest.mark.parametrize("param", ["x", "eps", "v", "both"])
def test_x_pred_from_true_output_is_x(param):
    x, eps, _, alpha, sigma, z = make_problem(seed=3, lo=-6.0, hi=6.0)
    out = {"x": x, "eps": eps, "v": v_from_x_eps(x, eps, alpha, sigma), "both": torch.cat([x, eps], 1)}[param]
    assert out.shape[1] == output_channels(param, x.shape[1])
    assert torch.allclose(x_pred_from_output(param, out, z, alpha, sigma), x, atol=1e-9, rtol=0)


def test_param_validation():
    assert check_param("v") == "v"
    with pytest.raises(UserError):
        check_param("score")
    assert output_channels("both", 3) == 6 and output_channels("x", 3) == 3


def test_v_mse_is_x_mse_over_sigma_squared():
    x, eps, _, alpha, sigma, z = make_problem(seed=4)
    x_pred = x + 0.3 * torch.randn_like(x)
    v = v_from_x_eps(x, eps, alpha, sigma)
    v_pred = v_from_x_eps(x_pred, eps_from_x(z, x_pred, alpha, sigma), alpha, sigma)
    lhs = per_example_mse(v, v_pred)
    rhs = per_example_mse(x, x_pred) / sigma.reshape(-1) ** 2
    assert torch.allclose(lhs, rhs, rtol=1e-9, atol=0)


def test_loss_weights_closed_forms():
    lam = torch.tensor([-5.0, -1.0, 0.0, 0.5, 3.0], dtype=F64)
    snr = torch.exp(lam)
    assert torch.equal(loss_weight("const", lam), torch.ones_like(lam))
    assert torch.allclose(loss_weight("snr", lam), snr)
    assert torch.allclose(loss_weight("snr_trunc", lam), torch.tensor([1.0, 1.0, 1.0, snr[3], snr[4]], dtype=F64))
    assert torch.allclose(loss_weight("snr_plus_one", lam), snr + 1)
    with pytest.raises(UserError):
        loss_weight("snr_max", lam)


def test_weightings_equal_the_other_parameterizations_mses():
    """method.md §3: snr = eps-MSE, snr_trunc = max(x-MSE, eps-MSE), snr_plus_one = v-MSE, per example."""
    x, eps, logsnr, alpha, sigma, z = make_problem(seed=5, lo=-8.0, hi=8.0)
    x_pred = x + 0.2 * torch.randn_like(x)
    eps_pred = eps_from_x(z, x_pred, alpha, sigma)
    v, v_pred = v_from_x_eps(x, eps, alpha, sigma), v_from_x_eps(x_pred, eps_pred, alpha, sigma)
    x_mse, eps_mse, v_mse = per_example_mse(x, x_pred), per_example_mse(eps, eps_pred), per_example_mse(v, v_pred)
    # both sides of snr_trunc's max occur in this batch
    assert bool((eps_mse > x_mse).any()) and bool((eps_mse < x_mse).any())
    expected = {"const": x_mse, "snr": eps_mse, "snr_trunc": torch.maximum(x_mse, eps_mse), "snr_plus_one": v_mse}
    for name, ref in expected.items():
        got = weighted_x_loss(x, x_pred, logsnr, name)
        assert got.shape == (x.shape[0],)
        assert torch.allclose(got.double(), ref, rtol=2e-5, atol=0), name  # the loss is computed in float32
    assert torch.allclose(mean_flat(torch.ones(2, 3, 4)), torch.ones(2))


# ---------------------------------------------------------------- Denoiser wrapper


class Oracle(nn.Module):
    """A 'network' that returns the true target for its parameterization and records its time input."""

    def __init__(self, param, x, eps, alpha, sigma):
        super().__init__()
        self.out = {"x": x, "eps": eps, "v": v_from_x_eps(x, eps, alpha, sigma), "both": torch.cat([x, eps], 1)}[param]
        self.taus = []

    def forward(self, z, tau, class_labels=None):
        self.taus.append(tau)
        return self.out.float()


@pytest.mark.parametrize("param", ["x", "eps", "v", "both"])
def test_denoiser_time_input_and_conversion(param):
    s = Schedule()
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 1 / 1024, 0.3], dtype=F64)
    logsnr = s.logsnr(t)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(6, 2, 4, 4, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(6, 2, 4, 4, generator=g, dtype=F64)
    alpha, sigma = alpha_sigma(logsnr.reshape(-1, 1, 1, 1))
    z = (alpha * x + sigma * eps).float()
    net = Oracle(param, x, eps, alpha, sigma)
    den = Denoiser(net, schedule=s, param=param)
    x_pred = den(z, logsnr.float())
    assert x_pred.dtype == torch.float32
    # eps is ill-conditioned at t = 1 (divides by alpha = 4.5e-5): leave that row out for it
    rows = slice(1, None) if param == "eps" else slice(None)
    assert torch.allclose(x_pred[rows].double(), x[rows], atol=2e-5, rtol=0)
    tau = net.taus[0]
    assert torch.allclose(tau.double(), 1024 * t - 1, atol=1e-3, rtol=0)
    assert tau[:4].tolist() == [1023.0, 767.0, 511.0, 255.0]
    assert abs(tau[4].item()) < 1e-5  # t = 1/1024 from a float32 logSNR: tau = 0 up to rounding
    if param != "eps":
        eps_pred = den.eps_pred(z, logsnr.float())
        # eps_pred divides by sigma: loose only at t = 1/1024 (sigma ~ 1.5e-3)
        assert torch.allclose(eps_pred[:4].double(), eps[:4], atol=1e-4, rtol=0)
