"""Keyed randomness: every random draw comes from a generator seeded by integer keys.

Seeds are derived from (seed, step, example or sample index, ...) with numpy's SeedSequence, so
a draw never depends on batch size, process count or the global RNG. Sampling, evaluation and
training all take their randomness from here (none of them imports another for it).
"""

from __future__ import annotations

import numpy as np
import torch

from progdistill.errors import UserError

SEED_LIMIT = 2 ** 32     # seeds are 32-bit words: [0, 2^32)


def check_seed(seed, option: str = "--seed") -> int:
    """`seed` as an int in [0, 2^32); a one-line UserError otherwise (numpy's SeedSequence rejects negatives)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{option} must be a whole number in [0, 2^32), got {seed!r}")
    return seed


def seed_for(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (seed, step, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]) >> 1


def generator_for(device: torch.device | str, *keys: int) -> torch.Generator:
    """A torch generator on `device` seeded by `seed_for(*keys)`."""
    return torch.Generator(device=device).manual_seed(seed_for(*keys))


def sample_seeds(seed: int, indices: range | list[int]) -> list[int]:
    """Per-sample seeds: seed_for(seed, k) for sample k."""
    return [seed_for(seed, k) for k in indices]


class PerSampleNoise:
    """Gaussian noise from one generator per sample (one seed per sample), stacked on `device`."""

    def __init__(self, sample_seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.gens = [torch.Generator().manual_seed(s) for s in sample_seeds]
        self.shape, self.device = tuple(shape), device

    def __call__(self, step: int | None = None) -> torch.Tensor:
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.gens])
        return z.to(self.device)
