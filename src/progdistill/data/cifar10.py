"""CIFAR-10 python batches, read without unpickling arbitrary objects."""

from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from progdistill.errors import UserError, one_line, require_path

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    def __init__(self, file, path: Path) -> None:  # noqa: ANN001
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in _PICKLE_ALLOWED:
            raise UserError(f"{self.path}: the CIFAR-10 loader refuses to unpickle {module}.{name}; "
                            f"only numpy arrays are allowed, so this is not a CIFAR-10 python batch")
        if module.startswith("numpy.core"):
            try:  # numpy >= 2 renamed numpy.core to numpy._core
                return getattr(importlib.import_module("numpy._core" + module[10:]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _unpickle(spec: str, path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{spec}: cannot read {path} ({one_line(err)}); "
                        f"re-download CIFAR-10 (python version)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{spec}: {path} does not hold a dict; it is not a CIFAR-10 python batch")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar10_batches(spec: str, root: Path, split: str) -> tuple[list[str], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """The class names of a split ("train", "heldout", "all") and an iterator over its batch files:
    uint8 images (n, 3, 32, 32) and int64 labels (n,), one file at a time."""
    require_path(spec, root, is_dir=True)
    train = sorted((p for p in root.iterdir() if re.fullmatch(r"data_batch_\d+", p.name)),
                   key=lambda p: int(p.name.rsplit("_", 1)[1]))
    test = [root / "test_batch"] if (root / "test_batch").is_file() else []
    files = {"train": train, "heldout": test, "all": train + test}[split]
    if not files:
        want = "data_batch_1..5" if split == "train" else "test_batch"
        raise UserError(f"{spec}: no CIFAR-10 batches ({want}) in {root}; "
                        f"extract cifar-10-python.tar.gz there")
    class_names = list(CIFAR10_CLASSES)
    if (root / "batches.meta").is_file():
        names = _unpickle(spec, root / "batches.meta").get("label_names")
        if isinstance(names, list) and names:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return class_names, _read_batches(spec, files, len(class_names))


def _read_batches(spec: str, files: list[Path], num_classes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for path in files:
        batch = _unpickle(spec, path)
        data, labels = batch.get("data"), batch.get("labels")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
            raise UserError(f"{spec}: {path} has no uint8 (n, 3072) 'data' array; it is not a CIFAR-10 batch")
        try:
            labels = np.asarray(labels, dtype=np.int64)
        except (TypeError, ValueError):
            labels = np.full(1, -1)  # reported below
        if labels.shape != (len(data),) or ((labels < 0) | (labels >= num_classes)).any():
            raise UserError(f"{spec}: {path} needs {len(data)} labels in 0..{num_classes - 1}; "
                            f"the batch is corrupt, re-download it")
        yield data.reshape(-1, 3, 32, 32), labels


def read_cifar10(spec: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images (n, 3, 32, 32), int64 labels (n,) and the class names of a split ("train", "heldout", "all")."""
    class_names, batches = cifar10_batches(spec, root, split)
    xs, ys = zip(*batches)
    return np.concatenate(xs), np.concatenate(ys), class_names
