"""Metric values of a sample set against a reference split: `Scorer(spec, family, metrics, shape)(x)`.

The metric maths lives in metrics.py (pure functions) and fid.py; this module loads the reference
data and the feature networks once and applies them to each sample set.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from progdistill.data.datasets import load_data
from progdistill.data.toy import sample_toy, toy_log_density
from progdistill.errors import UserError
from progdistill.eval import metrics as M
from progdistill.seeds import seed_for


@functools.lru_cache(maxsize=4)
def digits_classifier(cache: Path):
    """The digits classifier, trained only on the 1,297 training digits (deterministic; cached)."""
    from progdistill.eval.classifier import train_digits_classifier
    train = load_data("digits", split="train")
    return train_digits_classifier(train.x, train.y, seed=0, cache_path=cache / "digits-classifier.safetensors")


_ACCURACY_SHOWN: set = set()
REF_CHUNK = 1000   # examples per chunk of a streamed reference split


def _images(ds):
    """A split's images: the tensor when held in memory, else chunks read one at a time."""
    return ds.x if ds.x is not None else ds.batches(REF_CHUNK)


class Scorer:
    """Metric values of a sample set against a reference split (held-out for evaluation, train for tuning).

    `device`: where the Inception detector runs (evaluation passes the model's: features on the GPU)."""

    def __init__(self, spec: str, family: str, metrics: list[str], shape, *, split: str = "heldout", num: int,
                 seed: int, cache: Path, inception=None, allow_download: bool = True, log=print,
                 device: torch.device | str = "cpu"):
        self.spec, self.family, self.metrics = spec, family, [m for m in metrics if m not in ("psnr_teacher", "nll")]
        res, ch = (shape[1], shape[0]) if family == "image" else (None, None)
        if family == "toy":
            ref = (sample_toy(spec, num, torch.Generator().manual_seed(seed_for(seed, 7919))) if split == "heldout"
                   else load_data(spec, split="train", seed=seed).x[:num])
        else:
            try:
                ds = load_data(spec, split=split, resolution=res, channels=ch, reference=True)
            except UserError:
                if split == "train":
                    raise
                log(f"{spec} has no held-out split: scoring against its training split")
                ds = load_data(spec, split="train", resolution=res, channels=ch, reference=True)
            if ds.note:
                log(f"data: {ds.note}")
            ref = ds.x     # None when streamed (prepared:, large folders): statistics are accumulated by chunks
        ref_shape = tuple(ref.shape[1:]) if ref is not None else ds.shape
        if ref_shape != tuple(shape):
            raise UserError(f"--data {spec} has shape {ref_shape} but the model makes {tuple(shape)}")
        self.ref = ref
        if "fd_pixel" in self.metrics:
            if ref is not None:
                self.ref_pixel = M.gaussian_stats(ref.reshape(len(ref), -1))
            else:
                acc = M.GaussianAccumulator()
                for chunk in ds.batches(REF_CHUNK):
                    acc.add(chunk.reshape(len(chunk), -1))
                self.ref_pixel = acc.stats()
        if family == "digits" and {"fd_feature", "precision", "recall", "class_coverage", "class_entropy"} & set(metrics):
            self.clf = digits_classifier(cache)
            self.ref_feat = self.clf.features(ref)
            self.ref_feat_stats = M.gaussian_stats(self.ref_feat)
            if split == "heldout" and cache not in _ACCURACY_SHOWN:
                _ACCURACY_SHOWN.add(cache)
                held = load_data("digits", split="heldout")
                acc = (self.clf.predict(held.x) == held.y).double().mean().item()
                log(f"digits classifier: held-out accuracy {acc:.3f} (trained on the 1,297 training digits)")
        if "fid" in self.metrics:
            from progdistill.eval import fid
            self.detector = fid.load_inception(inception, allow_download=allow_download, device=device)
            fid_split = split if family == "digits" else "train"
            name, key = fid.reference_key(spec, split=fid_split, resolution=res, channels=ch, detector=self.detector,
                                          count=len(ds) if fid_split == split else None)
            self.fid_ref = fid.reference_stats(
                name, lambda: _images(ds if fid_split == split else load_data(spec, split=fid_split, resolution=res,
                                                                              channels=ch, reference=True)), self.detector, cache, key=key)

    def __call__(self, x: torch.Tensor) -> dict:
        m, out = self.metrics, {}
        flat = x.reshape(len(x), -1)
        if "fd_pixel" in m:
            out["fd_pixel"] = M.frechet_distance(*M.gaussian_stats(flat), *self.ref_pixel)
        if hasattr(self, "clf"):
            feats = self.clf.features(x)
            if "fd_feature" in m:
                out["fd_feature"] = M.frechet_distance(*M.gaussian_stats(feats), *self.ref_feat_stats)
            if "precision" in m or "recall" in m:
                p, r = M.precision_recall(self.ref_feat, feats, k=3)
                out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in m})
            pred = self.clf.predict(x)
            if "class_coverage" in m:
                out["class_coverage"] = M.class_coverage(pred, 10)
            if "class_entropy" in m:
                out["class_entropy"] = M.class_entropy(pred, 10)
        if "fid" in m:
            from progdistill.eval.fid import fid_from_features, inception_features
            out["fid"] = fid_from_features(inception_features(x, self.detector), *self.fid_ref)
        if "sw" in m:
            out["sw"] = M.sliced_wasserstein(x, self.ref, seed=0)
        if "energy" in m:
            out["energy"] = M.energy_distance(x, self.ref)
        if "xent_true" in m:
            out["xent_true"] = float(-toy_log_density(self.spec, x.double()).mean())
        return out
