"""Data sources for diffusion training, selected by a string spec.

Specs: ``digits`` | ``toy:NAME`` | ``folder:PATH`` | ``npz:PATH`` | ``cifar10:PATH`` | ``prepared:DIR``.
Images come back as float32 (n, C, H, W) in [-1, 1]; toy/vector data as float32 (n, d). A prepared
folder (`progdistill prepare`) and a folder too large to hold stay uint8 and are read per batch:
`Dataset.stream` instead of `Dataset.x`.
An image source keeps its own shape unless `resolution`/`channels` ask for another; every
conversion is described in one line, `Dataset.note`, for the caller to print.
Every problem with the user's data raises :class:`UserError` with a one-line message.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from progdistill.data.cifar10 import read_cifar10
from progdistill.data.folder import (GRAY_MODES, FolderImages, folder_note, folder_side, has_colour, image_header,
                                     list_images, read_image, to_channels)
from progdistill.data.stream import LABELS, PreparedImages, decode, read_header
from progdistill.data.toy import TOY_NAMES, sample_toy, toy_name
from progdistill.errors import UserError, one_line, require_path
from progdistill.seeds import check_seed

SCHEMES = ("digits", "toy:NAME", "folder:PATH", "npz:PATH", "cifar10:PATH", "prepared:DIR")
SPLITS = ("train", "heldout", "test", "all")  # "test" is an alias of "heldout"

DIGITS_HELDOUT = 500  # fixed stratified hold-out of sklearn's 1,797 digits (random_state=0)
TOY_TRAIN_SIZE = 50_000  # fixed training set drawn with `seed`
TOY_HELDOUT_SIZE = 10_000  # fixed held-out set drawn with seed + TOY_HELDOUT_SEED_OFFSET
TOY_HELDOUT_SEED_OFFSET = 1_000_003
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


@dataclass
class Dataset:
    """A data set: held in memory (`x`), or streamed (`stream` reads uint8 examples by index)."""

    x: torch.Tensor | None  # float32; images (n, C, H, W) in [-1, 1]; vectors (n, d); None when streamed
    y: torch.Tensor | None  # int64 labels (n,) or None
    num_classes: int  # 0 when unlabelled
    kind: str  # "image" or "vector"
    name: str  # the spec it came from
    class_names: list[str] | None = None
    note: str | None = None  # one line naming any conversion (resize, crop, RGB -> gray), for the caller to print
    stream: torch.utils.data.Dataset | None = None  # PreparedImages or FolderImages when x is None

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-example shape, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.x.shape[1:]) if self.x is not None else tuple(self.stream.shape)

    def __len__(self) -> int:
        return int(self.x.shape[0]) if self.x is not None else len(self.stream)

    def examples(self, idx: torch.Tensor) -> torch.Tensor:
        """Examples idx as float32 (on x's device; streamed: read and decoded on the CPU)."""
        if self.x is not None:
            return self.x[idx.to(self.x.device)]
        return decode(torch.from_numpy(self.stream.read(idx.numpy())), self.stream.levels)

    def batches(self, size: int = 1000, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The first `limit` (default: all) examples in order, as float32 chunks of at most `size`."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(0, n, size):
            yield self.examples(torch.arange(i, min(n, i + size)))


def _check_shape_options(spec: str, resolution: int | None, channels: int | None) -> None:
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise UserError(f"{spec}: resolution must be a positive integer, got {resolution!r}")
    if channels is not None and channels not in (1, 3):
        raise UserError(f"{spec}: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def conform_images(spec: str, x: torch.Tensor, *, resolution: int | None,
                   channels: int | None) -> tuple[torch.Tensor, str | None]:
    """Images x (n, C, H, W) in [-1, 1] at `channels` and a `resolution` square (None: keep), plus a note.

    RGB -> gray uses the ITU-R 601-2 luma weights; gray -> RGB repeats the channel; a non-square
    image is centre-cropped to its shorter side, then resized (bicubic, antialiased) and clamped.
    """
    _check_shape_options(spec, resolution, channels)
    notes = []
    c, h, w = x.shape[1:]
    if channels is not None and c != channels:
        if (c, channels) == (3, 1):
            x = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA, dtype=x.dtype)).unsqueeze(1)
            notes.append("RGB -> grayscale (lossy)")
        elif (c, channels) == (1, 3):
            x = x.expand(-1, 3, -1, -1).contiguous()
            notes.append("grayscale repeated to 3 channels")
        else:
            raise UserError(f"{spec}: images have {c} channels, which cannot be converted to {channels}; "
                            f"save 1- or 3-channel images")
    if resolution is not None and (h, w) != (resolution, resolution):
        side = min(h, w)
        if h != w:
            top, left = (h - side) // 2, (w - side) // 2
            x = x[:, :, top:top + side, left:left + side]
            notes.append(f"{h}x{w} centre-cropped to {side}x{side} (lossy)")
        if side != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False,
                              antialias=resolution < side).clamp(-1.0, 1.0)
            notes.append(f"{side}x{side} {'downscaled' if resolution < side else 'upscaled'} to "
                         f"{resolution}x{resolution}{' (lossy)' if resolution < side else ''}")
    return x.contiguous(), (f"{spec}: " + ", ".join(notes)) if notes else None


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
    x, note = conform_images(spec, x, resolution=resolution, channels=channels)
    y = torch.from_numpy(target[idx].astype(np.int64))
    return Dataset(x, y, 10, "image", spec, [str(i) for i in range(10)], note=note)


