"""Analytic denoisers and closed forms for Gaussian data, used by the sampler tests.

Data x ~ N(mu, s^2 I) (mu broadcasts over the trailing dimensions of z; s a positive scalar).
With z_t = alpha_t x + sigma_t eps the marginal is z_t ~ N(alpha_t mu, (alpha_t^2 s^2 + sigma_t^2) I) and

    E[x | z_t] = mu + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu).

Probability-flow ODE map. Write y = z / sigma and rho = alpha / sigma; the DDIM ODE is
dy / drho = E[x | z] = mu + rho s^2 / (rho^2 s^2 + 1) (y - rho mu). Its solution through any point
is y = rho mu + sqrt(rho^2 s^2 + 1) c with c constant (differentiate: dy/drho = mu + rho s^2 c /
sqrt(rho^2 s^2 + 1), which is E[x | z] after substituting y). Multiplying by sigma:

    z_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) c,   c = standardised z, constant along the flow,

so the map from logSNR l1 to l0 is z_0 = alpha_0 mu + sd_0 (z_1 - alpha_1 mu) / sd_1 with
sd = sqrt(alpha^2 s^2 + sigma^2): the monotone transport between the two Gaussian marginals.
"""

from __future__ import annotations

import torch

from progdistill.diffusion.schedules import alpha_sigma


def _as(logsnr, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) logSNR broadcast against z (B, ...), in z's dtype."""
    logsnr = torch.as_tensor(logsnr, dtype=like.dtype)
    return logsnr.reshape(-1, *([1] * (like.dim() - 1))) if logsnr.dim() else logsnr


class GaussianDenoiser:
    """The exact denoiser E[x | z_t] for x ~ N(mu, s^2 I); a `DenoiserFn`. Counts its calls."""

    def __init__(self, mu, s: float):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = float(s)
        self.calls = 0

    def __call__(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels=None) -> torch.Tensor:
        self.calls += 1
        alpha, sigma = alpha_sigma(_as(logsnr_t, z_t))
        mu = self.mu.to(z_t.dtype)
        s2 = self.s**2
        return mu + alpha * s2 / (alpha**2 * s2 + sigma**2) * (z_t - alpha * mu)

    def marginal_sd(self, logsnr, like: torch.Tensor) -> torch.Tensor:
        """sd of z_t: sqrt(alpha_t^2 s^2 + sigma_t^2)."""
        alpha, sigma = alpha_sigma(_as(logsnr, like))
        return torch.sqrt(alpha**2 * self.s**2 + sigma**2)

    def ode_map(self, z: torch.Tensor, logsnr_from, logsnr_to) -> torch.Tensor:
        """The exact probability-flow ODE map z(lambda_from) -> z(lambda_to) (see the module docstring)."""
        a_from, _ = alpha_sigma(_as(logsnr_from, z))
        a_to, _ = alpha_sigma(_as(logsnr_to, z))
        mu = self.mu.to(z.dtype)
        c = (z - a_from * mu) / self.marginal_sd(logsnr_from, z)
        return a_to * mu + self.marginal_sd(logsnr_to, z) * c
