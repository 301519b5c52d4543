"""Variance-preserving noise schedules in continuous time, driven by logSNR (docs/method.md §1; discrete tables §8).

A schedule maps t in [0, 1] to lambda_t = log(alpha_t^2 / sigma_t^2) and back. Everything else
(alpha, sigma, SNR, the network's time input) is derived from lambda by pure functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from progdistill.errors import UserError

# diffusers-compatible number of training timesteps (docs/method.md §8): tau = T t - 1.
NUM_TRAIN_TIMESTEPS = 1024


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(sigmoid(lambda)), sigma_t = sqrt(sigmoid(-lambda))."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def per_example(v, like: torch.Tensor, *, cast: bool = False) -> torch.Tensor:
    """v of shape (B,) as (B, 1, ..., 1), to broadcast against `like` (B, ...); a 0-dim v stays as it is.
    With `cast`, v (a number or tensor) is first converted to `like`'s dtype and device."""
    if cast:
        v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def noised(x: torch.Tensor, eps: torch.Tensor, logsnr_t: torch.Tensor) -> torch.Tensor:
    """z_t = alpha_t x + sigma_t eps (docs/method.md §1), with one logSNR lambda_t per example."""
    alpha, sigma = alpha_sigma(per_example(logsnr_t, x))
    return alpha * x + sigma * eps


def snr(logsnr: torch.Tensor) -> torch.Tensor:
    """SNR(t) = exp(lambda_t)."""
    return torch.exp(logsnr)


def logsnr_cosine(t: torch.Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0,
                  shift: float = 0.0) -> torch.Tensor:
    """lambda(t) = s - 2 log tan(a t + b), b = arctan(e^{-(lambda_max - s)/2}), a = arctan(e^{-(lambda_min - s)/2}) - b.

    s = `shift` is the shifted cosine of Hoogeboom et al. (2023): s > 0 adds less noise at every t, s < 0
    more (their rule for large images: s = 2 log(64 / side)); the range stays [lambda_min, lambda_max]
    (docs/method.md §1).
    """
    b = math.atan(math.exp(-0.5 * (logsnr_max - shift)))
    a = math.atan(math.exp(-0.5 * (logsnr_min - shift))) - b
    out = shift - 2.0 * torch.log(torch.tan(a * t.to(torch.float64) + b))
    return out.to(t.dtype) if t.is_floating_point() else out


def t_from_logsnr_cosine(logsnr: torch.Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0,
                         shift: float = 0.0) -> torch.Tensor:
    """t = (arctan(e^{-(lambda - s)/2}) - b) / a, the inverse of `logsnr_cosine`."""
    b = math.atan(math.exp(-0.5 * (logsnr_max - shift)))
    a = math.atan(math.exp(-0.5 * (logsnr_min - shift))) - b
    out = (torch.atan(torch.exp(-0.5 * (logsnr.to(torch.float64) - shift))) - b) / a
    return out.to(logsnr.dtype)


