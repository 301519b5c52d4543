"""Writing samples a person can look at: image grids (PNG) and 2-D scatter plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile images into one picture, `nrow` per row, with a `pad`-pixel border; upscale by `scale`."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = imgs[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def scatter_png(x: torch.Tensor, path: Path, title: str = "", reference: torch.Tensor | None = None) -> None:
    """A 2-D scatter plot of vectors (first two coordinates), optionally over reference points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=1, c="lightgray", label="data")
    ax.scatter(x[:, 0].cpu(), x[:, 1].cpu(), s=1, c="tab:blue", label="samples")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_samples(x: torch.Tensor, path: Path, *, title: str = "", nrow: int | None = None) -> Path:
    """Images -> grid PNG (small images upscaled to be visible); vectors -> scatter PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.dim() == 4:
        scale = max(1, 64 // x.shape[-1])
        image_grid(x, nrow=nrow, scale=scale).save(path)
    else:
        scatter_png(x, path, title=title)
    return path


def _labelled(img: Image.Image, label: str) -> Image.Image:
    """The picture with a one-line caption above it."""
    canvas = Image.new("RGB", (img.width, img.height + 16), "white")
    canvas.paste(img.convert("RGB"), (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), label, fill="black")
    return canvas


def side_by_side(panels: list[tuple[str, torch.Tensor]], nrow: int) -> Image.Image:
    """Labelled grids next to each other (same seeds, so sample k sits at the same place in each)."""
    imgs = [_labelled(image_grid(x, nrow=nrow, scale=4), label) for label, x in panels]
    out = Image.new("RGB", (sum(i.width for i in imgs) + 8 * (len(imgs) - 1), max(i.height for i in imgs)), "white")
    x0 = 0
    for img in imgs:
        out.paste(img, (x0, 0))
        x0 += img.width + 8
    return out


def panels_png(panels: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """Labelled panels side by side: image grids, or 2-D scatter plots for vectors."""
    if panels[0][1].dim() == 4:
        side_by_side(panels, nrow=int(len(panels[0][1]) ** 0.5)).save(path)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3), dpi=100)
    for ax, (label, x) in zip(axes, panels):
        ax.scatter(x[:, 0], x[:, 1], s=2)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
