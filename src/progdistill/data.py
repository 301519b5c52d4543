"""Data sources for diffusion training, selected by a string spec.

Specs: ``digits`` | ``toy:NAME`` | ``folder:PATH`` | ``npz:PATH`` | ``cifar10:PATH``.
Images come back as float32 (n, C, H, W) in [-1, 1]; toy/vector data as float32 (n, d).
Every problem with the user's data raises :class:`UserError` with a one-line message.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .cifar10 import read_cifar10
from .errors import UserError, one_line, require_path
from .toy import TOY_NAMES, sample_toy, toy_name

SCHEMES = ("digits", "toy:NAME", "folder:PATH", "npz:PATH", "cifar10:PATH")
SPLITS = ("train", "heldout", "test", "all")  # "test" is an alias of "heldout"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

DIGITS_HELDOUT = 500  # fixed stratified hold-out of sklearn's 1,797 digits (random_state=0)
TOY_TRAIN_SIZE = 50_000  # fixed training set drawn with `seed`
TOY_HELDOUT_SIZE = 10_000  # fixed held-out set drawn with seed + TOY_HELDOUT_SEED_OFFSET
TOY_HELDOUT_SEED_OFFSET = 1_000_003


@dataclass
class Dataset:
    """A whole data set held in memory."""

    x: torch.Tensor  # float32; images (n, C, H, W) in [-1, 1]; vectors (n, d)
    y: torch.Tensor | None  # int64 labels (n,) or None
    num_classes: int  # 0 when unlabelled
    kind: str  # "image" or "vector"
    name: str  # the spec it came from
    class_names: list[str] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-example shape, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _check_image_shape(spec: str, x: torch.Tensor, resolution: int | None, channels: int | None) -> None:
    c, h, w = x.shape[1:]
    if channels is not None and c != channels:
        raise UserError(f"{spec}: images have {c} channel(s) but channels={channels} was requested; "
                        f"pass channels={c} or convert the data")
    if resolution is not None and (h, w) != (resolution, resolution):
        raise UserError(f"{spec}: images are {h}x{w} but resolution={resolution} was requested; "
                        f"pass resolution={h} (square images) or resize the data")


def _no_image_options(spec: str, resolution: int | None, channels: int | None) -> None:
    if resolution is not None or channels is not None:
        raise UserError(f"{spec}: is vector data, so resolution/channels do not apply; leave them unset")


def _to_images(spec: str, arr: np.ndarray) -> torch.Tensor:
    """Integers in 0..255 or floats in [-1, 1] (tolerance 1e-3) -> float32 in [-1, 1]."""
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise UserError(f"{spec}: integer image values span [{lo:g}, {hi:g}]; save uint8 0..255 "
                            f"or floats in [-1, 1]")
        return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise UserError(f"{spec}: float image values span [{lo:g}, {hi:g}]; save uint8 or scale to [-1, 1]")
    return torch.from_numpy(np.clip(arr.astype(np.float32), -1.0, 1.0))


# --------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    train, held = train_test_split(idx, test_size=DIGITS_HELDOUT, stratify=d.target, random_state=0)
    return d.images, d.target, np.sort(train), np.sort(held)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, heldout_idx), sorted, into sklearn ``load_digits`` order (1,297 + 500)."""
    _, _, train, held = _digits()
    return train.copy(), held.copy()


def _load_digits(spec: str, split: str, resolution: int | None, channels: int | None) -> Dataset:
    images, target, train, held = _digits()
    idx = {"train": train, "heldout": held, "all": np.arange(len(target))}[split]
    x = torch.from_numpy((images[idx] / 16.0 * 2.0 - 1.0).astype(np.float32)).unsqueeze(1)
    _check_image_shape(spec, x, resolution, channels)
    y = torch.from_numpy(target[idx].astype(np.int64))
    return Dataset(x, y, 10, "image", spec, [str(i) for i in range(10)])


def _load_toy(spec: str, name: str, split: str, seed: int) -> Dataset:
    name = toy_name(name)
    if split == "heldout":
        n, gen_seed = TOY_HELDOUT_SIZE, seed + TOY_HELDOUT_SEED_OFFSET
    else:  # "train" and "all" give the fixed training set
        n, gen_seed = TOY_TRAIN_SIZE, seed
    x = sample_toy(name, n, torch.Generator().manual_seed(gen_seed))
    return Dataset(x, None, 0, "vector", spec)


