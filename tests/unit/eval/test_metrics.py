"""Metrics against closed forms, plus the digits classifier (accuracy, determinism, cache)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.spatial.distance import cdist
from sklearn.neighbors import NearestNeighbors

from progdistill.errors import UserError
from progdistill.eval import metrics as M


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- Fréchet distance

def test_gaussian_stats_matches_numpy():
    f = rng().normal(size=(200, 5)).astype(np.float32)
    mu, sigma = M.gaussian_stats(f)
    assert mu.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


def test_frechet_diagonal_closed_form():
    r = rng(1)
    mu1, mu2 = r.normal(size=6), r.normal(size=6)
    s1, s2 = r.uniform(0.1, 3, size=6), r.uniform(0.1, 3, size=6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-9)


def test_frechet_commuting_covariances():
    r = rng(2)
    q, _ = np.linalg.qr(r.normal(size=(5, 5)))  # shared eigenbasis -> commuting covariances
    l1, l2 = r.uniform(0.2, 2, 5), r.uniform(0.2, 2, 5)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    want = 1.0 + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    mu2 = np.zeros(5)
    mu2[0] = 1.0
    assert M.frechet_distance(np.zeros(5), s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_1d_and_identity():
    # 1-D: W2^2 between N(m1, s1^2) and N(m2, s2^2) = (m1-m2)^2 + (s1-s2)^2
    assert M.frechet_distance([0.5], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(1.5 ** 2 + 1.0)
    assert M.frechet_distance(np.array(0.5), np.array(4.0), np.array(-1.0), np.array(1.0)) == \
        pytest.approx(3.25)
    s = np.cov(rng(3).normal(size=(50, 4)), rowvar=False)
    assert abs(M.frechet_distance(np.ones(4), s, np.ones(4), s)) < 1e-8


def test_frechet_distance_is_clamped_at_zero():
    # 30 points in 50-d: the covariance is rank-deficient and the raw trace formula gives ~ -5e-7 for
    # identical Gaussians; a distance is never negative
    mu, s = M.gaussian_stats(np.random.default_rng(0).normal(size=(30, 50)))
    raw = 2 * np.trace(s) - 2 * M._sqrt_product_diag(s, s, "eigvals").real.sum()
    assert raw < 0
    assert M.frechet_distance(mu, s, mu, s) == 0.0
    assert M.frechet_distance(mu, s, mu + 0.1, s) == pytest.approx(50 * 0.01, abs=1e-5)


def test_frechet_singular_covariances_stay_finite():
    # rank-deficient covariances (fewer samples than dims) exercise the sqrtm safeguards
    f1, f2 = rng(4).normal(size=(5, 20)), rng(5).normal(size=(5, 20))
    fd = M.frechet_distance_features(f1, f2)
    assert np.isfinite(fd) and fd > 0


@pytest.mark.parametrize("n", [500, 20])  # full-rank and rank-deficient covariances
def test_frechet_eigvals_matches_sqrtm(n):
    r = rng(15)
    s1 = np.cov(r.normal(size=(n, 64)) @ r.normal(size=(64, 64)), rowvar=False)
    s2 = np.cov(np.tanh(r.normal(size=(n, 64))), rowvar=False)
    mu = r.normal(size=64)
    fast = M.frechet_distance(mu, s1, 0 * mu, s2)
    ref = M.frechet_distance(mu, s1, 0 * mu, s2, method="sqrtm")
    assert fast == pytest.approx(ref, rel=1e-9)
    with pytest.raises(UserError):
        M.frechet_distance(mu, s1, mu, s2, method="bogus")


def test_frechet_safeguards(monkeypatch):
    real, seen = M._sqrt_product_diag, []

    def singular_once(s1, s2, method):
        seen.append(s1[0, 0])
        return np.array([np.nan]) if len(seen) == 1 else real(s1, s2, method)

    monkeypatch.setattr(M, "_sqrt_product_diag", singular_once)
    assert M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(0, abs=1e-4)
    assert seen == [1.0, 1.0 + 1e-6]  # retried with the eps * I offset
    monkeypatch.setattr(M, "_sqrt_product_diag", lambda *a: np.array([1 + 1e-9j, 1 + 1e-9j, 1 + 0.5j]))
    with pytest.raises(UserError, match="imaginary"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))
    monkeypatch.setattr(M, "_sqrt_product_diag", lambda *a: np.array([1 + 1e-9j, 1 + 1e-9j, 1 + 0j]))
    assert M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(0)


def test_frechet_shape_mismatch():
    with pytest.raises(UserError):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_frechet_features_same_vs_shifted():
    r = rng(6)
    a, b = r.normal(size=(2000, 8)), r.normal(size=(2000, 8))
    same = M.frechet_distance_features(a, b)
    shifted = M.frechet_distance_features(a, b + 1.0)
    assert same < 0.1 and shifted == pytest.approx(8.0 + same, abs=0.3)


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_identical_and_disjoint():
    x = rng(7).normal(size=(300, 4))
    assert M.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert M.precision_recall(x, torch.from_numpy(x + 100.0), k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    r = rng(8)
    centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], float)
    real = np.concatenate([c + r.normal(size=(250, 2)) for c in centres])
    fake = np.concatenate([c + r.normal(size=(500, 2)) for c in centres[:2]])
    p, rec = M.precision_recall(real, fake, k=3)
    assert p > 0.95
    assert 0.45 < rec < 0.55


def test_knn_radius_matches_sklearn_across_chunks():
    x = torch.from_numpy(rng(9).normal(size=(1100, 3)))  # > one chunk of 1024 rows
    got = M._kth_nn_radius(x, 3).numpy()
    dist, _ = NearestNeighbors(n_neighbors=4).fit(x.numpy()).kneighbors(x.numpy())
    np.testing.assert_allclose(got, dist[:, 3], rtol=1e-9)


def test_precision_recall_bad_k():
    with pytest.raises(UserError):
        M.precision_recall(np.zeros((3, 2)), np.zeros((5, 2)), k=3)


# ---------------------------------------------------------------- class statistics

def test_class_entropy_and_coverage():
    uniform = np.repeat(np.arange(10), 7)
    assert M.class_entropy(uniform, 10) == pytest.approx(math.log(10))
    assert M.class_entropy(torch.zeros(50, dtype=torch.long), 10) == 0.0
    assert M.class_entropy([0, 1], 10) == pytest.approx(math.log(2))
    assert M.class_coverage(uniform, 10) == 1.0
    assert M.class_coverage([0, 0, 3], 10) == pytest.approx(0.2)
    with pytest.raises(UserError):
        M.class_entropy([0, 10], 10)


# ---------------------------------------------------------------- sliced W2 and energy

def test_sliced_wasserstein_1d_gaussians():
    r = rng(10)
    n = 20000
    x = r.normal(size=n)
    # 1-D projections are +-1, so SW2 = W2 = sqrt(dmu^2 + (s1-s2)^2)
    assert M.sliced_wasserstein(x, r.normal(size=n) + 1.5) == pytest.approx(1.5, abs=0.05)
    y = 0.5 + 2.0 * r.normal(size=n)
    assert M.sliced_wasserstein(x, y, num_projections=8) == pytest.approx(math.sqrt(0.25 + 1.0), abs=0.05)


def test_sliced_wasserstein_unequal_sizes_exact():
    # quantile functions of {0,1} and {0,.5,1} differ by .5 on (1/3, 2/3): W2^2 = .25/3
    got = M.sliced_wasserstein([0.0, 1.0], [0.0, 0.5, 1.0], num_projections=4)
    assert got == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    r = rng(11)
    big, small = r.normal(size=(3000, 5)), r.normal(size=(1000, 5))
    assert M.sliced_wasserstein(big, small) < 0.1 < M.sliced_wasserstein(big, small + 0.5)


def test_sliced_wasserstein_same_vs_shifted_and_seeded():
    r = rng(12)
    a, b = r.normal(size=(2000, 16)), r.normal(size=(2000, 16))
    same = M.sliced_wasserstein(a, b, seed=3)
    assert same == M.sliced_wasserstein(a, b, seed=3)
    assert same < 0.1 < M.sliced_wasserstein(a, b + 0.5, seed=3)


def _energy_1d_closed_form(d):
    # X-Y ~ N(d, 2); E|N(m, s^2)| = s sqrt(2/pi) exp(-m^2 / 2s^2) + m (1 - 2 Phi(-m/s)); E|X-X'| = 2/sqrt(pi)
    s = math.sqrt(2.0)
    exy = s * math.sqrt(2 / math.pi) * math.exp(-d * d / 4) + d * (1 - 2 * scipy.stats.norm.cdf(-d / s))
    return 2 * exy - 2 * (2 / math.sqrt(math.pi))


def test_energy_distance_1d_closed_form():
    r = rng(13)
    x, y = r.normal(size=3000), r.normal(size=3000) + 1.0
    want = _energy_1d_closed_form(1.0)
    assert M.energy_distance(x, y) == pytest.approx(want, abs=0.03)
    assert M.energy_distance(x, y, unbiased=True) == pytest.approx(want, abs=0.03)
    # V-statistic == exact energy distance of the empirical measures (scipy returns its root)
    assert M.energy_distance(x, y) == pytest.approx(scipy.stats.energy_distance(x, y) ** 2, rel=1e-6)


def test_energy_distance_chunked_matches_bruteforce():
    r = rng(14)
    x, y = r.normal(size=(1100, 3)), r.normal(size=(700, 3)) + 0.3
    dxy, dxx, dyy = cdist(x, y), cdist(x, x), cdist(y, y)
    v = 2 * dxy.mean() - dxx.mean() - dyy.mean()
    u = 2 * dxy.mean() - dxx.sum() / (1100 * 1099) - dyy.sum() / (700 * 699)
    assert M.energy_distance(x, y) == pytest.approx(v, rel=1e-9)
    assert M.energy_distance(x, y, unbiased=True) == pytest.approx(u, rel=1e-9)
    assert M.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- PSNR

def test_psnr_per_sample_mean():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.1  # mse .01 -> 10 log10(4 / .01)
    b[1] += 0.2  # mse .04 -> 10 log10(4 / .04) = 20
    want = (10 * math.log10(400) + 20.0) / 2
    assert M.psnr(a, b) == pytest.approx(want)
    assert M.psnr(a.numpy(), b.numpy(), data_range=1.0) == pytest.approx(want - 20 * math.log10(2))
    assert M.psnr(a, a) == math.inf
    with pytest.raises(UserError):
        M.psnr(a, b[:1])


# ---------------------------------------------------------------- digits classifier

@pytest.fixture(scope="module")
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16 * 2 - 1).astype(np.float32)[:, None]
    idx = np.arange(len(d.target))
    tr, te = train_test_split(idx, test_size=500, stratify=d.target, random_state=0)
    return x[tr], d.target[tr], x[te], d.target[te]


@pytest.mark.slow
def test_digits_classifier_accuracy(digits_split, tmp_path):
    from progdistill.eval.classifier import FEATURE_DIM, train_digits_classifier

    xtr, ytr, xte, yte = digits_split
    model = train_digits_classifier(xtr, ytr, seed=0)
    acc = (model.predict(xte).numpy() == yte).mean()
    assert acc >= 0.97, acc
    feats = model.features(torch.from_numpy(xte))
    assert feats.shape == (500, FEATURE_DIM) and feats.dtype == torch.float32
    assert M.class_entropy(model.predict(xte), 10) > 0.99 * math.log(10)


def test_digits_classifier_deterministic_and_cached(digits_split, tmp_path, monkeypatch):
    from progdistill.eval import classifier as C

    xtr, ytr, xte, _ = digits_split
    state0 = torch.random.get_rng_state()
    a = C.train_digits_classifier(xtr[:300], ytr[:300], seed=1, epochs=2, cache_path=tmp_path / "c.safetensors")
    assert torch.equal(torch.random.get_rng_state(), state0)  # global RNG untouched
    b = C.train_digits_classifier(xtr[:300], ytr[:300], seed=1, epochs=2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    c = C.train_digits_classifier(xtr[:300], ytr[:300], seed=2, epochs=2)
    assert not torch.equal(a.fc2.weight, c.fc2.weight)

    monkeypatch.setattr(C, "_train", lambda *a, **k: pytest.fail("retrained despite cache"))
    d = C.train_digits_classifier(xtr[:300], ytr[:300], seed=1, epochs=2, cache_path=tmp_path / "c.safetensors")
    assert torch.equal(d.predict(xte), a.predict(xte))
    assert not list(tmp_path.glob("*.tmp"))

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="delete the file"):
        C.train_digits_classifier(xtr, ytr, cache_path=tmp_path / "bad.safetensors")


def test_digits_classifier_input_checks():
    from progdistill.eval.classifier import train_digits_classifier

    with pytest.raises(UserError):
        train_digits_classifier(np.zeros((4, 1, 7, 7)), np.zeros(4))
    with pytest.raises(UserError):
        train_digits_classifier(np.zeros((4, 64)), np.array([0, 1, 2, 10]))
