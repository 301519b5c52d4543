"""Per-dimension affine normalisation of vector data: the diffusion sees u = (x - shift) / scale.

Users' vectors (actions, tabular features, embeddings) come in arbitrary units, while the forward
process assumes data of about unit scale (docs/method.md §1: z_t = alpha_t x + sigma_t eps). A
normaliser is fitted once on the training data, stored in the model card, applied in training and
distillation, and inverted in sampling, so every output is in the data's own units. Images are
already in [-1, 1] and are never normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from progdistill.errors import UserError

NORMALIZERS = ("standard", "minmax", "none")
# Dimensions whose spread is below this fraction of the largest dimension's spread count as constant.
RELATIVE_FLOOR = 1e-6


@dataclass(frozen=True)
class Normalizer:
    """u = (x - shift) / scale per dimension; `decode` is the inverse."""

    kind: str
    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        shift = torch.tensor(self.shift, dtype=torch.float64).to(like.device, dtype)
        scale = torch.tensor(self.scale, dtype=torch.float64).to(like.device, dtype)
        if like.shape[-1] != len(self.shift):
            raise UserError(f"data has {like.shape[-1]} dimensions but the model's normaliser was fitted on "
                            f"{len(self.shift)}; use data of the model's shape")
        return shift, scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """u = (x - shift) / scale."""
        shift, scale = self._params(x)
        return (x - shift) / scale

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """x = u * scale + shift."""
        shift, scale = self._params(u)
        return u * scale + shift

    def log_det_decode(self) -> float:
        """log |det dx/du| = sum_d log scale_d, so log p_x(x) = log p_u(u) - log_det_decode()."""
        return float(sum(math.log(s) for s in self.scale))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Normalizer | None":
        if not d:
            return None
        try:
            shift, scale = tuple(float(v) for v in d["shift"]), tuple(float(v) for v in d["scale"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"the model card's normaliser {d!r} is malformed; re-train or restore the card") from None
        if len(shift) != len(scale) or not all(math.isfinite(v) for v in shift + scale) or min(scale) <= 0:
            raise UserError("the model card's normaliser has mismatched, non-finite or non-positive entries; "
                            "re-train or restore the card")
        return cls(str(d.get("kind", "standard")), shift, scale)


def check_normalize(kind: str) -> str:
    if kind not in NORMALIZERS:
        raise UserError(f"unknown --normalize {kind!r}: choose one of {', '.join(NORMALIZERS)}")
    return kind


def _floored(spread: torch.Tensor) -> torch.Tensor:
    """Spread with a floor for constant dimensions: RELATIVE_FLOOR x the largest spread (1 if all are 0)."""
    top = float(spread.max()) if spread.numel() else 0.0
    floor = RELATIVE_FLOOR * top if top > 0 else 1.0
    return torch.where(spread > floor, spread, torch.full_like(spread, floor if top > 0 else 1.0))


def fit_normalizer(x: torch.Tensor, kind: str = "standard") -> Normalizer | None:
    """Fit on training vectors x (n, d): `standard` zero mean / unit variance, `minmax` [min, max] -> [-1, 1]."""
    check_normalize(kind)
    if kind == "none":
        return None
    if x.dim() != 2 or len(x) == 0:
        raise UserError(f"normalisation applies to vectors (n, d), got data of shape {tuple(x.shape)}")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise UserError("the training data contains NaN or inf values; clean the data")
    if kind == "standard":
        shift, scale = x.mean(0), _floored(x.std(0, unbiased=False))
    else:
        lo, hi = x.min(0).values, x.max(0).values
        shift, scale = (hi + lo) / 2, _floored((hi - lo) / 2)
    return Normalizer(kind, tuple(shift.tolist()), tuple(scale.tolist()))
