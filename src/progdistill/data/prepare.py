"""`progdistill prepare`: any image source, once, into the prepared uint8 format of `stream.py`.

Sources are read as uint8 a piece at a time (digits as its 17 grey levels, npz arrays row chunks
straight from the archive member, CIFAR-10 one batch file at a time, a folder one decoded image at a
time), never through the float32 loaders. The shape rules are those of `data.py`: a source keeps its
own shape unless resolution/channels ask for another, and a conversion is said in one line. The
folder is written beside its destination, fsynced and published with one rename.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from progdistill.data.cifar10 import cifar10_batches
from progdistill.data.datasets import SPLITS, _check_shape_options, _digits, conform_images
from progdistill.data.folder import (folder_note, folder_side, has_colour, image_header, list_images, read_image,
                                     to_channels)
from progdistill.data.stream import FORMAT, HEADER, IMAGES, LABELS, decode
from progdistill.errors import UserError, one_line, require_path

CHUNK = 4096   # examples per conversion chunk


class _Source:
    """What a source yields: uint8 chunks (n, C, H, W) plus what the header records."""

    def __init__(self, chunks: Iterator[np.ndarray], total: int | None, *, levels: int = 255,
                 labels: np.ndarray | None = None, class_names: list[str] | None = None, note: str | None = None):
        self.chunks, self.total, self.levels, self.labels = chunks, total, levels, labels
        self.class_names, self.note = class_names, note
        self.gray_at_end = False   # a folder without colour: written as RGB, kept as one channel


def _digits_source(split: str) -> _Source:
    images, target, train, held = _digits()
    idx = {"train": train, "heldout": held, "all": np.arange(len(target))}[split]
    u = images[idx].astype(np.uint8)[:, None]          # values 0..16: levels 16 keeps them exact
    return _Source(iter([u]), len(u), levels=16, labels=target[idx].astype(np.int64),
                   class_names=[str(i) for i in range(10)])


def _npz_member(spec: str, zf: zipfile.ZipFile, name: str):
    f = zf.open(name + ".npy")
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return f, shape, fortran, dtype


def _npz_source(spec: str, path: Path, split: str) -> _Source:
    """An npz archive's image array, read in row chunks from the archive member (never whole)."""
    if split not in ("train", "all"):
        raise UserError(f"{spec}: an npz file has no {split!r} split; point a second npz: spec at held-out data")
    require_path(spec, path, is_dir=False)
    try:
        zf = zipfile.ZipFile(path)
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        name = "x" if "x" in names else next((n for n in names if n != "y"), None)
        if name is None:
            raise UserError(f"{spec}: {path} holds no arrays; save one with np.savez(path, x=..., y=...)")
        f, shape, fortran, dtype = _npz_member(spec, zf, name)
        labels = None
        if "y" in names:
            with zf.open("y.npy") as fy:
                labels = np.lib.format.read_array(fy, allow_pickle=False)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{spec}: cannot read {path} as .npz ({one_line(err)}); save it with np.savez") from None
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) or fortran:
        raise UserError(f"{spec}: array has dtype {dtype}{' in Fortran order' if fortran else ''}; "
                        f"save numeric (uint8 or float) data in C order")
    if len(shape) not in (3, 4) or shape[0] == 0:
        raise UserError(f"{spec}: array has shape {shape}; prepare takes (n, [C,] H, W[, C]) images "
                        f"(use vector data as npz: directly)")
    last = len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4)
    if labels is not None and (labels.ndim != 1 or len(labels) != shape[0] or not np.issubdtype(labels.dtype, np.integer)
                               or (len(labels) and labels.min() < 0)):
        raise UserError(f"{spec}: y must hold one non-negative integer class label per example; got {labels.shape}")
    row = int(np.prod(shape[1:])) * dtype.itemsize

    def chunks() -> Iterator[np.ndarray]:
        with zf, f:
            for start in range(0, shape[0], CHUNK):
                k = min(CHUNK, shape[0] - start)
                a = np.frombuffer(f.read(k * row), dtype=dtype).reshape(k, *shape[1:])
                a = a[:, None] if a.ndim == 3 else (a.transpose(0, 3, 1, 2) if last else a)
                yield _npz_uint8(spec, a)

    note = f"{spec}: float images quantised to uint8 (lossy)" if np.issubdtype(dtype, np.floating) else None
    return _Source(chunks(), shape[0], labels=None if labels is None else labels.astype(np.int64),
                   class_names=None, note=note)