def _load_toy(spec: str, name: str, split: str, seed: int) -> Dataset:
    name = toy_name(name)
    if split == "heldout":
        n, gen_seed = TOY_HELDOUT_SIZE, seed + TOY_HELDOUT_SEED_OFFSET
    else:  # "train" and "all" give the fixed training set
        n, gen_seed = TOY_TRAIN_SIZE, seed
    x = sample_toy(name, n, torch.Generator().manual_seed(gen_seed))
    return Dataset(x, None, 0, "vector", spec)


# -------------------------------------------------------------------------------- folder
LAZY_FOLDER_BYTES = 2 << 30   # a folder whose images would take more as float32 is read lazily, per batch


def _load_folder(spec: str, root: Path, split: str, resolution: int | None, channels: int | None) -> Dataset:
    """Images under root (flat, or one sub-folder per class). Defaults: the most common size (shorter
    side, centre-cropped) and 3 channels if any image has colour, else 1. A folder too large to hold
    as float32 is decoded per batch (`FolderImages`); its default channels then come from the image
    modes in the headers (3 if any image has a colour mode)."""
    _check_shape_options(spec, resolution, channels)
    files, class_names, labels = list_images(spec, root, split)
    headers = [image_header(f) for f in files]
    sizes = [wh for wh, _ in headers]
    side = folder_side(sizes, resolution)
    y = None if labels is None else torch.from_numpy(labels)
    k = len(class_names) if class_names else 0
    if len(files) * 3 * side * side * 4 > LAZY_FOLDER_BYTES:
        colour = any(mode not in GRAY_MODES for _, mode in headers)
        c = channels if channels is not None else (3 if colour else 1)
        note = folder_note(spec, sizes, side, chosen=resolution is not None, to_gray=c == 1 and colour,
                           to_rgb=c == 3 and not colour)
        return Dataset(None, y, k, "image", spec, class_names, note=note, stream=FolderImages(files, side, c))
    rgb = np.stack([read_image(f, side) for f in files])                  # (n, 3, side, side) uint8
    colour = has_colour(rgb)
    c = channels if channels is not None else (3 if colour else 1)
    note = folder_note(spec, sizes, side, chosen=resolution is not None, to_gray=c == 1 and colour,
                       to_rgb=c == 3 and not colour)
    return Dataset(_to_images(spec, np.ascontiguousarray(to_channels(rgb, c))), y, k, "image", spec, class_names,
                   note=note)


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
    note = None
    if arr.ndim == 2:
        _no_image_options(spec, resolution, channels)
        x, kind = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), "vector"
    elif arr.ndim in (3, 4):
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.shape[3] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)
        x, kind = _to_images(spec, np.ascontiguousarray(arr)), "image"
        x, note = conform_images(spec, x, resolution=resolution, channels=channels)
    else:
        raise UserError(f"{spec}: array has shape {arr.shape}; "
                        f"save (n, d) vectors or (n, [C,] H, W[, C]) images")
    if labels is None:
        return Dataset(x, None, 0, kind, spec, note=note)
    if labels.ndim != 1 or len(labels) != len(x):
        raise UserError(f"{spec}: y has shape {labels.shape} but x has {len(x)} examples; "
                        f"save one label per example")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise UserError(f"{spec}: y must hold non-negative integer class labels; got dtype {labels.dtype}")
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, int(y.max()) + 1, kind, spec, note=note)


