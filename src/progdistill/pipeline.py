"""Load a run or a distilled model in one call and sample from it, with per-sample seeds.

    import progdistill
    model = progdistill.load("runs/demo/distill/steps-0004")
    x = model.sample(num=16, seed=0)            # uses the step count it was distilled for

Sample k's initial noise (and ancestral or stochastic re-noising noise, each its own stream) comes
from its own generator seeded by (seed, k), so sample k is the same whatever the batch size or
number of processes. `guidance=w` applies classifier-free guidance (diffusion/guided.py, store/guided.py): a guidable
class-conditional teacher costs 2 evaluations per step at w > 0, a guidance-distilled student 1. Pass
`noise=z` (shape (num, *data shape)) to start from given initial noise instead, e.g. to reproduce
a diffusers pipeline call; the ancestral sampler's per-step noise still comes from the seeds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from progdistill.data.normalize import Normalizer
from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.sampling import (SAMPLERS, check_num_steps, sample_ancestral, sample_ddim,
                                            sample_dpmpp_2m, sample_stochastic)
from progdistill.errors import UserError
from progdistill.seeds import PerSampleNoise, check_seed, sample_seeds, seed_for
from progdistill.store.card import ModelCard
from progdistill.store.card import num_classes as card_num_classes
from progdistill.store.guided import guided_denoiser
from progdistill.store.load import load_denoiser


def class_labels_for(card: ModelCard, indices: range | list[int], class_label: int | None) -> torch.Tensor | None:
    """Labels for class-conditional models: `class_label` for all, or k mod num_classes for sample k."""
    num_classes = card_num_classes(card)
    if not num_classes:
        if class_label is not None:
            raise UserError("--class was given but this model is unconditional (train with --class-cond)")
        return None
    if class_label is not None and not 0 <= class_label < num_classes:
        raise UserError(f"--class must lie in 0..{num_classes - 1}, got {class_label}")
    return torch.tensor([class_label if class_label is not None else k % num_classes for k in indices])


def sampling_clip(card: ModelCard) -> tuple[bool, float]:
    """(clip, range) as the model samples: the card's own values where it records them (imported
    schedulers' clip_sample), else images clip x_pred to [-1, 1] and vectors do not."""
    clip = getattr(card, "clip", None)
    if clip is None:
        clip = card.data.get("kind") == "image"
    return bool(clip), float(getattr(card, "clip_range", None) or 1.0)


def check_noise(noise, shape: tuple[int, ...], num: int | None) -> torch.Tensor:
    """Initial noise z of shape (num, *shape) as float32; num follows z."""
    z = torch.as_tensor(noise)
    if not z.is_floating_point() or z.dim() != len(shape) + 1 or tuple(z.shape[1:]) != tuple(shape) or len(z) < 1:
        raise UserError(f"noise must have shape (num, {', '.join(map(str, shape))}) for this model, "
                        f"got {tuple(z.shape)}{'' if z.is_floating_point() else f' of dtype {z.dtype}'}")
    if num is not None and num != len(z):
        raise UserError(f"num={num} but noise holds {len(z)} samples; pass one of them (num follows noise)")
    return z.float()


