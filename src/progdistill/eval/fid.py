"""Standard FID (Heusel et al. 2017) with the TF-compatible Inception-v3 pool3 features, no torchvision.

Uses the TorchScript detector `inception-2015-12-05.pt` of the StyleGAN2-ADA / StyleGAN3 / EDM
metrics: it is called as `detector(images, return_features=True)` on uint8 images (N,3,H,W) in
[0,255], resizes to 299x299 internally and returns (N,2048) pool3 features. Samples in [-1,1] are
quantised exactly as those references do: uint8(clamp(x * 127.5 + 128, 0, 255)).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from progdistill.errors import UserError
from progdistill.eval.metrics import GaussianAccumulator, frechet_distance, gaussian_stats

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/"
                 "files/metrics/inception-2015-12-05.pt")
INCEPTION_ENV = "PROGDISTILL_INCEPTION"
FEATURE_DIM = 2048


def default_inception_path() -> Path:
    """The cache location ~/.cache/progdistill/inception-2015-12-05.pt."""
    return Path.home() / ".cache" / "progdistill" / INCEPTION_FILENAME


def _atomic_write(dest: Path, write: Callable) -> None:
    """Call write(file_object) on a temp file beside dest, then os.replace it onto dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_inception(dest: str | os.PathLike, url: str = INCEPTION_URL, timeout: float = 60.0) -> Path:
    """Download the detector from url to dest atomically; network errors propagate."""
    dest = Path(dest)

    def write(f) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            while chunk := r.read(1 << 20):
                f.write(chunk)

    _atomic_write(dest, write)
    return dest


def _jit_load(path: Path, device) -> torch.jit.ScriptModule:
    """torch.jit.load with a one-line UserError for a broken or foreign file."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the reference's format
            warnings.filterwarnings("ignore", r".*torch\.jit", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:
        raise UserError(f"{path} is not a loadable TorchScript Inception detector ({type(e).__name__}); "
                        f"replace it with {INCEPTION_URL}") from None


def load_inception(path: str | os.PathLike | None = None, *, allow_download: bool = True,
                   device="cpu", cache_path: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
    """Load the detector from: path, else $PROGDISTILL_INCEPTION, else the cache file, else download it.

    cache_path overrides default_inception_path() (where a download is stored). Every failure is a
    one-line UserError saying which file is needed, where to get it and where to put it.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"Inception detector not found at {p}; download {INCEPTION_URL} "
                            "there or pass the right --inception path")
        return _jit_load(p, device)
    env = os.environ.get(INCEPTION_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise UserError(f"${INCEPTION_ENV}={env} does not exist; download {INCEPTION_URL} "
                            f"there or unset {INCEPTION_ENV}")
        return _jit_load(p, device)
    cache = Path(cache_path).expanduser() if cache_path is not None else default_inception_path()
    if cache.is_file():
        return _jit_load(cache, device)
    hint = (f"download {INCEPTION_URL} and put it at {cache}, "
            f"or point ${INCEPTION_ENV} or --inception at the file")
    if not allow_download:
        raise UserError(f"Inception detector {INCEPTION_FILENAME} not found (downloads disabled); {hint}")
    try:
        download_inception(cache)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download Inception detector {INCEPTION_FILENAME} ({reason}); "
                        f"{hint}") from None
    return _jit_load(cache, device)


