"""Tests for progdistill.data: every spec and every user-facing error."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import multivariate_normal

from progdistill.data import cifar10 as C
from progdistill.data import toy as D
from progdistill.data.datasets import Dataset, digits_split, load_data, random_hflip
from progdistill.data.toy import TOY_NAMES, sample_toy, toy_log_density
from progdistill.errors import UserError


def raises(match: str, fn, *args, **kwargs) -> str:
    """Assert that fn raises a one-line UserError matching `match`; return the message."""
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------- digits
def test_digits_splits_sizes_disjoint_and_values():
    train, held = load_data("digits"), load_data("digits", split="heldout")
    full = load_data("digits", split="all")
    assert (len(train), len(held), len(full)) == (1297, 500, 1797)
    for ds in (train, held, full):
        assert isinstance(ds, Dataset) and ds.kind == "image" and ds.name == "digits"
        assert ds.shape == (1, 8, 8) and ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.num_classes == 10 and ds.class_names == [str(i) for i in range(10)]
        assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert full.x.min() == -1 and full.x.max() == 1
    tr, he = digits_split()
    assert len(tr) == 1297 and len(he) == 500 and not set(tr) & set(he)
    assert sorted(np.concatenate([tr, he])) == list(range(1797))
    assert torch.equal(full.x[torch.from_numpy(he)], held.x)
    assert torch.equal(full.y[torch.from_numpy(tr)], train.y)
    assert torch.equal(load_data("digits", split="test").x, held.x)


def test_digits_stratified_and_deterministic():
    from sklearn.datasets import load_digits

    d = load_digits()
    held = load_data("digits", split="heldout")
    counts = np.bincount(held.y.numpy(), minlength=10)
    expected = 500 * np.bincount(d.target, minlength=10) / len(d.target)
    assert np.all(np.abs(counts - expected) <= 1)
    np.testing.assert_allclose(held.x.numpy()[:, 0], d.images[digits_split()[1]] / 8 - 1, atol=1e-6)
    again = load_data("digits", split="heldout", seed=123)
    assert torch.equal(again.x, held.x) and torch.equal(again.y, held.y)
    a, b = digits_split()
    a[:] = -1  # callers get copies
    assert (digits_split()[0] >= 0).all()


def test_digits_shape_options():
    same = load_data("digits", resolution=8, channels=1)
    assert same.shape == (1, 8, 8) and same.note is None
    big = load_data("digits", resolution=32, channels=3)   # options convert, and say so in one line
    assert big.shape == (3, 32, 32) and big.note == "digits: grayscale repeated to 3 channels, 8x8 upscaled to 32x32"
    assert big.x.min() >= -1 and big.x.max() <= 1 and torch.equal(big.x[:, 0], big.x[:, 2])
    raises(r"resolution must be a positive integer", load_data, "digits", resolution=0)
    raises(r"channels must be 1 \(grayscale\) or 3", load_data, "digits", channels=2)


# ------------------------------------------------------------------------------- toys
@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_sets(name):
    ds = load_data(f"toy:{name}", seed=3)
    assert ds.kind == "vector" and ds.y is None and ds.num_classes == 0 and ds.class_names is None
    assert ds.x.shape == (50_000, 2) and ds.shape == (2,) and ds.x.dtype == torch.float32
    assert torch.isfinite(ds.x).all()
    std, mean = ds.x.std(0), ds.x.mean(0)
    assert ((std > 0.75) & (std < 1.25)).all(), std
    assert (mean.abs() < 0.35).all(), mean
    assert torch.equal(load_data(f"toy:{name}", seed=3).x, ds.x)
    assert not torch.equal(load_data(f"toy:{name}", seed=4).x, ds.x)
    held = load_data(f"toy:{name}", split="heldout", seed=3)
    assert held.x.shape == (10_000, 2) and not torch.equal(held.x, ds.x[:10_000])


@pytest.mark.parametrize("name", TOY_NAMES)
def test_sample_toy_fresh_and_reproducible(name):
    g = torch.Generator().manual_seed(7)
    a, b = sample_toy(name, 1000, g), sample_toy(name, 1000, g)
    assert a.shape == (1000, 2) and a.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.equal(sample_toy(f"toy:{name}", 1000, torch.Generator().manual_seed(7)), a)


def test_gmm_statistics_and_checkerboard_support():
    x = sample_toy("gmm", 20_000, torch.Generator().manual_seed(0))
    r = x.norm(dim=1)
    assert abs(r.mean().item() - D.GMM_RADIUS) < 0.02
    assert abs(x.var(0).mean().item() - (D.GMM_RADIUS**2 / 2 + D.GMM_STD**2)) < 0.03
    c = sample_toy("checkerboard", 5000, torch.Generator().manual_seed(0)) / D.CHECKER_SCALE
    assert ((torch.floor(c[:, 0]) + torch.floor(c[:, 1])) % 2 == 0).all()
    assert c.abs().max() <= 2


def test_gmm_log_density_exact_and_normalised():
    mu = D._gmm_means(dtype=torch.float64).numpy()
    pts = torch.tensor([[0.0, 0.0], [1.4, 0.0], [1.0, 1.0], [-0.3, 1.2], [3.0, -2.0]], dtype=torch.float64)
    ref = np.log(sum(multivariate_normal(m, D.GMM_STD**2 * np.eye(2)).pdf(pts.numpy()) for m in mu) / len(mu))
    np.testing.assert_allclose(toy_log_density("gmm", pts).numpy(), ref, rtol=1e-8, atol=1e-8)
    assert toy_log_density("gmm", pts.float()).dtype == torch.float32
    assert toy_log_density("gmm", pts.view(5, 1, 2)).shape == (5, 1)
    h = 0.01
    g = torch.arange(-2.5, 2.5, h, dtype=torch.float64) + h / 2
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    assert abs(toy_log_density("gmm", grid).exp().sum().item() * h * h - 1) < 1e-3
    raises(r"only available for toy:gmm", toy_log_density, "moons", pts)


def test_toy_errors():
    msg = raises(r"unknown toy data set 'spiral'", load_data, "toy:spiral")
    assert all(n in msg for n in TOY_NAMES)
    raises(r"unknown toy", sample_toy, "nope", 3, torch.Generator())
    raises(r"unknown toy", toy_log_density, "nope", torch.zeros(1, 2))
    raises(r"vector data", load_data, "toy:gmm", resolution=8)


# ----------------------------------------------------------------------------- folder
def _png(path: Path, size=(8, 8), color=(255, 0, 0), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def test_folder_flat_unlabelled(tmp_path):
    _png(tmp_path / "a.png", (16, 12), (255, 255, 255))
    _png(tmp_path / "b.JPG", (10, 10), (0, 0, 0))
    _png(tmp_path / "c.bmp", (8, 8))
    _png(tmp_path / "d.webp", (9, 20))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"garbage")  # dotfiles are skipped
    ds = load_data(f"folder:{tmp_path}", resolution=8, channels=3)
    assert ds.kind == "image" and ds.shape == (3, 8, 8) and len(ds) == 4
    assert ds.y is None and ds.num_classes == 0 and ds.class_names is None
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert torch.allclose(ds.x[0], torch.ones(3, 8, 8)) and torch.allclose(ds.x[1], -torch.ones(3, 8, 8))
    red = ds.x[2]
    assert torch.allclose(red[0], torch.ones(8, 8)) and torch.allclose(red[1:], -torch.ones(2, 8, 8))
    gray = load_data(f"folder:{tmp_path}", resolution=4, channels=1)
    assert gray.shape == (1, 4, 4) and torch.allclose(gray.x[0], torch.ones(1, 4, 4))


def test_folder_centre_crop(tmp_path):
    img = np.zeros((8, 12, 3), np.uint8)  # h=8, w=12: the shorter side already fits
    img[:, :2] = 255
    img[:, -2:] = 255  # white strips that the centre crop removes
    Image.fromarray(img).save(tmp_path / "wide.png")
    ds = load_data(f"folder:{tmp_path}", resolution=8, channels=3)
    assert torch.allclose(ds.x, -torch.ones(1, 3, 8, 8))


def test_folder_class_subfolders(tmp_path):
    _png(tmp_path / "dogs" / "1.png")
    _png(tmp_path / "dogs" / "deep" / "2.png")
    _png(tmp_path / "cats" / "3.jpeg")
    (tmp_path / "empty").mkdir()
    ds = load_data(f"folder:{tmp_path}", resolution=4, channels=1)
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2
    assert ds.y.dtype == torch.int64 and sorted(ds.y.tolist()) == [0, 1, 1]


def test_folder_errors(tmp_path):
    raises(r"channels must be 1 \(grayscale\) or 3", load_data, f"folder:{tmp_path}", resolution=8, channels=2)
    raises(r"does not exist", load_data, f"folder:{tmp_path / 'nope'}", resolution=8, channels=3)
    raises(r"no images found", load_data, f"folder:{tmp_path}", resolution=8, channels=3)
    raises(r"not a folder", load_data, f"folder:{_png(tmp_path / 'x.png')}", resolution=8, channels=3)
    raises(r"no 'heldout' split", load_data, f"folder:{tmp_path}", split="heldout", resolution=8, channels=3)
    _png(tmp_path / "sub" / "y.png")
    raises(r"mixes images", load_data, f"folder:{tmp_path}", resolution=8, channels=3)
    bad = tmp_path / "sub" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    raises(r"cannot read image .*broken\.png", load_data, f"folder:{bad.parent}", resolution=8, channels=3)


# -------------------------------------------------------------------------------- npz
def test_npz_vectors_and_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3))
    np.savez(tmp_path / "v.npz", x=x, y=np.arange(20) % 4)
    ds = load_data(f"npz:{tmp_path / 'v.npz'}")
    assert ds.kind == "vector" and ds.shape == (3,) and ds.x.dtype == torch.float32
    np.testing.assert_allclose(ds.x.numpy(), x, rtol=1e-6)
    assert ds.num_classes == 4 and ds.y.dtype == torch.int64 and ds.y.tolist() == (np.arange(20) % 4).tolist()
    np.savez(tmp_path / "w.npz", y=np.zeros(5, int), data=np.ones((5, 2)))  # no `x`: first non-label array
    ds = load_data(f"npz:{tmp_path / 'w.npz'}")
    assert ds.shape == (2,) and ds.num_classes == 1
    raises(r"vector data", load_data, f"npz:{tmp_path / 'v.npz'}", channels=1)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_npz_uint8_image_layouts(tmp_path, layout):
    nchw = np.random.default_rng(1).integers(0, 256, size=(6, 3, 5, 5), dtype=np.uint8)
    if layout == "nhw":
        nchw = nchw[:, :1]
    arr = {"nchw": nchw, "nhwc": nchw.transpose(0, 2, 3, 1), "nhw": nchw[:, 0]}[layout]
    np.savez(tmp_path / "i.npz", arr)
    ds = load_data(f"npz:{tmp_path / 'i.npz'}")
    assert ds.kind == "image" and ds.shape == nchw.shape[1:] and ds.y is None
    np.testing.assert_allclose(ds.x.numpy(), nchw / 127.5 - 1, atol=1e-6)


def test_npz_float_images_and_shape_checks(tmp_path):
    x = np.random.default_rng(2).uniform(-1.0005, 1, size=(4, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x)
    spec = f"npz:{tmp_path / 'f.npz'}"
    ds = load_data(spec, resolution=6, channels=1)
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert load_data(spec, resolution=4).note == f"{spec}: 6x6 downscaled to 4x4 (lossy)"
    assert load_data(spec, channels=3).shape == (3, 6, 6)


def test_npz_errors(tmp_path):
    def save(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return f"npz:{tmp_path / name}"

    raises(r"does not exist", load_data, f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    raises(r"cannot read .*corrupt\.npz", load_data, f"npz:{tmp_path / 'corrupt.npz'}")
    np.save(tmp_path / "single.npy", np.zeros((2, 2)))
    raises(r"not an \.npz", load_data, f"npz:{tmp_path / 'single.npy'}")
    raises(r"holds no arrays", load_data, save("empty.npz"))
    raises(r"cannot read", load_data, save("obj.npz", x=np.array([{"a": 1}], dtype=object)))
    raises(r"nan\.npz contains NaN or inf", load_data, save("nan.npz", x=np.array([[0.0, np.nan]])))
    raises(r"inf\.npz contains NaN or inf", load_data, save("inf.npz", x=np.full((2, 1, 4, 4), np.inf)))
    raises(r"values span \[0, 255\]; save uint8 or scale to \[-1, 1\]", load_data,
           save("range.npz", x=np.linspace(0, 255, 2 * 16).reshape(2, 1, 4, 4)))
    raises(r"integer image values span \[-3, 3\]", load_data,
           save("int.npz", x=np.arange(-3, 4).repeat(16).reshape(7, 1, 4, 4)))
    raises(r"y has shape \(3,\) but x has 4", load_data,
           save("ylen.npz", x=np.zeros((4, 2)), y=np.zeros(3, int)))
    raises(r"non-negative integer", load_data, save("yflt.npz", x=np.zeros((2, 2)), y=np.array([0.5, 1.0])))
    raises(r"non-negative integer", load_data, save("yneg.npz", x=np.zeros((2, 2)), y=np.array([0, -1])))
    raises(r"array has shape \(3,\)", load_data, save("1d.npz", x=np.zeros(3)))
    raises(r"array is empty", load_data, save("zero.npz", x=np.zeros((0, 2))))
    raises(r"dtype", load_data, save("str.npz", x=np.array([["a", "b"]])))
    raises(r"no 'heldout' split", load_data, save("ok.npz", x=np.zeros((2, 2))), split="heldout")


# ---------------------------------------------------------------------------- cifar10
def _cifar_batch(path: Path, k: int, seed: int, protocol: int = 2) -> tuple[np.ndarray, list[int]]:
    """Write a CIFAR-10-format batch; protocol 2 mimics the real files' numpy.core references."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(k, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=k)]
    blob = pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"batch"}, protocol=protocol)
    if protocol == 2:  # as written by numpy 1.x / Python 2 (GLOBAL opcodes are plain text)
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)
    return data, labels


