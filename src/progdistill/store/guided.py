"""Guidance of a stored model: whether its card allows classifier-free guidance, and the DenoiserFn
that samples it at strength w (a guided teacher: 2 evaluations per step; a w-conditioned model: 1)."""

from __future__ import annotations

import warnings

from progdistill.diffusion.guided import GuidedDenoiser, WDenoiser
from progdistill.errors import UserError
from progdistill.store.card import ModelCard, num_classes


def is_w_conditioned(card: ModelCard) -> bool:
    """True for guidance-distilled models (they take w as an input)."""
    return bool(getattr(card, "guidance", None))


def describe_model(card: ModelCard) -> str:
    """What a stored model is, for one-line messages: "a guidance-distilled (w-conditioned) model, w in [0, 4]",
    "a plainly distilled 4-step student", "a class-conditional teacher", ..."""
    if is_w_conditioned(card):
        steps = f"{card.steps}-step " if card.steps else ""
        return (f"a guidance-distilled {steps}(w-conditioned) model, w in [{card.guidance['w_min']:g}, "
                f"{card.guidance['w_max']:g}] on its card")
    cond = "class-conditional" if num_classes(card) else "unconditional"
    if card.kind == "student":
        return f"a plainly distilled {f'{card.steps}-step ' if card.steps else ''}{cond} student"
    return f"a{'n' if cond[0] == 'u' else ''} {cond} {'imported model' if card.source else 'teacher'}"


def check_guidable(card: ModelCard, name: str = "this model") -> int:
    """The null label of a teacher that classifier-free guidance can use; a one-line UserError otherwise."""
    if is_w_conditioned(card):
        raise UserError(f"{name} is {describe_model(card)}: it takes w as an input, there is no null class to "
                        f"combine; sample it with --guidance W, or distil it further (no --guided stage 1 runs)")
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