def _module_device(detector) -> torch.device:
    """Device of the detector's first parameter or buffer (CPU if it has none)."""
    for get in ("parameters", "buffers"):
        try:
            return next(iter(getattr(detector, get)())).device
        except (AttributeError, StopIteration, TypeError):
            continue
    return torch.device("cpu")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] floats -> uint8 levels in [0,255] as StyleGAN/EDM do: uint8(clamp(x*127.5 + 128, 0, 255))."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def inception_features(images, detector, batch_size: int = 200, device=None) -> np.ndarray:
    """Pool3 features (N, 2048) float32 of images (N,C,H,W) in [-1,1], C in {1,3}, batch by batch."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"FID expects images (N,C,H,W) with C in {{1,3}}; got {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise UserError("FID: images contain NaN or inf; the sampler diverged")
    dev = torch.device(device) if device is not None else _module_device(detector)
    out = []
    for i in range(0, x.shape[0], batch_size):
        b = to_uint8(x[i:i + batch_size].to(dev))
        if b.shape[1] == 1:
            b = b.repeat(1, 3, 1, 1)
        f = detector(b, return_features=True)
        out.append(f.reshape(f.shape[0], -1).float().cpu())
    if not out:
        raise UserError("FID: no images given")
    return torch.cat(out).numpy()


def fid_from_features(f_gen, mu_ref, sigma_ref) -> float:
    """FID = frechet_distance(gaussian_stats(f_gen), (mu_ref, sigma_ref))."""
    return frechet_distance(*gaussian_stats(f_gen), mu_ref, sigma_ref)


def fid_from_images(images, detector, mu_ref, sigma_ref, batch_size: int = 200) -> float:
    """FID of images (N,C,H,W) in [-1,1] against reference stats."""
    return fid_from_features(inception_features(images, detector, batch_size), mu_ref, sigma_ref)


STATS_FORMAT = 1   # bump when features or their quantisation change: every cached reference is recomputed


def detector_hash(detector) -> str:
    """sha256 of a detector's class and tensors (names, shapes, dtypes, bytes): another file, another hash."""
    h = hashlib.sha256(type(detector).__name__.encode())
    for name, t in sorted(detector.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def content_fingerprint(path: Path) -> str:
    """sha256 of every file under `path` (or of the file): relative name, size and modification time.

    Stat only, so a million-image folder costs a directory walk, not a read; a copy made without
    keeping times gets a new fingerprint (the statistics are recomputed, never stale)."""
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_key(spec: str, *, split: str, resolution: int | None, channels: int | None, count: int | None,
                  detector) -> tuple[str, str]:
    """(file name, key) of a data set's cached reference statistics.

    The key is JSON of what the statistics depend on: the spec with its path resolved, resolution,
    channels, split, reference count (None: the whole split), the detector's hash and a content
    fingerprint of the path; the name is a readable prefix plus a hash of the key, so `folder:/d/a_b`
    and `folder:/d/a/b` (or one folder after its files changed) never share a file.
    """
    scheme, sep, arg = spec.partition(":")
    resolved, fingerprint = spec, "built-in"
    if sep and scheme != "toy" and arg:
        path = Path(arg).expanduser().resolve()
        resolved, fingerprint = f"{scheme}:{path}", content_fingerprint(path)
    key = json.dumps({"format": STATS_FORMAT, "data": resolved, "split": split, "resolution": resolution,
                      "channels": channels, "count": count, "detector": detector_hash(detector),
                      "content": fingerprint}, sort_keys=True)
    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", f"{scheme if sep else spec}-{split}")[:48]
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:20]}", key


def feature_stats(chunks: Iterable[torch.Tensor], detector, batch_size: int = 200) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the pool3 features of image chunks (a streamed split), never holding them all."""
    acc = GaussianAccumulator()
    for x in chunks:
        acc.add(inception_features(x, detector, batch_size))
    if acc.n == 0:
        raise UserError("FID: no images given")
    return (*acc.stats(), acc.n)


def reference_stats(name: str, images_fn: Callable[[], torch.Tensor | Iterable[torch.Tensor]], detector,
                    cache_dir: str | os.PathLike, batch_size: int = 200, key: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the Inception features of images_fn(), cached as cache_dir/<name>.npz (mu, sigma, n, key).

    images_fn is only called when the cache file is missing, or holds another `key` (see `reference_key`),
    and gives the images, or an iterable of image chunks (read from disk one at a time); the file is
    written atomically.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"reference stats name {name!r} must be letters, digits, '.', '_' or '-'")
    path = Path(cache_dir) / f"{name}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                if key is None or ("key" in z.files and str(z["key"]) == key):
                    return z["mu"], z["sigma"]
        except Exception as e:
            raise UserError(f"cannot read reference stats {path} ({type(e).__name__}); "
                            "delete it to recompute") from None
    images = images_fn()
    if isinstance(images, torch.Tensor):
        feats = inception_features(images, detector, batch_size)
        (mu, sigma), n = gaussian_stats(feats), feats.shape[0]
    else:
        mu, sigma, n = feature_stats(images, detector, batch_size)
    extra = {} if key is None else {"key": np.array(key)}
    _atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=np.int64(n), **extra))
    return mu, sigma