# -------------------------------------------------------------------------------- folder
def _read_image(path: Path, resolution: int, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {one_line(err)}; fix or remove the file") from None
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_folder(spec: str, root: Path, split: str, resolution: int | None, channels: int | None) -> Dataset:
    if resolution is None or channels is None:
        raise UserError(f"{spec}: folder data needs both resolution and channels; pass them")
    if resolution < 1 or channels not in (1, 3):
        raise UserError(f"{spec}: need resolution >= 1 and channels 1 or 3, got {resolution} and {channels}")
    if split not in ("train", "all"):
        raise UserError(f"{spec}: a folder has no {split!r} split; "
                        f"point a second folder: spec at held-out images")
    require_path(spec, root, is_dir=True)
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UserError(f"{spec}: no images found in {root}; add {'/'.join(IMAGE_EXTENSIONS)} files")
    rel = [f.relative_to(root).parts for f in files]
    top_level = [len(p) == 1 for p in rel]
    if any(top_level) and not all(top_level):
        raise UserError(f"{spec}: {root} mixes images at the top level and in sub-folders; "
                        f"put all in class sub-folders or none")
    mode = "L" if channels == 1 else "RGB"
    x = _to_images(spec, np.stack([_read_image(f, resolution, mode) for f in files]))
    if all(top_level):
        return Dataset(x, None, 0, "image", spec)
    class_names = sorted({p[0] for p in rel})
    y = torch.tensor([class_names.index(p[0]) for p in rel], dtype=torch.int64)
    return Dataset(x, y, len(class_names), "image", spec, class_names)


# ----------------------------------------------------------------------------------- npz
def _load_npz(spec: str, path: Path, split: str, resolution: int | None, channels: int | None) -> Dataset:
    if split not in ("train", "all"):
        raise UserError(f"{spec}: an npz file has no {split!r} split; "
                        f"point a second npz: spec at held-out data")
    require_path(spec, path, is_dir=False)
    try:
        with open(path, "rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("it is a single .npy array, not an .npz archive")
            names = ["x"] if "x" in npz.files else [f for f in npz.files if f != "y"]
            arr = npz[names[0]] if names else None
            labels = npz["y"] if "y" in npz.files else None
    except Exception as err:  # zipfile/pickle/format errors all mean "not a usable .npz"
        raise UserError(f"{spec}: cannot read {path} as .npz ({one_line(err)}); "
                        f"save it with np.savez") from None
    if arr is None:
        raise UserError(f"{spec}: {path} holds no arrays; save one with np.savez(path, x=..., y=...)")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise UserError(f"{spec}: array has dtype {arr.dtype}; save numeric (uint8 or float) data")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise UserError(f"{spec}: array is empty; save at least one example")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise UserError(f"{spec}: {path} contains NaN or inf values; clean the data")
    if arr.ndim == 2:
        _no_image_options(spec, resolution, channels)
        x, kind = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), "vector"
    elif arr.ndim in (3, 4):
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.shape[3] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)
        x, kind = _to_images(spec, np.ascontiguousarray(arr)), "image"
        _check_image_shape(spec, x, resolution, channels)
    else:
        raise UserError(f"{spec}: array has shape {arr.shape}; "
                        f"save (n, d) vectors or (n, [C,] H, W[, C]) images")
    if labels is None:
        return Dataset(x, None, 0, kind, spec)
    if labels.ndim != 1 or len(labels) != len(x):
        raise UserError(f"{spec}: y has shape {labels.shape} but x has {len(x)} examples; "
                        f"save one label per example")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise UserError(f"{spec}: y must hold non-negative integer class labels; got dtype {labels.dtype}")
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, int(y.max()) + 1, kind, spec)


# ------------------------------------------------------------------------------- cifar10
def _load_cifar10(spec: str, root: Path, split: str, resolution: int | None, channels: int | None) -> Dataset:
    arr, labels, class_names = read_cifar10(spec, root, split)
    x = _to_images(spec, arr)
    _check_image_shape(spec, x, resolution, channels)
    return Dataset(x, torch.from_numpy(labels), len(class_names), "image", spec, class_names)


# ---------------------------------------------------------------------------------- API
def load_data(spec: str, *, split: str = "train", resolution: int | None = None,
              channels: int | None = None, seed: int = 0) -> Dataset:
    """Load the data set named by ``spec`` (see module docstring).

    ``split`` is "train", "heldout" (alias "test") or "all". ``resolution``/``channels`` are
    required for ``folder:`` and otherwise only checked against the data. ``seed`` only
    affects ``toy:`` draws; the digits hold-out split is fixed.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    split = "heldout" if split == "test" else split
    spec = spec.strip()
    scheme, sep, arg = spec.partition(":")
    if spec == "digits":
        return _load_digits(spec, split, resolution, channels)
    if scheme == "toy" and sep:
        _no_image_options(spec, resolution, channels)
        return _load_toy(spec, arg, split, seed)
    loaders = {"folder": _load_folder, "npz": _load_npz, "cifar10": _load_cifar10}
    if scheme in loaders and sep:
        if not arg:
            raise UserError(f"{spec}: missing path; write {scheme}:PATH")
        return loaders[scheme](spec, Path(arg).expanduser(), split, resolution, channels)
    raise UserError(f"unknown data spec {spec!r}; use one of {', '.join(SCHEMES)} "
                    f"(toy names: {', '.join(TOY_NAMES)})")


def random_hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip images x (n, C, H, W) along the width where the bool mask ``flip`` (n,) is True."""
    if flip.shape != (x.shape[0],):
        raise ValueError(f"flip mask must have shape ({x.shape[0]},), got {tuple(flip.shape)}")
    mask = flip.to(device=x.device, dtype=torch.bool).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)
