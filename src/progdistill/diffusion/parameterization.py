"""Network output parameterizations and the x/eps/v conversions (docs/method.md §2).

All functions are pure; alpha and sigma broadcast against z (shape (B, 1, ...)).
"""

from __future__ import annotations

import torch

from progdistill.errors import UserError

PARAMETERIZATIONS = ("eps", "x", "v", "both")


def check_param(param: str) -> str:
    if param not in PARAMETERIZATIONS:
        raise UserError(f"unknown parameterization {param!r}: choose one of {', '.join(PARAMETERIZATIONS)}")
    return param


def output_channels(param: str, channels: int) -> int:
    """`both` has two heads (x~, eps~): 2C output channels; the others C."""
    return 2 * channels if check_param(param) == "both" else channels


def x_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x = (z_t - sigma_t eps) / alpha_t."""
    return (z_t - sigma * eps) / alpha


def eps_from_x(z_t: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = (z_t - alpha_t x) / sigma_t."""
    return (z_t - alpha * x) / sigma


def x_from_v(z_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x = alpha_t z_t - sigma_t v."""
    return alpha * z_t - sigma * v


def v_from_x_eps(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x."""
    return alpha * eps - sigma * x


def x_from_both(z_t: torch.Tensor, x_tilde: torch.Tensor, eps_tilde: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """x = sigma_t^2 x~ + alpha_t (z_t - sigma_t eps~)  (alpha^2 + sigma^2 = 1)."""
    return sigma**2 * x_tilde + alpha * (z_t - sigma * eps_tilde)


def x_pred_from_output(param: str, out: torch.Tensor, z_t: torch.Tensor, alpha: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
    """Turn the raw network output into x_pred for the given parameterization."""
    if param == "x":
        return out
    if param == "eps":
        return x_from_eps(z_t, out, alpha, sigma)
    if param == "v":
        return x_from_v(z_t, out, alpha, sigma)
    if param == "both":
        x_tilde, eps_tilde = out.chunk(2, dim=1)
        return x_from_both(z_t, x_tilde, eps_tilde, alpha, sigma)
    raise UserError(f"unknown parameterization {param!r}")
