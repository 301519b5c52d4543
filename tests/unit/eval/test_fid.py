"""The FID path end to end, offline, with a scripted stand-in for the Inception detector."""

import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from progdistill.errors import UserError
from progdistill.eval import fid

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit:DeprecationWarning")


class StandIn(torch.nn.Module):
    """Same call interface as inception-2015-12-05.pt: uint8 (N,3,H,W) -> (N,2048) features."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("conv", torch.randn(16, 3, 3, 3, generator=g) / 3)
        self.register_buffer("proj", torch.randn(16, 2048, generator=g))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = x.to(torch.float32) / 127.5 - 1
        h = torch.tanh(F.conv2d(h, self.conv, padding=1)).mean(dim=(2, 3))
        f = torch.tanh(h @ self.proj)
        return f if return_features else f[:, :1008]


class Recorder:
    """Wraps a detector, keeping its inputs and the number of calls."""

    def __init__(self, det):
        self.det, self.inputs = det, []

    def __call__(self, x, return_features=False):
        self.inputs.append(x.clone())
        return self.det(x, return_features=return_features)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / fid.INCEPTION_FILENAME
    torch.jit.save(torch.jit.script(StandIn()), str(path))
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No env var, cache under tmp_path, every download fails as if offline."""
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fid, "default_inception_path", lambda: tmp_path / "cache" / fid.INCEPTION_FILENAME)

    def no_network(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fid.urllib.request, "urlopen", no_network)
    return tmp_path / "cache" / fid.INCEPTION_FILENAME


def images(n, seed, shift=0.0, channels=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, 8, 8, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


def test_load_explicit_env_and_cache(detector_path, offline, monkeypatch):
    det = fid.load_inception(detector_path)
    assert det(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), return_features=True).shape == (2, 2048)
    monkeypatch.setenv(fid.INCEPTION_ENV, str(detector_path))
    fid.load_inception()
    monkeypatch.delenv(fid.INCEPTION_ENV)
    offline.parent.mkdir(parents=True)
    offline.write_bytes(detector_path.read_bytes())
    fid.load_inception(allow_download=False)


def test_offline_errors_are_one_line(offline, tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        fid.load_inception()
    msg = str(e.value)
    assert "\n" not in msg and fid.INCEPTION_FILENAME in msg and fid.INCEPTION_URL in msg
    assert str(offline) in msg and fid.INCEPTION_ENV in msg and "--inception" in msg
    assert not offline.exists() and not list(offline.parent.glob("*.tmp"))  # no partial file left

    with pytest.raises(UserError, match="downloads disabled"):
        fid.load_inception(allow_download=False)
    with pytest.raises(UserError, match="not found at") as e:
        fid.load_inception(tmp_path / "missing.pt")
    assert "\n" not in str(e.value)
    monkeypatch.setenv(fid.INCEPTION_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match=fid.INCEPTION_ENV):
        fid.load_inception()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"<html>not a model</html>")
    with pytest.raises(UserError, match="TorchScript"):
        fid.load_inception(bad)


def test_download_writes_cache_atomically(detector_path, offline, monkeypatch):
    payload = detector_path.read_bytes()

    class Resp:
        def __init__(self):
            self.chunks = [payload[: len(payload) // 2], payload[len(payload) // 2:], b""]

        def read(self, n):
            return self.chunks.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda url, timeout: Resp())
    det = fid.load_inception()
    assert offline.read_bytes() == payload
    assert det(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), return_features=True).shape == (1, 2048)


