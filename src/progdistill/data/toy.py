"""2-D toy distributions: fresh draws from a generator, and the exact density where known.

Each set is standardised so that every coordinate has mean ~0 and variance ~1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from progdistill.errors import UserError

TOY_NAMES = ("gmm", "moons", "checkerboard", "rings")

# gmm: GMM_COMPONENTS equal-weight isotropic Gaussians with means on a circle of radius
# GMM_RADIUS (first at angle 0) and std GMM_STD; per-coordinate variance R^2/2 + s^2 = 0.99.
GMM_COMPONENTS = 8
GMM_RADIUS = 1.4
GMM_STD = 0.1
# moons: sklearn make_moons(noise=MOONS_NOISE), standardised with its analytic mean/std.
MOONS_NOISE = 0.05
MOONS_MEAN = (0.5, 0.25)
MOONS_STD = (math.sqrt(0.75 + MOONS_NOISE**2), math.sqrt(0.5625 - 1 / math.pi + MOONS_NOISE**2))
# checkerboard: uniform on the 8 cells of a 4x4 board over [-2, 2]^2 with floor(x)+floor(y)
# even, scaled by CHECKER_SCALE so that each coordinate is uniform with std exactly 1.
CHECKER_SCALE = math.sqrt(3) / 2
# rings: a radius drawn uniformly from RINGS_RADII, a uniform angle, Gaussian noise RINGS_NOISE.
RINGS_RADII = (0.5, 1.0, 1.5, 2.0)
RINGS_NOISE = 0.05


def toy_name(name: str) -> str:
    """The toy set's name without the `toy:` prefix, checked."""
    name = name.removeprefix("toy:")
    if name not in TOY_NAMES:
        raise UserError(f"unknown toy data set {name!r}; use one of {', '.join(TOY_NAMES)}")
    return name


def _gmm_means(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The GMM_COMPONENTS means on the circle of radius GMM_RADIUS."""
    ang = torch.arange(GMM_COMPONENTS, dtype=torch.float64) * (2 * math.pi / GMM_COMPONENTS)
    return (GMM_RADIUS * torch.stack([ang.cos(), ang.sin()], 1)).to(device=device, dtype=dtype)


def gmm_mode_share(x: torch.Tensor, k: float = 3.0) -> float:
    """Share of points (in toy:gmm's units) within k standard deviations of a mode (data: 1 - e^{-k^2/2})."""
    d = torch.cdist(x.double(), _gmm_means(dtype=torch.float64)).min(1).values
    return float((d < k * GMM_STD).double().mean())


def sample_toy(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh float32 (n, 2) draws of toy distribution ``name`` on the generator's device."""
    name = toy_name(name)
    g, dev = generator, generator.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=dev)

    def randint(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=g, device=dev)

    if name == "gmm":
        x = _gmm_means(dev)[randint(GMM_COMPONENTS)] + GMM_STD * torch.randn(n, 2, generator=g, device=dev)
    elif name == "moons":
        from sklearn.datasets import make_moons

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=dev))
        pts, _ = make_moons(n, noise=MOONS_NOISE, random_state=seed)
        pts = (pts - np.array(MOONS_MEAN)) / np.array(MOONS_STD)
        x = torch.from_numpy(pts.astype(np.float32)).to(dev)
    elif name == "checkerboard":
        x1 = rand(n) * 4 - 2
        x2 = rand(n) + 2 * randint(2) - 2 + torch.floor(x1).remainder(2)
        x = torch.stack([x1, x2], 1) * CHECKER_SCALE
    else:  # rings
        r = torch.tensor(RINGS_RADII, device=dev)[randint(len(RINGS_RADII))]
        ang = rand(n) * 2 * math.pi
        x = torch.stack([r * ang.cos(), r * ang.sin()], 1)
        x = x + RINGS_NOISE * torch.randn(n, 2, generator=g, device=dev)
    return x.float().contiguous()


def toy_log_density(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) for points x (..., 2); only ``gmm`` has a closed form here."""
    name = toy_name(name)
    if name != "gmm":
        raise UserError(f"no exact log density for toy:{name}; it is only available for toy:gmm")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    mu = _gmm_means(x.device, dtype)
    sq = ((x.to(dtype).unsqueeze(-2) - mu) ** 2).sum(-1)  # (..., K)
    log_comp = -sq / (2 * GMM_STD**2) - math.log(2 * math.pi * GMM_STD**2)
    return torch.logsumexp(log_comp, -1) - math.log(GMM_COMPONENTS)
