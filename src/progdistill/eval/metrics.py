"""Sample-quality metrics on feature or sample arrays (numpy or torch), all pure functions.

Fréchet distance (FID when fed Inception features), k-NN precision/recall, class entropy and
coverage, sliced Wasserstein-2, energy distance and PSNR. Heavy pairwise work is chunked so that
10k x 10k point sets fit in memory; pairwise distances are computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from progdistill.errors import UserError

_CHUNK = 1024  # rows per block of pairwise distances


def _np2d(x, name: str) -> np.ndarray:
    """Return `x` as a float64 (n, d) numpy array; a 1-D input is read as n points in 1-D."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        a = a.reshape(a.shape[0], -1)
    if a.shape[0] == 0:
        raise UserError(f"{name} is empty; metrics need at least one point")
    return a


def _t2d(x, name: str) -> torch.Tensor:
    """Return `x` as a float64 (n, d) CPU torch tensor."""
    return torch.from_numpy(_np2d(x, name))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features: mu = E[f], sigma = np.cov(f, rowvar=False) (float64)."""
    f = _np2d(features, "features")
    if f.shape[0] < 2:
        raise UserError("need at least 2 feature vectors to estimate a covariance")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


class GaussianAccumulator:
    """mu and sigma of `gaussian_stats` for rows that arrive in chunks (a streamed reference split):
    float64 sums of the rows minus the first chunk's mean, so no chunk is kept."""

    def __init__(self) -> None:
        self.n, self.shift, self.s, self.ss = 0, None, None, None

    def add(self, rows) -> None:
        f = _np2d(rows, "features")
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.s, self.ss = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        d = f - self.shift
        self.n, self.s, self.ss = self.n + len(f), self.s + d.sum(axis=0), self.ss + d.T @ d

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise UserError("need at least 2 feature vectors to estimate a covariance")
        m = self.s / self.n
        return self.shift + m, np.atleast_2d((self.ss - self.n * np.outer(m, m)) / (self.n - 1))


def _sqrt_product_diag(s1: np.ndarray, s2: np.ndarray, method: str) -> np.ndarray:
    """Terms whose sum is Tr sqrtm(S1 S2): diag of sqrtm, or sqrt of the eigenvalues of S1 S2."""
    if method == "sqrtm":
        return np.diagonal(scipy.linalg.sqrtm(s1.dot(s2)))
    if method == "eigvals":  # same trace (principal root), ~5x faster than sqrtm at d = 2048
        return np.sqrt(np.linalg.eigvals(s1.dot(s2)).astype(np.complex128))
    raise UserError(f"unknown Fréchet method {method!r}; use 'eigvals' or 'sqrtm'")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigvals") -> float:
    """FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Dowson & Landau 1982; Heusel et al. 2017).

    method='sqrtm' is the TF/pytorch-fid computation (scipy.linalg.sqrtm); the default 'eigvals'
    uses Tr sqrtm(A) = sum_i sqrt(lambda_i(A)), which agrees to ~1e-12 relative and is faster.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UserError(f"Gaussian stats shapes disagree: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {s1.shape} vs {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise UserError("Fréchet distance: statistics contain NaN or inf")
    diff = mu1 - mu2
    try:
        roots = _sqrt_product_diag(s1, s2, method)
    except np.linalg.LinAlgError:
        roots = np.array([np.nan])
    if not np.isfinite(roots).all():
        # Product nearly singular: regularise both covariances by eps * I (as in the TF reference).
        offset = np.eye(s1.shape[0]) * eps
        roots = _sqrt_product_diag(s1 + offset, s2 + offset, method)
    if np.iscomplexobj(roots):
        if not np.allclose(roots.imag, 0, atol=1e-3):
            m = np.max(np.abs(roots.imag))
            raise UserError(f"Fréchet distance: sqrtm has a large imaginary component ({m:.3g}); "
                            "covariances are ill-conditioned, use more samples")
        roots = roots.real
    fd = diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * roots.sum()
    return max(0.0, float(fd))   # a distance: round-off makes equal Gaussians come out ~ -1e-7 (rank-deficient S)


def frechet_distance_features(f1, f2) -> float:
    """FD between Gaussians fitted to two feature sets: frechet_distance(*stats(f1), *stats(f2))."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def _kth_nn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest neighbour in x, excluding itself."""
    if not 1 <= k < x.shape[0]:
        raise UserError(f"k={k} needs 1 <= k < set size ({x.shape[0]})")
    out = []
    for i in range(0, x.shape[0], _CHUNK):
        d = torch.cdist(x[i:i + _CHUNK], x)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = float("inf")  # exclude the point itself (not its duplicates)
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def _inside_any_ball(query: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Boolean per query row: exists j with ||q - c_j|| <= r_j."""
    out = []
    for i in range(0, query.shape[0], _CHUNK):
        d = torch.cdist(query[i:i + _CHUNK], centres)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision/recall (Kynkäänniemi et al. 2019): P = P_fake[in real balls], R = P_real[in fake balls]."""
    real, fake = _t2d(real_feats, "real_feats"), _t2d(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"feature dims differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    precision = _inside_any_ball(fake, real, r_real).double().mean().item()
    recall = _inside_any_ball(real, fake, r_fake).double().mean().item()
    return precision, recall


def _labels(pred_labels, num_classes: int) -> np.ndarray:
    """Integer label array, checked to lie in [0, num_classes)."""
    if isinstance(pred_labels, torch.Tensor):
        pred_labels = pred_labels.detach().cpu().numpy()
    y = np.asarray(pred_labels).reshape(-1).astype(np.int64)
    if y.size == 0:
        raise UserError("no labels given")
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]")
    return y


def class_entropy(pred_labels, num_classes: int) -> float:
    """Entropy in nats of the predicted-class histogram, H = -sum p_c log p_c (max log num_classes)."""
    y = _labels(pred_labels, num_classes)
    p = np.bincount(y, minlength=num_classes) / float(y.size)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()) + 0.0   # + 0.0: a single class gives 0, not -0