def abar_from_betas(betas: Sequence[float]) -> torch.Tensor:
    """abar_j = prod_{k<=j} (1 - beta_k); abar_j belongs to t = (j + 1) / T (docs/method.md §8)."""
    return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (np.interp) for increasing xp, clamped at the ends.

    Written as f0 (1 - w) + f1 w so that a knot x = xp[k] gives back fp[k] exactly.
    """
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = (x - x0) / (x1 - x0)
    return f0 * (1.0 - w) + f1 * w


GRIDS = ("uniform", "timesteps")   # t_i = i/N, or k_i/T with whole timesteps k_i (discrete tables, §10)


def whole_timesteps(i: torch.Tensor, num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """k_i = round-half-even(i T / N) in exact integer arithmetic (docs/method.md §10): diffusers' `trailing`
    timesteps + 1; equal to i T / N whenever N divides T, and every other point of the 2N-step grid."""
    i = torch.as_tensor(i, dtype=torch.int64)
    T, N = int(num_train_timesteps), int(num_steps)
    q, r = torch.div(i * T, N, rounding_mode="floor"), torch.remainder(i * T, N)
    up = (2 * r > N) | ((2 * r == N) & (q % 2 == 1))
    return q + up.to(torch.int64)


def snap_to_integers(tau: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """tau rounded to the nearest integer where it lies within tol of one (float64 round-off only)."""
    r = tau.round()
    return torch.where((tau - r).abs() <= tol, r, tau)


@dataclass(frozen=True)
class Schedule:
    """A logSNR schedule: `cosine` (rescaled, docs/method.md §1) or `discrete` (a beta table, docs/method.md §8)."""

    kind: str = "cosine"
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    logsnr_shift: float = 0.0     # cosine only: lambda(t) + s, rescaled to keep [logsnr_min, logsnr_max]
    betas: tuple[float, ...] | None = None
    grid: str = "uniform"         # "timesteps": every grid point a whole timestep of the table (§10)

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise UserError(f"unknown time grid {self.grid!r}: use one of {', '.join(GRIDS)}")
        if self.grid == "timesteps" and self.kind != "discrete":
            raise UserError("the whole-timestep grid needs a discrete (T-entry) schedule; the cosine one uses i/N")
        if self.kind not in ("cosine", "discrete"):
            raise UserError(f"unknown schedule kind {self.kind!r}: use 'cosine' or 'discrete'")
        if self.kind == "discrete":
            if not self.betas or len(self.betas) < 2:
                raise UserError("a discrete schedule needs a table of at least 2 betas")
            b = torch.as_tensor(self.betas, dtype=torch.float64)
            if not bool(((b > 0) & (b <= 1)).all()):
                raise UserError("discrete schedule betas must lie in (0, 1] (beta = 1 only as the last entry)")
            if bool((b[:-1] == 1).any()):
                raise UserError("a discrete schedule may reach beta = 1 (zero terminal SNR) only at its last entry")
            if b[-1] == 1 and len(b) < 3:
                raise UserError("a zero-terminal-SNR table (last beta = 1) needs at least 3 betas")
        elif not self.logsnr_min < self.logsnr_max:
            raise UserError("cosine schedule needs logsnr_min < logsnr_max")
        elif not (math.isfinite(self.logsnr_shift) and self.logsnr_min < self.logsnr_shift < self.logsnr_max):
            raise UserError(f"logsnr shift must lie inside (logsnr_min, logsnr_max) = ({self.logsnr_min:g}, "
                            f"{self.logsnr_max:g}), got {self.logsnr_shift}; 0 is the plain cosine schedule")
        if self.kind == "discrete" and self.logsnr_shift != 0.0:
            raise UserError("logsnr shift applies to the cosine schedule only, not to a discrete beta table")

    # Discrete tables live on the knot index j = T t - 1 = 0 .. T-1 (docs/method.md §8): abar_j at
    # t = (j + 1) / T, lambda_j = log(abar_j / (1 - abar_j)), linear in j between knots. A
    # zero-terminal-SNR table (beta_{T-1} = 1, abar_{T-1} = 0, lambda_{T-1} = -inf) is instead
    # linear in abar on its last segment, abar = abar_{T-2} (1 - w), w = j - (T - 2): lambda is
    # finite for t < 1 and -inf exactly at t = 1.
    def _table(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(abar_j, lambda_j) for j = 0 .. T-1, float64, on `device` (the input's, so samplers run on GPUs)."""
        abar = abar_from_betas(self.betas).to(device)
        return abar, torch.log(abar) - torch.log1p(-abar)

    @property
    def zero_terminal_snr(self) -> bool:
        """True for a discrete table ending in beta = 1 (lambda(1) = -inf)."""
        return self.kind == "discrete" and float(self.betas[-1]) == 1.0

    def _logsnr_at_index(self, j: torch.Tensor) -> torch.Tensor:
        """lambda at the fractional knot index j (float64), clamped to [0, T - 1]."""
        abar, lam = self._table(j.device)
        T = len(abar)
        j = j.clamp(0.0, T - 1.0)
        idx = torch.arange(T, dtype=torch.float64, device=j.device)
        if not self.zero_terminal_snr:
            return _interp(j, idx, lam)
        w = (j - (T - 2)).clamp(0.0, 1.0)
        a = abar[T - 2] * (1.0 - w)
        last = torch.log(a) - torch.log1p(-a)
        return torch.where(j > T - 2, last, _interp(j.clamp(max=T - 2.0), idx[:-1], lam[:-1]))

    def _index_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """The inverse of `_logsnr_at_index`: j(lambda) in [0, T - 1] (float64; knots map to integers)."""
        abar, lam = self._table(logsnr.device)
        T = len(abar)
        idx = torch.arange(T, dtype=torch.float64, device=logsnr.device)
        if not self.zero_terminal_snr:
            # lambda decreases in j: interpolate on the reversed (increasing) table.
            return _interp(logsnr, lam.flip(0), idx.flip(0))
        w = (1.0 - torch.sigmoid(logsnr) / abar[T - 2]).clamp(0.0, 1.0)
        inner = _interp(logsnr.clamp(min=float(lam[T - 2])), lam[:-1].flip(0), idx[:-1].flip(0))
        return torch.where(logsnr < lam[T - 2], (T - 2) + w, inner)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t for t in [0, 1] (discrete tables: linear in t between knots, clamped)."""
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        if self.kind == "cosine":
            return logsnr_cosine(t.to(torch.float64), self.logsnr_min, self.logsnr_max, self.logsnr_shift).to(dtype)
        return self._logsnr_at_index(len(self.betas) * t.to(torch.float64) - 1.0).to(dtype)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """The inverse map lambda -> t (discrete tables: clamped to their logSNR range)."""
        logsnr = torch.as_tensor(logsnr)
        if self.kind == "cosine":
            return t_from_logsnr_cosine(logsnr.to(torch.float64), self.logsnr_min, self.logsnr_max,
                                        self.logsnr_shift).to(logsnr.dtype)
        j = self._index_from_logsnr(logsnr.to(torch.float64))
        return ((j + 1.0) / len(self.betas)).to(logsnr.dtype)

    @property
    def num_train_timesteps(self) -> int:
        """T of the network's time input tau = T t - 1: 1024 for cosine, the table length otherwise."""
        return NUM_TRAIN_TIMESTEPS if self.kind == "cosine" else len(self.betas)

    def time_input(self, logsnr: torch.Tensor) -> torch.Tensor:
        """tau = T t(lambda) - 1 (docs/method.md §8), computed in float64 and returned as float32.

        From float64 lambda every grid point t = i/N with N | T gives a whole timestep exactly
        (float64 round-off of the lambda -> t round trip, ~1e-13, is snapped away).
        """
        logsnr = torch.as_tensor(logsnr)
        lam = logsnr.to(torch.float64)
        if self.kind == "cosine":
            t = t_from_logsnr_cosine(lam, self.logsnr_min, self.logsnr_max, self.logsnr_shift)
            tau = self.num_train_timesteps * t - 1.0
        else:
            tau = self._index_from_logsnr(lam)
        if logsnr.dtype != torch.float64:   # float32 lambda: tau is only good to float32 precision anyway
            return tau.float()
        return snap_to_integers(tau).float()

    def check_steps(self, num_steps: int, what: str = "sampling steps") -> int:
        """N itself; on the whole-timestep grid a one-line UserError for N > T (no N distinct timesteps)."""
        if self.grid == "timesteps" and num_steps > self.num_train_timesteps:
            raise UserError(f"{what} {num_steps} exceed the teacher's {self.num_train_timesteps} timesteps: a discrete "
                            f"table has only T = {self.num_train_timesteps} whole timesteps; use at most that many")
        return num_steps

    def grid_time(self, i: torch.Tensor, num_steps: int) -> torch.Tensor:
        """t_i of the N-step grid (float64): i/N, or k_i/T with whole timesteps k_i (docs/method.md §10)."""
        i = torch.as_tensor(i)
        if self.grid == "uniform":
            return i.double() / num_steps
        T = self.num_train_timesteps
        return whole_timesteps(i, num_steps, T).double() / T

    def time_grid(self, num_steps: int) -> torch.Tensor:
        """t_N, ..., t_0 of the N-step grid (float64, descending); samplers walk consecutive pairs."""
        self.check_steps(num_steps)
        return self.grid_time(torch.arange(num_steps, -1, -1), num_steps)

    def step_times(self, i: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, t', t'') of Algorithm 2 for a student of N steps at its point i: points 2i, 2i - 1, 2i - 2 of the
        2N-step grid (uniform: i/N, i/N - 0.5/N, i/N - 1/N, as in the released code; float64)."""
        if self.grid == "uniform":
            t = torch.as_tensor(i).double() / num_steps
            return t, t - 0.5 / num_steps, t - 1.0 / num_steps
        j = 2 * torch.as_tensor(i, dtype=torch.int64)
        return tuple(self.grid_time(j - d, 2 * num_steps) for d in (0, 1, 2))

    def diffusers_betas(self, num_train_timesteps: int | None = None) -> list[float]:
        """beta_j = 1 - abar((j+1)/T) / abar(j/T), abar(t) = alpha_t^2 (docs/method.md §8); a table gives itself back."""
        T = num_train_timesteps or self.num_train_timesteps
        if self.kind == "discrete":
            if T != len(self.betas):
                raise UserError(f"a discrete schedule of {len(self.betas)} betas cannot be exported with "
                                f"num_train_timesteps={T}; use its own table length")
            return [float(b) for b in self.betas]
        t = torch.arange(0, T + 1, dtype=torch.float64) / T
        abar = torch.sigmoid(self.logsnr(t))
        return (1.0 - abar[1:] / abar[:-1]).tolist()

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == "cosine":
            d.update(logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)
            if self.logsnr_shift:   # absent when 0: cards written before the shift existed stay identical
                d["logsnr_shift"] = self.logsnr_shift
        else:
            d["betas"] = list(self.betas)
        if self.grid != "uniform":   # absent: i/N, so cards written before grids existed sample as before
            d["grid"] = self.grid
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> tuple[float, ...]:
    """DDPM's linear beta table (Ho et al. 2020)."""
    return tuple(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64).tolist())


def default_start_steps(schedule: Schedule) -> int:
    """N0 for a discrete T-step teacher: the largest power of two <= T (every student grid point i/N exists;
    docs/method.md §6, §8)."""
    return 1 << (int(schedule.num_train_timesteps).bit_length() - 1)