def test_features_conversion_and_batching(detector_path):
    rec = Recorder(fid.load_inception(detector_path))
    x = images(7, 0, channels=1)
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, -5.0, 5.0])  # ends and out-of-range values
    f = fid.inception_features(x, rec, batch_size=3)
    assert f.shape == (7, 2048) and f.dtype == np.float32
    assert len(rec.inputs) == 3 and [b.shape[0] for b in rec.inputs] == [3, 3, 1]
    b = torch.cat(rec.inputs)
    assert b.shape == (7, 3, 8, 8) and b.dtype == torch.uint8
    assert torch.equal(b[:, 0], b[:, 1]) and torch.equal(b[:, 0], b[:, 2])  # grey -> RGB
    assert b[0, 0, 0, :4].tolist() == [0, 255, 0, 255]
    want = torch.floor((x * 127.5 + 127.5 + 0.5).clamp(0, 255))  # round half up, as the reference
    assert torch.equal(b[:, :1].float(), want.clamp(max=255))
    rgb = fid.inception_features(images(4, 1, channels=3).numpy(), rec)
    assert rgb.shape == (4, 2048)
    with pytest.raises(UserError):
        fid.inception_features(torch.zeros(2, 2, 8, 8), rec)
    with pytest.raises(UserError):
        fid.inception_features(torch.full((2, 1, 8, 8), float("nan")), rec)


def test_reference_stats_cached_and_fid(detector_path, tmp_path):
    det = fid.load_inception(detector_path)
    calls = []

    def images_fn():
        calls.append(1)
        return images(300, 0)

    mu, sigma = fid.reference_stats("digits-test", images_fn, det, tmp_path / "stats")
    mu2, sigma2 = fid.reference_stats("digits-test", images_fn, det, tmp_path / "stats")
    assert len(calls) == 1
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with np.load(tmp_path / "stats" / "digits-test.npz") as z:
        assert int(z["n"]) == 300
    assert not list((tmp_path / "stats").glob("*.tmp"))

    with threadpool_limits(1, user_api="blas"):  # 2048-d eigvals: avoid BLAS spin on busy CI cores
        same = fid.fid_from_features(fid.inception_features(images(300, 0), det), mu, sigma)
        shifted = fid.fid_from_images(images(300, 0, shift=0.4), det, mu, sigma)
    assert abs(same) < 1e-2  # rank-299 covariance in 2048-d: round-off only
    assert shifted > 1.0
    with pytest.raises(UserError):
        fid.reference_stats("../escape", images_fn, det, tmp_path)


def test_reference_key_differs_where_it_must_and_is_stable_otherwise(tmp_path):
    (tmp_path / "a_b").mkdir()
    (tmp_path / "a" / "b").mkdir(parents=True)
    for d in (tmp_path / "a_b", tmp_path / "a" / "b"):
        (d / "x.png").write_bytes(b"same bytes")
        os.utime(d / "x.png", ns=(10**18, 10**18))
    det, other = StandIn(), StandIn()
    other.proj.add_(1)

    def key(spec=f"folder:{tmp_path}/a_b", **kw):
        return fid.reference_key(spec, **{**dict(split="train", resolution=8, channels=3, count=None, detector=det), **kw})

    base = key()
    assert key() == base                                                   # stable
    assert key(f"folder:{tmp_path}/a/../a_b") == base                       # the resolved path
    assert key(detector=StandIn()) == base                                  # same weights, same hash
    assert base[0].startswith("folder-train-") and fid.re.fullmatch(r"[A-Za-z0-9._-]+", base[0])
    changed = [key(f"folder:{tmp_path}/a/b"), key(resolution=16), key(channels=1), key(split="heldout"),
               key(count=100), key(detector=other), key(f"npz:{tmp_path}/a_b")]
    assert len({k[0] for k in changed} | {base[0]}) == len(changed) + 1
    (tmp_path / "a_b" / "x.png").write_bytes(b"other bytes")               # content changed
    assert key()[0] != base[0]
    assert fid.reference_key("digits", split="heldout", resolution=8, channels=1, count=300, detector=det)[0] \
        .startswith("digits-heldout-")


def test_reference_stats_recomputed_when_the_key_differs(tmp_path):
    det, calls = StandIn(), []

    def images_fn():
        calls.append(1)
        return images(20, 0)

    with threadpool_limits(1, user_api="blas"):
        fid.reference_stats("s", images_fn, det, tmp_path, key="k1")
        fid.reference_stats("s", images_fn, det, tmp_path, key="k1")
        assert len(calls) == 1
        fid.reference_stats("s", images_fn, det, tmp_path, key="k2")   # same name, other key: never stale
        assert len(calls) == 2
    with np.load(tmp_path / "s.npz") as z:
        assert str(z["key"]) == "k2"
