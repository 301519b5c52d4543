"""The vector normaliser: exact affine maps, floors for constant dimensions, card round trip."""

import math

import pytest
import torch

from progdistill.data.normalize import Normalizer, fit_normalizer
from progdistill.errors import UserError


def _data(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([0.01, 5.0, 300.0]) \
        + torch.tensor([1e3, -2.0, 0.5])


def test_standard_gives_zero_mean_unit_variance_and_inverts():
    x = _data()
    nz = fit_normalizer(x, "standard")
    u = nz.encode(x)
    torch.testing.assert_close(u.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(u.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(nz.decode(u), x, atol=1e-9, rtol=1e-12)


def test_minmax_maps_the_range_to_minus_one_one():
    x = _data()
    u = fit_normalizer(x, "minmax").encode(x)
    torch.testing.assert_close(u.min(0).values, -torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(u.max(0).values, torch.ones(3, dtype=torch.float64))


def test_constant_dimension_gets_a_floor_not_a_division_by_zero():
    x = _data()
    x[:, 1] = 7.0
    nz = fit_normalizer(x, "standard")
    u = nz.encode(x)
    assert bool(torch.isfinite(u).all()) and float(u[:, 1].abs().max()) == 0.0
    assert nz.scale[1] > 0
    assert fit_normalizer(torch.full((10, 2), 3.0), "standard").scale == (1.0, 1.0)   # all constant


def test_log_det_is_the_sum_of_log_scales():
    nz = Normalizer("standard", (0.0, 1.0), (2.0, 0.5))
    assert nz.log_det_decode() == pytest.approx(math.log(2.0) + math.log(0.5))


def test_card_round_trip_and_errors():
    nz = fit_normalizer(_data(), "standard")
    assert Normalizer.from_dict(nz.to_dict()) == nz
    assert Normalizer.from_dict(None) is None
    assert fit_normalizer(_data(), "none") is None
    with pytest.raises(UserError, match="normaliser"):
        Normalizer.from_dict({"kind": "standard", "shift": [0.0], "scale": [0.0]})
    with pytest.raises(UserError, match="--normalize"):
        fit_normalizer(_data(), "zscore")
    with pytest.raises(UserError, match="dimensions"):
        nz.encode(torch.zeros(4, 2))
    bad = _data()
    bad[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        fit_normalizer(bad, "standard")
