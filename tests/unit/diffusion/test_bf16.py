"""Under bf16 autocast only the network runs in bf16: the conversion raw output -> x_pred, the schedule
and the weighted loss stay float32 (the choice benchmarks/bf16_error.py measured), with a negative
control showing what a bf16 conversion would cost."""

import pytest
import torch
from torch import nn

from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.losses import weighted_x_loss
from progdistill.diffusion.parameterization import x_pred_from_output
from progdistill.diffusion.schedules import Schedule, alpha_sigma
from progdistill.train.teacher import diffusion_loss


class LinearNet(nn.Module):
    """A network autocast runs in bf16 (a Linear): vectors (B, 2) -> (B, 2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)

    def forward(self, sample, timestep, class_labels=None):
        return self.lin(torch.cat([sample, timestep[:, None].to(sample.dtype) / 1000], dim=1))


def _examples(n=512):
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0.01, 0.995, n, dtype=torch.float64)      # up to alpha ~ 8e-3 (sigma / alpha ~ 130)
    return torch.randn(n, 2, generator=g).clamp(-2, 2), torch.randn(n, 2, generator=g), t


def _rel(a, b):
    return float(((a.double() - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max())


@pytest.mark.parametrize("param", ["eps", "x", "v"])
@torch.no_grad()
def test_conversion_and_loss_run_in_float32_under_bf16_autocast(param):
    den = Denoiser(LinearNet(), schedule=Schedule(), param=param)
    x, eps, t = _examples()
    logsnr64 = den.schedule.logsnr(t)
    alpha, sigma = alpha_sigma(logsnr64.float()[:, None])
    z = alpha * x + sigma * eps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = den.raw_output(z, logsnr64)
        x_pred = den(z, logsnr64)
        loss = weighted_x_loss(x, x_pred, logsnr64.float(), "snr_trunc")
    assert raw.dtype == torch.bfloat16 and x_pred.dtype == torch.float32 and loss.dtype == torch.float32
    # the float64 conversion of the very same bf16 output: x_pred may differ by float32 rounding only
    a64, s64 = alpha_sigma(logsnr64[:, None])
    ref = x_pred_from_output(param, raw.double(), z.double(), a64, s64)
    assert _rel(x_pred, ref) < 1e-5
    ref_loss = torch.clamp(torch.exp(logsnr64), min=1.0) * ((x.double() - ref) ** 2).mean(dim=1)
    assert float(((loss.double() - ref_loss).abs() / ref_loss).max()) < 1e-4
    # negative control: the same maths in bf16 misses those bounds by orders of magnitude (x: no conversion,
    # but the loss)
    bf = torch.bfloat16
    in_bf16 = x_pred_from_output(param, raw, z.to(bf), alpha.to(bf), sigma.to(bf))
    loss_bf16 = torch.clamp(torch.exp(logsnr64.to(bf)), min=1.0) * ((x.to(bf) - in_bf16) ** 2).mean(dim=1)
    assert float(((loss_bf16.double() - ref_loss).abs() / ref_loss).max()) > 1e-3
    if param != "x":
        assert _rel(in_bf16, ref) > 1e-3


@torch.no_grad()
def test_training_loss_under_autocast_equals_float64_from_the_bf16_output():
    den = Denoiser(LinearNet(), schedule=Schedule(), param="eps")    # eps: the conversion amplifies most
    x, eps, t = _examples(64)
    batch = {"x": x, "t": t, "eps": eps, "y": None}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion_loss(den, batch, slice(None), schedule=den.schedule, weighting="snr_trunc", class_cond=False)
        logsnr64 = den.schedule.logsnr(t)
        alpha, sigma = alpha_sigma(logsnr64.float()[:, None])
        raw = den.raw_output(alpha * x + sigma * eps, logsnr64).double()
    a64, s64 = alpha_sigma(logsnr64[:, None])
    z64 = a64.float().double() * x.double() + s64.float().double() * eps.double()   # z_t as formed in float32
    ref = x_pred_from_output("eps", raw, z64, a64, s64)
    ref_loss = (torch.clamp(torch.exp(logsnr64), min=1.0) * ((x.double() - ref) ** 2).mean(dim=1)).mean()
    assert loss.dtype == torch.float32 and abs(float(loss) - float(ref_loss)) / float(ref_loss) < 1e-4


def test_bf16_runs_with_an_x_or_eps_output_warn_in_one_line(tmp_path, capsys):
    from progdistill.train.config import TrainConfig
    from progdistill.train.optim import warn_bf16
    from progdistill.train.teacher import train

    assert warn_bf16("v", "bf16") is None and warn_bf16("x", "fp32") is None and warn_bf16("both", "bf16") is None
    assert "t > 0.875" in warn_bf16("eps", "bf16")
    capsys.readouterr()
    train(TrainConfig(data="toy:gmm", iters=1, batch_size=16, param="x", precision="bf16"), tmp_path / "t",
          progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "bf16 with an x output" in err[0] and "t < 0.125" in err[0]