def _cifar_dir(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {name: _cifar_batch(root / name, k, i, protocol=2 + 3 * (i % 2))
               for i, (name, k) in enumerate([("data_batch_2", 3), ("data_batch_1", 4), ("test_batch", 2)])}
    names = [n.encode() for n in C.CIFAR10_CLASSES]
    names[0] = b"plane"
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return root, batches


def test_cifar10_splits(tmp_path):
    root, batches = _cifar_dir(tmp_path)
    train = load_data(f"cifar10:{root}", resolution=32, channels=3)
    assert len(train) == 7 and train.shape == (3, 32, 32) and train.kind == "image"
    assert train.num_classes == 10 and train.class_names[:2] == ["plane", "automobile"]
    data = np.concatenate([batches["data_batch_1"][0], batches["data_batch_2"][0]])  # numeric batch order
    np.testing.assert_allclose(train.x.numpy(), data.reshape(-1, 3, 32, 32) / 127.5 - 1, atol=1e-6)
    assert train.y.tolist() == batches["data_batch_1"][1] + batches["data_batch_2"][1]
    test = load_data(f"cifar10:{root}", split="test")
    assert len(test) == 2 and test.y.tolist() == batches["test_batch"][1]
    assert torch.equal(load_data(f"cifar10:{root}", split="heldout").x, test.x)
    assert len(load_data(f"cifar10:{root}", split="all")) == 9
    gray = load_data(f"cifar10:{root}", resolution=16, channels=1)
    assert gray.shape == (1, 16, 16) and "RGB -> grayscale (lossy), 32x32 downscaled to 16x16 (lossy)" in gray.note


def test_cifar10_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    root = tmp_path / "evil"
    root.mkdir()
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    msg = raises(r"refuses to unpickle .*system", load_data, f"cifar10:{root}")
    assert "data_batch_1" in msg and not marker.exists()
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [Path("x")]}, f)
    raises(r"refuses to unpickle pathlib", load_data, f"cifar10:{root}")


