"""Keyed randomness: every random draw comes from a generator seeded by integer keys.

Seeds are derived from (seed, step, example or sample index, ...) with numpy's SeedSequence, so
a draw never depends on batch size, process count or the global RNG. Sampling, evaluation and
training all take their randomness from here (none of them imports another for it).
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch

from progdistill.errors import UserError

SEED_LIMIT = 2 ** 32     # seeds are 32-bit words: [0, 2^32)
KEY_LIMIT = 2 ** 64      # stream_seed keys: two 32-bit words each
_WORD = 0xFFFFFFFF


def check_seed(seed, option: str = "--seed") -> int:
    """`seed` as an int in [0, 2^32); a one-line UserError otherwise (numpy's SeedSequence rejects negatives)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{option} must be a whole number in [0, 2^32), got {seed!r}")
    return int(seed)


def seed_for(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (seed, step, ...): numpy's SeedSequence of the keys.

    Kept exactly as it is: every existing stream (initial and per-step noise, training plans, data
    noise) and every published figure depends on its values. Its encoding aliases, by design of
    SeedSequence's entropy list:
      * trailing zero keys: seed_for(0, 5) == seed_for(0, 5, 0), seed_for(0) == seed_for(0, 0);
      * keys of 2^32 or more are split into 32-bit words: seed_for(2**32, 7) == seed_for(0, 1, 7);
      * streams that use the same key tuple share seeds, whatever they are for: the teacher's training
        plan at step k and the initial noise of sample k of the same seed are both seed_for(seed, k).
    New streams of randomness must not use it: use `stream_seed` / `stream_generator`, whose
    domain-tagged encoding cannot alias.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]) >> 1


def generator_for(device: torch.device | str, *keys: int) -> torch.Generator:
    """A torch generator on `device` seeded by `seed_for(*keys)`."""
    return torch.Generator(device=device).manual_seed(seed_for(*keys))


def _domain_word(domain: str) -> int:
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"a stream's domain must be a non-empty string, got {domain!r}")
    return int.from_bytes(hashlib.sha256(domain.encode("utf-8")).digest()[:4], "little")


def stream_seed(domain: str, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream named `domain` (e.g. "train/flip") at integer keys.

    Every new stream of randomness must take its seeds from here (or `stream_generator`), not from
    `seed_for`. The entropy fed to SeedSequence is [hash32(domain), number of keys, lo(k0), hi(k0),
    lo(k1), hi(k1), ...] (each key in [0, 2^64) as two 32-bit words), so no two (domain, keys) share an
    encoding: trailing zeros, large keys and equal key tuples of different streams do not alias.
    """
    words = [_domain_word(domain), len(keys)]
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < KEY_LIMIT:
            raise ValueError(f"stream_seed keys must be whole numbers in [0, 2^64), got {k!r}")
        words += [int(k) & _WORD, int(k) >> 32]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def stream_generator(device: torch.device | str, domain: str, *keys: int) -> torch.Generator:
    """A torch generator on `device` seeded by `stream_seed(domain, *keys)`."""
    return torch.Generator(device=device).manual_seed(stream_seed(domain, *keys))


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