# ------------------------------------------------------------------------------- cifar10
def _load_cifar10(spec: str, root: Path, split: str, resolution: int | None, channels: int | None) -> Dataset:
    arr, labels, class_names = read_cifar10(spec, root, split)
    x, note = conform_images(spec, _to_images(spec, arr), resolution=resolution, channels=channels)
    return Dataset(x, torch.from_numpy(labels), len(class_names), "image", spec, class_names, note=note)


# ------------------------------------------------------------------------------ prepared
def _load_prepared(spec: str, root: Path, split: str, resolution: int | None, channels: int | None,
                   reference: bool = False) -> Dataset:
    """A folder written by `progdistill prepare`: uint8 on disk, read per batch. A held-out folder is
    refused as training data ("train"), unless only read as a `reference` for scoring."""
    _check_shape_options(spec, resolution, channels)
    head = read_header(spec, root)
    held = head.get("split")
    if split == "heldout" and held != "heldout":
        raise UserError(f"{spec}: holds the {held!r} split, not 'heldout'; "
                        f"prepare held-out data into another folder (--split heldout)")
    if split == "train" and held == "heldout" and not reference:
        raise UserError(f"{spec}: holds a held-out split (prepared with --split heldout), which evaluation scores "
                        f"against, so it cannot train a model; prepare the training split with "
                        f"`progdistill prepare --split train` and train on that")
    c, h, w = head["shape"]
    if (resolution not in (None, h) or h != w) or channels not in (None, c):
        raise UserError(f"{spec}: holds {c}x{h}x{w} images, not {channels or c}x{resolution or h}x{resolution or w}; "
                        f"prepare it again with --resolution/--channels")
    y = None
    if (root / LABELS).is_file():
        y = torch.from_numpy(np.load(root / LABELS, allow_pickle=False).astype(np.int64))
    stream = PreparedImages(root, head["shape"], head["count"], head.get("levels", 255))
    return Dataset(None, y, int(head.get("num_classes") or 0), "image", spec, head.get("class_names"), stream=stream)


# ---------------------------------------------------------------------------------- API
def load_data(spec: str, *, split: str = "train", resolution: int | None = None,
              channels: int | None = None, seed: int = 0, reference: bool = False) -> Dataset:
    """Load the data set named by ``spec`` (see module docstring).

    ``split`` is "train", "heldout" (alias "test") or "all". Images keep their own shape
    (``folder:``: the most common size, 3 channels if any image has colour, else 1) unless
    ``resolution``/``channels`` ask for another; ``Dataset.note`` then names the conversion in
    one line. They do not apply to vectors. ``seed`` (in [0, 2^32)) only affects ``toy:`` draws; the
    digits hold-out split is fixed.

    ``split="train"`` is what training reads: a prepared folder of a held-out split is refused (evaluation
    would score against the data the model trained on). ``reference=True`` says the data only serves as
    a reference for scoring (evaluation's FID statistics of the "train" split), and reads it as it is.
    """
    check_seed(seed)
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
    loaders = {"folder": _load_folder, "npz": _load_npz, "cifar10": _load_cifar10, "prepared": _load_prepared}
    if scheme in loaders and sep:
        if not arg:
            raise UserError(f"{spec}: missing path; write {scheme}:PATH")
        if scheme == "prepared":
            return _load_prepared(spec, Path(arg).expanduser(), split, resolution, channels, reference)
        return loaders[scheme](spec, Path(arg).expanduser(), split, resolution, channels)
    raise UserError(f"unknown data spec {spec!r}; use one of {', '.join(SCHEMES)} "
                    f"(toy names: {', '.join(TOY_NAMES)})")


def random_hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip images x (n, C, H, W) along the width where the bool mask ``flip`` (n,) is True."""
    if flip.shape != (x.shape[0],):
        raise ValueError(f"flip mask must have shape ({x.shape[0]},), got {tuple(flip.shape)}")
    mask = flip.to(device=x.device, dtype=torch.bool).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)
