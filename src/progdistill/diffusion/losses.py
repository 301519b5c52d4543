"""Loss weightings on the x-space error (docs/method.md §3); losses are means over pixels."""

from __future__ import annotations

import torch

from progdistill.errors import UserError

WEIGHTINGS = ("const", "snr", "snr_trunc", "snr_plus_one")


def check_weighting(name: str) -> str:
    if name not in WEIGHTINGS:
        raise UserError(f"unknown loss weighting {name!r}: choose one of {', '.join(WEIGHTINGS)}")
    return name


def loss_weight(name: str, logsnr: torch.Tensor) -> torch.Tensor:
    """w(lambda): const 1 | snr e^lambda | snr_trunc max(e^lambda, 1) | snr_plus_one e^lambda + 1."""
    check_weighting(name)
    snr = torch.exp(logsnr)
    if name == "const":
        return torch.ones_like(logsnr)
    if name == "snr":
        return snr
    if name == "snr_trunc":
        return torch.clamp(snr, min=1.0)
    return snr + 1.0


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def weighted_x_loss(x: torch.Tensor, x_pred: torch.Tensor, logsnr: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-example L = w(lambda_t) * mean ||x - x_pred||^2 (Algorithms 1 and 2)."""
    return loss_weight(weighting, logsnr.float()) * mean_flat((x.float() - x_pred.float()) ** 2)