def _npz_uint8(spec: str, a: np.ndarray) -> np.ndarray:
    """Integers in 0..255 as they are; floats in [-1, 1] quantised (the npz: loader's ranges)."""
    lo, hi = float(a.min()), float(a.max())
    if np.issubdtype(a.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise UserError(f"{spec}: integer image values span [{lo:g}, {hi:g}]; save uint8 0..255 or floats in [-1, 1]")
        return a.astype(np.uint8)
    if not np.isfinite(a).all() or lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise UserError(f"{spec}: float image values span [{lo:g}, {hi:g}] or are not finite; "
                        f"save uint8 or scale to [-1, 1]")
    return _quantise(torch.from_numpy(a.astype(np.float32)))


def _quantise(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> the nearest uint8 level of decode()."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).numpy()


def _cifar10_source(spec: str, root: Path, split: str) -> _Source:
    class_names, batches = cifar10_batches(spec, root, split)
    labels: list[np.ndarray] = []
    src = _Source(None, None, class_names=class_names)

    def chunks() -> Iterator[np.ndarray]:
        for data, y in batches:
            labels.append(y)
            yield data
        src.labels = np.concatenate(labels)

    src.chunks = chunks()
    return src


def _folder_source(spec: str, root: Path, split: str, resolution: int | None, channels: int | None) -> _Source:
    """One decoded image at a time; without --channels, RGB is written and reduced to one channel at the
    end if no image had colour (the folder: loader's rule)."""
    files, class_names, labels = list_images(spec, root, split)
    sizes = [image_header(f)[0] for f in files]
    side = folder_side(sizes, resolution)
    src = _Source(None, len(files), labels=labels, class_names=class_names)
    colour = False

    def chunks() -> Iterator[np.ndarray]:
        nonlocal colour
        for f in files:
            rgb = read_image(f, side)[None]
            colour = colour or has_colour(rgb)
            yield rgb if channels is None else to_channels(rgb, channels)
        c = channels if channels is not None else (3 if colour else 1)
        src.gray_at_end = channels is None and not colour
        src.note = folder_note(spec, sizes, side, chosen=resolution is not None, to_gray=c == 1 and colour,
                               to_rgb=c == 3 and not colour)

    src.chunks = chunks()
    return src


def _conformed(spec: str, src: _Source, resolution: int | None, channels: int | None) -> _Source:
    """Digits/npz/CIFAR-10 chunks at the requested shape: converted by data.conform_images a chunk at a
    time and quantised back to uint8 (said in the note); chunks already at that shape pass unchanged."""
    out = _Source(None, src.total, levels=src.levels, class_names=src.class_names)

    def chunks() -> Iterator[np.ndarray]:
        for u in src.chunks:
            c, h, w = u.shape[1:]
            if channels in (None, c) and resolution in (None, h) and (resolution is None or h == w):
                yield u
                continue
            x, note = conform_images(spec, decode(torch.from_numpy(u), src.levels), resolution=resolution,
                                     channels=channels)
            out.levels, out.note = 255, out.note or f"{note}, quantised to uint8"
            yield _quantise(x)
        out.labels, out.note = src.labels, out.note or src.note

    out.chunks = chunks()
    return out


def _open_source(spec: str, split: str, resolution: int | None, channels: int | None) -> _Source:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    split = "heldout" if split == "test" else split
    _check_shape_options(spec, resolution, channels)
    scheme, sep, arg = spec.strip().partition(":")
    path = Path(arg).expanduser()
    if spec.strip() == "digits":
        return _conformed(spec, _digits_source(split), resolution, channels)
    if scheme == "npz" and sep and arg:
        return _conformed(spec, _npz_source(spec, path, split), resolution, channels)
    if scheme == "cifar10" and sep and arg:
        return _conformed(spec, _cifar10_source(spec, path, split), resolution, channels)
    if scheme == "folder" and sep and arg:
        return _folder_source(spec, path, split, resolution, channels)
    raise UserError(f"prepare takes digits, folder:PATH, npz:PATH or cifar10:PATH image data, got {spec!r}"
                    f"{' (vector data needs no preparing)' if scheme == 'toy' else ''}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(spec: str, out: str | Path, *, split: str = "train", resolution: int | None = None,
            channels: int | None = None, progress: bool = True, log=print) -> Path:
    """Write data `spec` (one split) as a prepared folder `out` (stream.py's format); returns out.

    The folder is built as a hidden sibling, fsynced, and renamed onto `out` in one step: a reader
    never sees a partial folder. `out` must not exist yet.
    """
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out or delete it")
    split = "heldout" if split == "test" else split
    src = _open_source(spec, split, resolution, channels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        count, shape = 0, None
        bar = tqdm(total=src.total, desc=f"prepare {spec}", unit="img", disable=not progress, dynamic_ncols=True)
        with open(tmp / IMAGES, "wb") as f:
            for u in src.chunks:
                if shape is None:
                    shape = tuple(int(v) for v in u.shape[1:])
                f.write(np.ascontiguousarray(u, dtype=np.uint8).tobytes())
                count += len(u)
                bar.update(len(u))
            f.flush()
            os.fsync(f.fileno())
        bar.close()
        if count == 0:
            raise UserError(f"{spec}: holds no images; nothing to prepare")
        if src.gray_at_end:
            shape = _keep_first_channel(tmp / IMAGES, count, shape)
        note, labels = src.note, src.labels
        if labels is not None:
            with open(tmp / LABELS, "wb") as f:
                np.save(f, np.asarray(labels, dtype=np.int64))
                f.flush()
                os.fsync(f.fileno())
        class_names = src.class_names
        num_classes = len(class_names) if class_names else (int(labels.max()) + 1 if labels is not None else 0)
        header = {"format": FORMAT, "shape": list(shape), "count": count, "levels": src.levels,
                  "num_classes": num_classes, "class_names": class_names, "source": spec.strip(), "split": split,
                  "note": note}
        with open(tmp / HEADER, "w") as f:
            f.write(json.dumps(header, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if note:
        log(f"data: {note}")
    log(f"prepared {count} x {tuple(shape)} uint8 images ({count * int(np.prod(shape)) / 1e6:.1f} MB) "
        f"from {spec} ({split}) into {out}; "
        + (f"evaluate against it with --data prepared:{out}" if split == "heldout" else f"train with --data prepared:{out}"))
    return out


def _keep_first_channel(path: Path, count: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Rewrite an RGB image file whose images are all gray as one channel (sequential, in chunks)."""
    c, h, w = shape
    gray = path.with_suffix(".gray")
    with open(path, "rb") as src, open(gray, "wb") as dst:
        for start in range(0, count, CHUNK):
            k = min(CHUNK, count - start)
            a = np.frombuffer(src.read(k * c * h * w), np.uint8).reshape(k, c, h, w)
            dst.write(np.ascontiguousarray(a[:, :1]).tobytes())
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(gray, path)
    return (1, h, w)
