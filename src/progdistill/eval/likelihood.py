"""Model likelihood of low-dimensional vectors through the probability-flow ODE (exact divergence)."""

from __future__ import annotations

import math

import numpy as np
import torch

from progdistill.data.normalize import Normalizer
from progdistill.diffusion.schedules import alpha_sigma


def ode_nll(denoiser, schedule, x: torch.Tensor, *, normalizer: Normalizer | None = None, rtol: float = 1e-5,
            atol: float = 1e-5) -> tuple[np.ndarray, int]:
    """Model NLL -log p(x) per point (nats) through the probability-flow ODE, exact divergence (low-dim vectors).

    x is in the data's units; with a `normalizer` the model sees u = (x - shift) / scale and
    -log p_x(x) = -log p_u(u) + sum_d log scale_d (the log-Jacobian of the decoding).

    In logSNR the DDIM ODE is dz/dlambda = alpha/2 (x_pred - alpha z) (from d(z/sigma)/d(alpha/sigma) = x_pred);
    log p_0(x) = log N(z_1; 0, sigma_1^2 I) - int_{lambda_min}^{lambda_max} div dz/dlambda. Returns (nll, NFE).
    """
    from scipy.integrate import solve_ivp
    x = torch.as_tensor(x, dtype=torch.float64).reshape(len(x), -1)
    log_det = 0.0
    if normalizer is not None:
        x, log_det = normalizer.encode(x), normalizer.log_det_decode()
    x = x.float()
    n, d = x.shape
    lam_max = float(schedule.logsnr(torch.tensor(0.0, dtype=torch.float64)))
    lam_min = float(schedule.logsnr(torch.tensor(1.0, dtype=torch.float64)))

    def f(lam, state):
        z = torch.from_numpy(state[:n * d].reshape(n, d)).float().requires_grad_(True)
        with torch.enable_grad():
            xp = denoiser(z, torch.full((n,), lam, dtype=torch.float32), None)
            div = sum(torch.autograd.grad(xp[:, i].sum(), z, retain_graph=i < d - 1)[0][:, i] for i in range(d))
        alpha = math.sqrt(1 / (1 + math.exp(-lam)))
        v = 0.5 * alpha * (xp.detach() - alpha * z.detach())
        return np.concatenate([v.double().numpy().ravel(), (0.5 * alpha * (div.detach().double() - alpha * d)).numpy()])

    sol = solve_ivp(f, (lam_max, lam_min), np.concatenate([x.double().numpy().ravel(), np.zeros(n)]),
                    method="RK45", rtol=rtol, atol=atol)
    z1, int_div = sol.y[:n * d, -1].reshape(n, d), sol.y[n * d:, -1]
    var1 = float(alpha_sigma(torch.tensor(lam_min, dtype=torch.float64))[1] ** 2)
    logp1 = -0.5 * (z1 ** 2).sum(1) / var1 - 0.5 * d * math.log(2 * math.pi * var1)
    return -(logp1 + int_div) + log_det, int(sol.nfev)