def test_cifar10_errors(tmp_path):
    raises(r"does not exist", load_data, f"cifar10:{tmp_path / 'nope'}")
    raises(r"no CIFAR-10 batches \(data_batch_1\.\.5\)", load_data, f"cifar10:{tmp_path}")
    raises(r"no CIFAR-10 batches \(test_batch\)", load_data, f"cifar10:{tmp_path}", split="test")
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02 truncated")
    raises(r"cannot read .*data_batch_1", load_data, f"cifar10:{tmp_path}")
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    raises(r"no uint8 \(n, 3072\)", load_data, f"cifar10:{tmp_path}")
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    raises(r"needs 2 labels in 0\.\.9", load_data, f"cifar10:{tmp_path}")
    for bad in (None, [0, 10], [0, "cat"]):
        with open(tmp_path / "data_batch_1", "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": bad}, f)
        raises(r"needs 2 labels", load_data, f"cifar10:{tmp_path}")
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump([1, 2], f)
    raises(r"does not hold a dict", load_data, f"cifar10:{tmp_path}")


# ------------------------------------------------------------------------ spec & misc
def test_spec_errors():
    msg = raises(r"unknown data spec 'mnist'", load_data, "mnist")
    assert all(s in msg for s in ("digits", "toy:NAME", "folder:PATH", "npz:PATH", "cifar10:PATH"))
    raises(r"unknown data spec", load_data, "folder")
    raises(r"missing path", load_data, "npz:")
    raises(r"unknown split 'val'", load_data, "digits", split="val")


