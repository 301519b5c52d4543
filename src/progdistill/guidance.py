"""Classifier-free guidance (Ho & Salimans 2022) for sampling and distillation (method.md §9).

x^w(z_t, c) = (1 + w) x(z_t, c) - w x(z_t, null)  (diffusers' guidance_scale = 1 + w). A guided teacher
costs 2 network evaluations per step at w > 0 (1 at w = 0); a w-conditioned (guidance-distilled)
model x_eta(z_t, c, w) costs 1. Every function here returns a `DenoiserFn` for the samplers.
"""

from __future__ import annotations

import warnings

import torch

from .checkpoint import ModelCard, num_classes
from .errors import UserError


def _bcast(w, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * (like.dim() - 1))) if w.dim() else w


def guided_x(x_cond: torch.Tensor, x_uncond: torch.Tensor, *, w) -> torch.Tensor:
    """x^w = (1 + w) x_c - w x_null; w a scalar or one per example (B,)."""
    w = _bcast(w, x_cond)
    return (1.0 + w) * x_cond - w * x_uncond


class GuidedDenoiser:
    """A guided teacher as a DenoiserFn: x^w(z_t, c) from one batched call on [(z_t, c); (z_t, null)].

    `nfe` counts network evaluations per sample: 2 per call when any w > 0, else 1 (the conditional alone).
    """

    def __init__(self, denoiser, *, w, null_label: int):
        self.denoiser, self.w, self.null_label, self.nfe = denoiser, w, int(null_label), 0

    def __call__(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(self.w)
        if not bool((w != 0).any()):
            self.nfe += 1
            return self.denoiser(z_t, logsnr_t, class_labels)
        n = z_t.shape[0]
        logsnr = torch.as_tensor(logsnr_t, device=z_t.device).expand(n)
        null = torch.full_like(class_labels, self.null_label)
        x = self.denoiser(torch.cat([z_t, z_t]), torch.cat([logsnr, logsnr]), torch.cat([class_labels, null]))
        self.nfe += 2
        return guided_x(x[:n], x[n:], w=w.to(x.device))


class WDenoiser:
    """A w-conditioned denoiser with w bound (a scalar or one per example): x_eta(z_t, c, w), 1 evaluation."""

    def __init__(self, denoiser, *, w):
        self.denoiser, self.w, self.nfe = denoiser, w, 0

    def __call__(self, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        w = torch.as_tensor(self.w, dtype=torch.float32, device=z_t.device).expand(z_t.shape[0])
        return self.denoiser(z_t, logsnr_t, class_labels, w=w)


def is_w_conditioned(card: ModelCard) -> bool:
    """True for guidance-distilled models (they take w as an input)."""
    return bool(getattr(card, "guidance", None))


def check_guidable(card: ModelCard, name: str = "this model") -> int:
    """The null label of a teacher that classifier-free guidance can use; a one-line UserError otherwise."""
    if not num_classes(card):
        raise UserError(f"guidance needs a class-conditional model, but {name} is unconditional "
                        f"(train the teacher with --class-cond)")
    if card.kind == "student":
        raise UserError(f"{name} is a plainly distilled student: its null class was never distilled, so it cannot be "
                        f"guided; distil the teacher with --guided and sample that student with --guidance W")
    if not card.null_class:
        raise UserError(f"{name} has no null class (an imported conditional model), so it cannot be guided")
    dropout = (card.provenance or {}).get("label_dropout")
    if dropout is None:
        raise UserError(f"the model card of {name} does not record label dropout (trained before progdistill "
                        f"recorded it, or imported), so its null class may be untrained; retrain with --class-cond")
    if not float(dropout) > 0:
        raise UserError(f"{name} was trained without label dropout (--label-dropout 0), so its null class is "
                        f"untrained; retrain with --class-cond --label-dropout 0.1")
    return num_classes(card)      # the null class is the last row


def check_w(w) -> float:
    w = float(w)
    if not w >= 0:      # also catches NaN
        raise UserError(f"--guidance must be a number >= 0 (w = 0: conditional, unguided), got {w}")
    return w


def guided_denoiser(denoiser, card: ModelCard, w: float | None, name: str = "this model"):
    """(DenoiserFn, network evaluations per step) for sampling `card`'s model at guidance w.

    None: the model as it is (w = 0 for a w-conditioned model). A w-conditioned model takes w as input
    (1 evaluation; a warning outside its trained [w_min, w_max]); a guidable teacher is combined
    (2 evaluations at w > 0); anything else is refused with one line.
    """
    if is_w_conditioned(card):
        w = 0.0 if w is None else check_w(w)
        lo, hi = card.guidance["w_min"], card.guidance["w_max"]
        if not lo <= w <= hi:
            warnings.warn(f"{name} was guidance-distilled for w in [{lo:g}, {hi:g}]; w = {w:g} extrapolates",
                          stacklevel=3)
        return WDenoiser(denoiser, w=w), 1
    if w is None:
        return denoiser, 1
    w = check_w(w)
    null_label = check_guidable(card, name)
    return GuidedDenoiser(denoiser, w=w, null_label=null_label), (2 if w > 0 else 1)
