"""Folders of image files: listing, per-image decode to uint8, and a lazy dataset for folders too large to hold.

Every image is decoded on its own (EXIF rotation applied, shorter side scaled to the side, bicubic,
then centre-cropped), so a folder is never held as float32: `data.py` stacks the uint8 images of a
small folder, `prepare.py` writes them one by one, and `FolderImages` decodes them per batch in
DataLoader worker processes.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from progdistill.errors import UserError, one_line, require_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "F")


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {one_line(err)}; fix or remove the file") from None


def image_header(path: Path) -> tuple[tuple[int, int], str]:
    """((width, height) as displayed (EXIF rotation applied), mode), read from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            rotated = img.getexif().get(0x0112) in (5, 6, 7, 8)
            mode = img.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {one_line(err)}; fix or remove the file") from None
    return ((h, w) if rotated else (w, h)), mode


def read_image(path: Path, resolution: int) -> np.ndarray:
    """One image as uint8 RGB (3, r, r): shorter side scaled to r (bicubic), then centre-cropped."""
    with _open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def luma_uint8(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (n, 3, H, W) -> (n, 1, H, W) with PIL's fixed-point ITU-R 601-2 luma."""
    r, g, b = (rgb[:, i:i + 1].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def has_colour(rgb: np.ndarray) -> bool:
    """Whether any pixel of uint8 RGB images (n, 3, H, W) has unequal channels."""
    return bool((rgb[:, 0] != rgb[:, 1]).any() or (rgb[:, 1] != rgb[:, 2]).any())


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """uint8 RGB (n, 3, H, W) at 1 (luma: exact for gray pixels) or 3 channels."""
    return rgb if channels == 3 else luma_uint8(rgb)


def list_images(spec: str, root: Path, split: str) -> tuple[list[Path], list[str] | None, np.ndarray | None]:
    """The image files under root in sorted order, plus class names and labels (one sub-folder per class) or None."""
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
    if all(top_level):
        return files, None, None
    class_names = sorted({p[0] for p in rel})
    return files, class_names, np.array([class_names.index(p[0]) for p in rel], dtype=np.int64)


def folder_side(sizes: list[tuple[int, int]], resolution: int | None) -> int:
    """The requested side, else the most common size's shorter side."""
    return resolution if resolution is not None else min(Counter(sizes).most_common(1)[0][0])


def folder_note(spec: str, sizes: list[tuple[int, int]], side: int, *, chosen: bool, to_gray: bool,
                to_rgb: bool) -> str | None:
    """One line: how many images were resized/cropped to side x side, and any channel conversion."""
    parts = []
    off = [(w, h) for w, h in sizes if (w, h) != (side, side)]
    if off:
        why = "as requested" if chosen else "the most common size; --resolution chooses another"
        what = [f"{k} {verb}" for k, verb in (
            (sum(min(wh) > side for wh in off), "downscaled (lossy)"),
            (sum(min(wh) < side for wh in off), "upscaled"),
            (sum(w != h for w, h in off), "non-square centre-cropped (lossy)")) if k]
        parts.append(f"{len(off)} of {len(sizes)} images made {side}x{side} ({why}): {', '.join(what)}")
    if to_gray:
        parts.append("RGB -> grayscale (lossy)")
    if to_rgb:
        parts.append("grayscale repeated to 3 channels")
    return f"{spec}: " + "; ".join(parts) if parts else None


class FolderImages(torch.utils.data.Dataset):
    """A folder read lazily: each item decodes and resizes its images to uint8 (n, C, side, side).

    Items are index arrays keyed by the caller (`(key, idx) -> (key, images)`), so a DataLoader worker
    decodes a whole slice; only file names travel to workers. A colour image made gray uses PIL's luma.
    """

    def __init__(self, files: list[Path], side: int, channels: int):
        self.files, self.side, self.channels = [str(f) for f in files], side, channels
        self.shape, self.levels = (channels, side, side), 255

    def __len__(self) -> int:
        return len(self.files)

    def read(self, idx) -> np.ndarray:
        rgb = np.stack([read_image(Path(self.files[int(i)]), self.side) for i in np.asarray(idx).reshape(-1)])
        return to_channels(rgb, self.channels)

    def __getitem__(self, item):
        key, idx = item
        return key, torch.from_numpy(self.read(idx))