def test_random_hflip():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    out = random_hflip(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    assert torch.equal(random_hflip(x, torch.zeros(2, dtype=torch.bool)), x)
    with pytest.raises(ValueError):
        random_hflip(x, torch.tensor([True]))
    assert math.isclose(random_hflip(x, torch.ones(2, dtype=torch.bool)).sum().item(), x.sum().item())


def test_gmm_mode_share_matches_the_rayleigh_closed_form_and_fails_off_the_modes():
    from progdistill.data.toy import GMM_RADIUS, gmm_mode_share
    g = torch.Generator().manual_seed(0)
    x = sample_toy("gmm", 40_000, g)
    assert abs(gmm_mode_share(x) - (1 - math.exp(-4.5))) < 0.003          # 2-D: P(r < 3 sigma) = 1 - e^{-9/2}
    assert abs(gmm_mode_share(x, k=1.0) - (1 - math.exp(-0.5))) < 0.01
    ang = torch.rand(40_000, generator=g) * 2 * math.pi                    # the blurred ring: mostly between modes
    ring = GMM_RADIUS * torch.stack([ang.cos(), ang.sin()], 1)
    arc = 2 * math.asin(3 * D.GMM_STD / (2 * GMM_RADIUS))                 # half-width of a mode's arc on the ring
    assert abs(gmm_mode_share(ring) - D.GMM_COMPONENTS * 2 * arc / (2 * math.pi)) < 0.01   # ~0.55, far below 0.97
