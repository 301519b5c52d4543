"""A small CNN classifier for 8x8 digits (sklearn load_digits), used as a feature extractor for
digits-scale sample metrics (class entropy/coverage, FD / precision-recall on its features).

Training is deterministic: parameters are initialised under a forked, seeded global RNG and the
minibatch order and augmentation come from an explicit torch.Generator, so the same inputs and
seed give bit-identical weights for a given torch build and CPU (training runs single-threaded).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from progdistill.errors import UserError

FEATURE_DIM = 128
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
    """conv3x3(32) -> conv3x3(64) -> maxpool2 -> fc(128) [features] -> fc(10), on (n,1,8,8) in [-1,1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) activations, with gradients."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (n, 10)."""
        return self.fc2(self._features(x))

    @torch.no_grad()
    def _batched(self, fn, x, batch_size: int) -> torch.Tensor:
        """Apply fn to x in eval mode, batch by batch, on the model's device; result on CPU."""
        x = _as_images(x)
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        try:
            out = [fn(x[i:i + batch_size].to(dev)).cpu() for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0)

    def features(self, x, batch_size: int = 1024) -> torch.Tensor:
        """Penultimate features (n, 128) as a float32 CPU tensor."""
        return self._batched(self._features, x, batch_size)

    def predict(self, x, batch_size: int = 1024) -> torch.Tensor:
        """Predicted labels (n,) as an int64 CPU tensor."""
        return self._batched(lambda b: self(b).argmax(dim=1), x, batch_size)


def _as_images(x) -> torch.Tensor:
    """Float32 tensor (n,1,8,8); accepts (n,64) or (n,8,8) too."""
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.ndim in (2, 3) and x[0].numel() == 64:
        x = x.reshape(-1, 1, 8, 8)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise UserError(f"digits classifier expects images of shape (n,1,8,8); got {tuple(x.shape)}")
    return x


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to max_shift pixels, padding with background (-1)."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(n, 8, 8)
    return pad[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def _train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, batch_size: int,
           lr: float, augment: bool) -> DigitsClassifier:
    """Adam on cross-entropy; fixed init seed and a generator for order/augmentation.

    Runs single-threaded (restored afterwards): the weights then do not depend on the core count,
    and tiny 8x8 convolutions gain little from threads (on busy CI cores 2 threads were 5x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsClassifier()
        return _fit(model, x, y, seed, epochs, batch_size, lr, augment)
    finally:
        torch.set_num_threads(threads)


def _fit(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int,
         batch_size: int, lr: float, augment: bool) -> DigitsClassifier:
    """The training loop proper."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            xb = _shift(x[idx], gen) if augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def train_digits_classifier(x, y, *, seed: int = 0, epochs: int = 20, batch_size: int = 64,
                            lr: float = 2e-3, augment: bool = True,
                            cache_path: str | os.PathLike | None = None) -> DigitsClassifier:
    """Train a DigitsClassifier on images (n,1,8,8) in [-1,1] and labels 0..9, or load cache_path.

    If cache_path exists its safetensors weights are loaded (no training, the other arguments are
    ignored); otherwise the trained weights are written there atomically. Returns an eval-mode
    model on the CPU.
    """
    if cache_path is not None and Path(cache_path).exists():
        return load_digits_classifier(cache_path)
    xt = _as_images(x)
    yt = torch.as_tensor(y, dtype=torch.int64).reshape(-1)
    if yt.shape[0] != xt.shape[0]:
        raise UserError(f"{xt.shape[0]} images but {yt.shape[0]} labels")
    if yt.numel() == 0 or yt.min() < 0 or yt.max() >= NUM_CLASSES:
        raise UserError(f"labels must be integers in [0, {NUM_CLASSES})")
    model = _train(xt, yt, seed, epochs, batch_size, lr, augment)
    if cache_path is not None:
        save_digits_classifier(model, cache_path)
    return model


def save_digits_classifier(model: DigitsClassifier, path: str | os.PathLike) -> None:
    """Write the weights as safetensors, atomically (temp file in the same folder + os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_digits_classifier(path: str | os.PathLike) -> DigitsClassifier:
    """Load weights written by save_digits_classifier into a fresh eval-mode model."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
            model = DigitsClassifier()
        model.load_state_dict(state)
    except Exception as e:  # corrupt/foreign file: say which and how to fix
        raise UserError(f"cannot load digits classifier from {path} ({type(e).__name__}); "
                        "delete the file to retrain") from None
    return model.eval()
