"""Analytic class-conditional denoisers for per-class Gaussian data, used by the guidance tests.

Data: c ~ uniform over K classes, x | c ~ N(mu_c, s^2 I). With z_t = alpha_t x + sigma_t eps and
v_t = alpha_t^2 s^2 + sigma_t^2:

    E[x | z_t, c] = mu_c + alpha_t s^2 / v_t (z_t - alpha_t mu_c)             (the conditional denoiser)
    p(c | z_t)    = softmax_c(-||z_t - alpha_t mu_c||^2 / (2 v_t))              (equal priors, shared v_t)
    E[x | z_t]    = sum_c p(c | z_t) E[x | z_t, c]                            (the null-class denoiser)

Label K (one past the real classes) is the null class, as in progdistill's networks.
"""

from __future__ import annotations

import torch

from progdistill.diffusion.guided import guided_x
from progdistill.diffusion.schedules import alpha_sigma


def _as(v, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


class ClassGaussianDenoiser:
    """E[x | z_t, c] for x | c ~ N(mu_c, s^2 I); label K gives the mixture posterior E[x | z_t]. Counts calls
    and records the labels it saw. With `w_conditioned=True` it is the exact guided model x^w(z_t, c) taking w."""

    def __init__(self, mus: torch.Tensor, s: float):
        self.mus = torch.as_tensor(mus, dtype=torch.float64)   # (K, d)
        self.s, self.calls, self.labels_seen = float(s), 0, []

    @property
    def null_label(self) -> int:
        return self.mus.shape[0]

    def conditional(self, z_t, logsnr_t, c):
        alpha, sigma = alpha_sigma(_as(logsnr_t, z_t))
        mu = self.mus.to(z_t.dtype)[c]
        v = alpha**2 * self.s**2 + sigma**2
        return mu + alpha * self.s**2 / v * (z_t - alpha * mu)

    def unconditional(self, z_t, logsnr_t):
        alpha, sigma = alpha_sigma(_as(logsnr_t, z_t))
        v = alpha**2 * self.s**2 + sigma**2                                 # (B, 1)
        mus = self.mus.to(z_t.dtype)                                        # (K, d)
        d2 = ((z_t[:, None, :] - alpha[:, None] * mus[None]) ** 2).sum(-1)  # (B, K)
        post = torch.softmax(-d2 / (2 * v), dim=1)                          # p(c | z_t)
        means = mus[None] + (alpha * self.s**2 / v)[:, None] * (z_t[:, None, :] - alpha[:, None] * mus[None])
        return (post[..., None] * means).sum(1)

    def __call__(self, z_t, logsnr_t, class_labels, w=None):
        self.calls += 1
        self.labels_seen.append(class_labels.clone())
        logsnr_t = torch.as_tensor(logsnr_t, dtype=z_t.dtype).expand(z_t.shape[0])
        null = class_labels == self.null_label
        x = self.conditional(z_t, logsnr_t, class_labels.clamp(max=self.null_label - 1))
        if null.any():
            x = torch.where(null[:, None], self.unconditional(z_t, logsnr_t), x)
        if w is not None:   # the exact w-conditioned model x^w(z_t, c): what guidance distillation aims at
            x = guided_x(x, self.unconditional(z_t, logsnr_t), w=w)
        return x


def make(k: int = 3, d: int = 2, s: float = 0.3, seed: int = 0) -> ClassGaussianDenoiser:
    g = torch.Generator().manual_seed(seed)
    return ClassGaussianDenoiser(1.5 * torch.randn(k, d, generator=g, dtype=torch.float64), s)
