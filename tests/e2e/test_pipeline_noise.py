"""Explicit initial noise in the Python API: `Model.sample(noise=z)` / `generate(noise=z)`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.schedules import Schedule
from progdistill.errors import UserError
from progdistill.nets.build import build_network
from progdistill.nets.presets import ModelConfig
from progdistill.pipeline import Model, generate
from progdistill.seeds import PerSampleNoise, sample_seeds
from progdistill.store.card import ModelCard

SHAPE = (1, 8, 8)
ATOL = 1e-5   # the same sample in another batch: CPU kernels differ by ~1e-6 with the batch size


@pytest.fixture(scope="module")
def model() -> Model:
    cfg = ModelConfig(resolution=8, channels=1, block_out_channels=(16, 32), attention_levels=(), norm_num_groups=8)
    torch.manual_seed(0)
    net = build_network(cfg, "v").eval()
    card = ModelCard(model=cfg, param="v", schedule=Schedule(), kind="teacher",
                     data={"spec": "test", "kind": "image", "shape": list(SHAPE), "num_classes": 0})
    return Model(Denoiser(net, schedule=card.schedule, param="v"), card, Path("tiny"), torch.device("cpu"))


def seeded_noise(seed: int, num: int, start: int = 0) -> torch.Tensor:
    return PerSampleNoise(sample_seeds(seed, range(start, start + num)), SHAPE)()


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_noise_reproduces_seeded_sampling(model, sampler):
    """noise=z with z the seeded noise gives the seeded samples; ancestral step noise still follows the seeds."""
    ref = model.sample(num=5, steps=3, seed=7, sampler=sampler, logvar_frac=0.5)
    x = model.sample(steps=3, seed=7, sampler=sampler, logvar_frac=0.5, noise=seeded_noise(7, 5))
    assert x.shape == (5, *SHAPE)
    assert torch.equal(x, ref)   # same batches: bit for bit
    # generate(start=...): row i of the noise is sample start + i
    part = generate(model.denoiser, model.card, steps=3, seed=7, sampler=sampler, logvar_frac=0.5, start=2,
                    noise=seeded_noise(7, 3, start=2))
    torch.testing.assert_close(part, ref[2:], rtol=0, atol=ATOL)


def test_noise_batching_does_not_change_results(model):
    z = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(3))
    a = model.sample(steps=2, noise=z, batch_size=1)
    b = model.sample(steps=2, noise=z, batch_size=500)
    c = model.sample(num=6, steps=2, noise=z, batch_size=4)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    torch.testing.assert_close(c, b, rtol=0, atol=ATOL)
    assert not torch.equal(b, model.sample(num=6, steps=2))   # the seeded noise is another start


def test_ancestral_with_noise_over_several_batches(model):
    """Several batches slice the given noise; per-step noise stays keyed to (seed, k)."""
    z = seeded_noise(4, 5)
    ref = model.sample(num=5, steps=3, seed=4, sampler="ancestral", logvar_frac=1.0, batch_size=2)
    x = model.sample(steps=3, seed=4, sampler="ancestral", logvar_frac=1.0, noise=z, batch_size=2)
    assert torch.equal(x, ref)
    one = model.sample(steps=3, seed=4, sampler="ancestral", logvar_frac=1.0, noise=z, batch_size=500)
    torch.testing.assert_close(one, ref, rtol=0, atol=ATOL)


def test_noise_errors_are_one_line(model):
    z = torch.randn(4, *SHAPE)
    with pytest.raises(UserError, match=r"noise must have shape \(num, 1, 8, 8\) for this model, got \(4, 8, 8\)") as e:
        model.sample(steps=1, noise=z[:, 0])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"got \(4, 2, 8, 8\)"):
        model.sample(steps=1, noise=torch.randn(4, 2, 8, 8))
    with pytest.raises(UserError, match="num=3 but noise holds 4 samples") as e:
        model.sample(num=3, steps=1, noise=z)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 0.5])
def test_seed_out_of_range_is_one_line(model, seed):
    """issue 15, item 9: `--seed -1` used to end in a traceback from numpy's SeedSequence."""
    for call in (lambda: model.sample(num=2, steps=2, seed=seed),
                 lambda: generate(model.denoiser, model.card, steps=2, num=2, seed=seed)):
        with pytest.raises(UserError) as e:
            call()
        assert "seed" in str(e.value) and "[0, 2^32)" in str(e.value) and "\n" not in str(e.value)
    assert model.sample(num=1, steps=1, seed=2 ** 32 - 1).shape == (1, *SHAPE)