def class_coverage(pred_labels, num_classes: int) -> float:
    """Fraction of the num_classes classes predicted at least once."""
    counts = np.bincount(_labels(pred_labels, num_classes), minlength=num_classes)
    return float((counts > 0).mean())


def _w2_sq_1d(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Squared 1-D W2 between empirical measures, row-wise on sorted (P, n) and (P, m) samples.

    W2^2 = int_0^1 (F^-1(t) - G^-1(t))^2 dt, exact for piecewise-constant empirical quantile
    functions: integrate over the merged breakpoints {i/n} U {j/m}.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return ((xs - ys) ** 2).mean(dim=1)
    levels = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                     torch.arange(1, m + 1, dtype=torch.float64) / m]))
    lo = torch.cat([torch.zeros(1, dtype=torch.float64), levels[:-1]])
    mid, w = (lo + levels) / 2, levels - lo
    ix = (mid * n).floor().long().clamp_(max=n - 1)
    iy = (mid * m).floor().long().clamp_(max=m - 1)
    return (((xs[:, ix] - ys[:, iy]) ** 2) * w).sum(dim=1)


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 (Bonneel et al. 2015): sqrt(mean_theta W2^2(theta.x, theta.y)), theta uniform on the sphere."""
    a, b = _t2d(x, "x"), _t2d(y, "y")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"dims differ: x {a.shape[1]} vs y {b.shape[1]}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], num_projections, generator=gen, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    total = torch.zeros((), dtype=torch.float64)
    for j in range(0, num_projections, 64):  # bound memory: 64 projections at a time
        t = theta[:, j:j + 64]
        xs = (a @ t).T.sort(dim=1).values
        ys = (b @ t).T.sort(dim=1).values
        total += _w2_sq_1d(xs, ys).sum()
    return math.sqrt(total.item() / num_projections)


def _mean_pdist(a: torch.Tensor, b: torch.Tensor, exclude_diag: bool) -> float:
    """Mean of ||a_i - b_j|| over all pairs (over i != j when exclude_diag, a is b)."""
    total = 0.0
    for i in range(0, a.shape[0], _CHUNK):
        d = torch.cdist(a[i:i + _CHUNK], b)
        if exclude_diag:
            rows = torch.arange(d.shape[0])
            d[rows, rows + i] = 0.0
        total += d.sum().item()
    pairs = a.shape[0] * (b.shape[0] - 1) if exclude_diag else a.shape[0] * b.shape[0]
    return total / pairs


def energy_distance(x, y, unbiased: bool = False) -> float:
    """Energy distance (Székely & Rizzo 2013): 2E|X-Y| - E|X-X'| - E|Y-Y'| (squared form, not its root).

    Default is the V-statistic (all pairs incl. i == j; always >= 0, the exact energy distance of
    the two empirical measures); unbiased=True uses the U-statistic for the within-set terms
    (i != j; unbiased, may be slightly negative).
    """
    a, b = _t2d(x, "x"), _t2d(y, "y")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"dims differ: x {a.shape[1]} vs y {b.shape[1]}")
    if unbiased and min(a.shape[0], b.shape[0]) < 2:
        raise UserError("the unbiased energy distance needs at least 2 points per set")
    exy = _mean_pdist(a, b, False)
    exx = _mean_pdist(a, a, unbiased)
    eyy = _mean_pdist(b, b, unbiased)
    return 2.0 * exy - exx - eyy


def psnr(a, b, data_range: float = 2.0) -> float:
    """Mean per-sample PSNR in dB: mean_i 10 log10(range^2 / MSE_i) (inf if some sample is exact)."""
    x, y = _np2d(a, "a"), _np2d(b, "b")
    if x.shape != y.shape:
        raise UserError(f"psnr: shapes differ, {x.shape} vs {y.shape}")
    mse = ((x - y) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return float(np.mean(10.0 * np.log10(data_range ** 2 / mse)))