def generate(denoiser: Denoiser, card: ModelCard, *, steps: int, num: int | None = None, seed: int = 0,
             sampler: str = "ddim", logvar_frac: float = 0.0, class_label: int | None = None, batch_size: int = 500,
             device: torch.device | str = "cpu", clip: bool | None = None, start: int = 0,
             noise: torch.Tensor | None = None, guidance: float | None = None,
             progress: bool = False) -> torch.Tensor:
    """Samples start..start+num-1 of seed `seed`; returns (num, *data shape) on the CPU, in the data's
    units (a vector model's normaliser is inverted; images are in [-1, 1]).

    `noise` (num, *data shape): the initial noise z_1 of those samples (row i is sample start+i)
    instead of the seeded one; `num` then follows it. Batches slice it, so results do not depend on
    `batch_size`. Ancestral and stochastic per-step noise still come from the per-sample seeds.
    `guidance`: w >= 0 (None: the model as it is); see `guidance.guided_denoiser`. `seed` lies in [0, 2^32).
    """
    seed = check_seed(seed, "seed")
    check_num_steps(steps)
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    shape = tuple(card.data["shape"])
    if noise is not None:
        noise = check_noise(noise, shape, num)
        num = len(noise)
    if num is None or num < 1:
        raise UserError(f"--num must be a positive integer, got {num}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")
    denoiser, _ = guided_denoiser(denoiser, card, guidance)
    default_clip, clip_range = sampling_clip(card)
    clip = default_clip if clip is None else clip
    out = []
    for b0 in range(start, start + num, batch_size):
        idx = range(b0, min(b0 + batch_size, start + num))
        seeds = sample_seeds(seed, idx)
        if noise is None:
            z_1 = PerSampleNoise(seeds, shape, device)()
        else:
            z_1 = noise[b0 - start:b0 - start + len(idx)].to(device)
        y = class_labels_for(card, idx, class_label)
        y = y.to(device) if y is not None else None
        kw = dict(schedule=card.schedule, num_steps=steps, class_labels=y, clip=clip, clip_range=clip_range,
                  progress=progress)
        if sampler == "ddim":
            x = sample_ddim(denoiser, z_1, **kw)
        elif sampler == "dpmpp2m":
            x = sample_dpmpp_2m(denoiser, z_1, **kw)
        elif sampler == "stochastic":
            # re-noising noise: a third stream per sample, independent of the initial and ancestral noise
            step_noise = PerSampleNoise([seed_for(s, 2) for s in seeds], shape, device)
            x = sample_stochastic(denoiser, z_1, noise=step_noise, **kw)
        else:
            # ancestral noise: a second stream per sample, independent of the initial noise
            step_noise = PerSampleNoise([seed_for(s, 1) for s in seeds], shape, device)
            x = sample_ancestral(denoiser, z_1, noise=step_noise, logvar_frac=logvar_frac, **kw)
        out.append(x.float().cpu())
    x = torch.cat(out)
    normalizer = Normalizer.from_dict(getattr(card, "normalizer", None))
    return normalizer.decode(x.double()).float() if normalizer is not None else x


@dataclass
class Model:
    """A loaded model: a teacher run, a `steps-NNNN` student, or a distillation run's latest."""

    denoiser: Denoiser
    card: ModelCard
    path: Path
    device: torch.device

    def sample(self, num: int | None = None, *, steps: int | None = None, seed: int = 0, sampler: str = "ddim",
               logvar_frac: float = 0.0, class_label: int | None = None, batch_size: int = 500,
               noise: torch.Tensor | None = None, guidance: float | None = None,
               progress: bool = False) -> torch.Tensor:
        """Generate `num` samples (default 16): images (num, C, H, W) in [-1, 1]; vectors (num, d) in the data's units.

        `guidance`: classifier-free guidance strength w >= 0 for guidable class-conditional teachers
        (2 evaluations per step at w > 0) and guidance-distilled students (1 evaluation per step).
        `noise`: initial noise of shape (num, *data shape) instead of the seeded one (num follows it),
        e.g. `diffusers.utils.torch_utils.randn_tensor(shape, generator=g)` to match a diffusers call.
        """
        if num is None and noise is None:
            num = 16
        if steps is None:
            steps = self.card.steps or 256
        if self.card.steps is not None and steps != self.card.steps:
            warnings.warn(f"{self.path} was distilled for {self.card.steps} steps; sampling it with {steps} "
                          f"steps is not what it was trained for", stacklevel=2)
        return generate(self.denoiser, self.card, steps=steps, num=num, seed=seed, sampler=sampler,
                        logvar_frac=logvar_frac, class_label=class_label, batch_size=batch_size,
                        device=self.device, noise=noise, guidance=guidance, progress=progress)


def load(path: str | Path, *, device: str | torch.device | None = None, which: str | None = None,
         compile: str | None = None) -> Model:
    """Load any progdistill model folder or run in one call (EMA weights for teachers).

    On CUDA the network is put in channels_last; `compile` ("inductor", ...) torch.compiles its call.
    Process-wide settings (TF32) are left to the caller: `nets.device.apply_global`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    denoiser, card = load_denoiser(Path(path), which=which, device=device, compile=compile)
    return Model(denoiser, card, Path(path), device)
