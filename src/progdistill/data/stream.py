"""Images that stay uint8 on disk and are read per batch: the prepared format, its reader, keyed
per-chunk noise, and the loader that reads only this process's part of each global batch.

A prepared folder (written by `prepare.py`) holds
  images.u8    N x C x H x W uint8, C order, no header (example k at byte k * C*H*W)
  labels.npy   int64 (N,), only for labelled data
  header.json  {"format", "shape", "count", "levels", "num_classes", "class_names", "source", "split", "note"}
Pixel value u decodes to u / levels * 2 - 1 (levels 255; 16 for digits, whose 17 grey levels stay exact).

The reader takes each example's bytes with a positional read (`os.preadv`) rather than a memory map:
random batch reads through a memory map pulled about 1 GB of file pages into the process's RSS from a
1 GB file (read-ahead; MADV_RANDOM did not help), positional reads kept it at 35 MB (issue 9;
`benchmarks/data_scale.py --reader mmap|pread` measures both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from progdistill.errors import UserError, require_path
from progdistill.seeds import check_seed, generator_for

FORMAT = "progdistill-prepared/1"
HEADER, IMAGES, LABELS = "header.json", "images.u8", "labels.npy"
NOISE_CHUNK = 16                 # examples per noise generator: a rank draws only the chunks its slice touches
NOISE_KEY = 2_000_000_011        # key of the per-chunk noise generators (seed, ..., NOISE_KEY, chunk)
FLIP_KEY = 2_000_000_029         # key of a per-step flip generator added after the step's other draws existed


def decode(u: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], bit for bit as the in-memory loaders compute them."""
    if levels == 255:
        return u.float() / 127.5 - 1.0
    return (u.double() / levels * 2.0 - 1.0).float()


def read_header(spec: str, root: Path) -> dict:
    """The JSON header of a prepared folder, checked against its image file's size."""
    require_path(spec, root, is_dir=True)
    try:
        head = json.loads((root / HEADER).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{spec}: cannot read {root / HEADER} ({type(err).__name__}); "
                        f"write the folder with `progdistill prepare`") from None
    if head.get("format") != FORMAT:
        raise UserError(f"{spec}: {root / HEADER} has format {head.get('format')!r}, not {FORMAT!r}; prepare it again")
    size = (root / IMAGES).stat().st_size if (root / IMAGES).is_file() else -1
    if size != head["count"] * int(np.prod(head["shape"])):
        raise UserError(f"{spec}: {root / IMAGES} holds {size} bytes, not {head['count']} x {head['shape']}; "
                        f"the folder is incomplete, prepare it again")
    return head


class PreparedImages(torch.utils.data.Dataset):
    """The uint8 examples of a prepared folder, read by index: `read(idx)` -> (n, C, H, W) uint8.

    As a DataLoader dataset an item is `(key, idx)` and gives `(key, images)`. The file is opened on
    first use in each process (a worker under `spawn` receives only the path), so nothing is pickled
    but a few numbers. `reader="mmap"` exists only for the memory measurement.
    """

    def __init__(self, root: str | Path, shape: tuple[int, ...], count: int, levels: int = 255, reader: str = "pread"):
        self.path, self.shape, self.n, self.levels = str(Path(root) / IMAGES), tuple(shape), int(count), int(levels)
        self.reader, self.nbytes = reader, int(np.prod(shape))
        self._fd: int | None = None
        self._mm = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_mm": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def read(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"example index out of range 0..{self.n - 1}")
        if self.reader == "mmap":
            if self._mm is None:
                self._mm = np.memmap(self.path, np.uint8, "r", shape=(self.n, *self.shape))
            return np.ascontiguousarray(self._mm[idx])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(idx), self.nbytes), np.uint8)
        for row, i in zip(out, idx.tolist()):
            if os.preadv(self._fd, [row], i * self.nbytes) != self.nbytes:
                raise UserError(f"{self.path}: short read at example {i}; the file was truncated, prepare it again")
        return out.reshape(len(idx), *self.shape)

    def __getitem__(self, item):
        key, idx = item
        return key, torch.from_numpy(self.read(idx))


def part_bounds(part: slice, batch_size: int) -> tuple[int, int]:
    """(start, stop) of a slice of a global batch."""
    start, stop, _ = part.indices(batch_size)
    return start, stop


def chunk_noise(keys: tuple[int, ...], part: slice, batch_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise for examples part of a global batch: chunk c of NOISE_CHUNK examples comes from
    generator_for(*keys, NOISE_KEY, c), so a process draws only the chunks its part touches and the
    noise of example k never depends on how the batch is split across processes or micro-batches.
    keys[0] is the run's seed, checked to lie in [0, 2^32)."""
    check_seed(keys[0])
    start, stop = part_bounds(part, batch_size)
    if stop <= start:
        return torch.empty((0, *shape))
    out = []
    for c in range(start // NOISE_CHUNK, (stop - 1) // NOISE_CHUNK + 1):
        z = torch.randn((NOISE_CHUNK, *shape), generator=generator_for("cpu", *keys, NOISE_KEY, c))
        lo, hi = max(start, c * NOISE_CHUNK) - c * NOISE_CHUNK, min(stop, (c + 1) * NOISE_CHUNK) - c * NOISE_CHUNK
        out.append(z[lo:hi])
    return torch.cat(out) if len(out) > 1 else out[0].contiguous()


class _PlanOrder:
    """The (key, idx) items a DataLoader reads, in the order the loop asks for them."""

    def __init__(self, plan: Callable[[int], torch.Tensor], part: Callable[[int], slice], start: int, iters: int,
                 grad_accum: int):
        self.plan, self.part, self.start, self.iters, self.grad_accum = plan, part, start, iters, grad_accum

    def __iter__(self):
        for step in range(self.start, self.iters):
            idx = self.plan(step)
            for micro in range(self.grad_accum):
                yield (step, micro), idx[self.part(micro)].numpy()

    def __len__(self) -> int:
        return (self.iters - self.start) * self.grad_accum


class StepLoader:
    """This process's examples for each (step, micro) of steps start..iters-1, as float32 on `device`.

    In-memory data is indexed directly. Streamed data (`data.stream`) is read by a DataLoader that
    follows `plan(step)` (the global batch's example indices, a pure function of the step) and
    `part(micro)` (this process's slice), so it reads only this process's examples, ahead of use, in
    `workers` processes (0: in this one) and into pinned memory on CUDA.
    """

    def __init__(self, data, plan: Callable[[int], torch.Tensor], part: Callable[[int], slice], *, start: int,
                 iters: int, grad_accum: int, device: torch.device, workers: int = 0):
        self.data, self.device, self._it = data, device, None
        if data.stream is not None and start < iters:
            self._loader = torch.utils.data.DataLoader(
                data.stream, batch_size=None, sampler=_PlanOrder(plan, part, start, iters, grad_accum),
                num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
            self._it = iter(self._loader)

    def __call__(self, step: int, micro: int, idx: torch.Tensor) -> torch.Tensor:
        if self.data.stream is None:
            return self.data.x[idx.to(self.data.x.device)]
        key, u = next(self._it)
        if tuple(key) != (step, micro):
            raise RuntimeError(f"data loader out of order: asked for {(step, micro)}, got {tuple(key)}")
        return decode(u.to(self.device, non_blocking=True), self.data.stream.levels)

    def close(self) -> None:
        self._it = None   # shuts its workers down
