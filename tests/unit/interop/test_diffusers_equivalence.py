"""diffusers' own schedulers reproduce our samplers on a tiny random UNet2DModel (method.md §8).

Our side: `Denoiser(unet, schedule=Schedule(), param=...)` driven by `sample_ddim` / `sample_dpmpp_2m`,
which feed the UNet tau = 1024 t - 1. diffusers' side: the standard loop
`for t in scheduler.timesteps: z = scheduler.step(unet(z, t).sample, t, z).prev_sample` with the
scheduler built from `schedule.diffusers_betas()`.
"""

from __future__ import annotations

import pytest
import torch

from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.sampling import sample_ddim, sample_dpmpp_2m, time_grid
from progdistill.diffusion.schedules import Schedule, linear_betas

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

SCHED = Schedule()
PREDICTION_TYPE = {"v": "v_prediction", "x": "sample"}
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
TOL = 1e-5  # max abs; both sides run the UNet in float32 and agree to ~2e-6


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=8)
    return net.eval()


@pytest.fixture(scope="module")
def z1():
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def ddim_scheduler(param: str, clip: bool) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1024, trained_betas=SCHED.diffusers_betas(), timestep_spacing="trailing",
                         set_alpha_to_one=True, steps_offset=0, prediction_type=PREDICTION_TYPE[param],
                         clip_sample=clip, clip_sample_range=1.0)


def dpm_scheduler(param: str) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(num_train_timesteps=1024, trained_betas=SCHED.diffusers_betas(),
                                       algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                       timestep_spacing="trailing", prediction_type=PREDICTION_TYPE[param],
                                       final_sigmas_type="zero", lower_order_final=True)


@torch.no_grad()
def diffusers_loop(unet, scheduler, z1, n, **step_kwargs):
    scheduler.set_timesteps(n)
    z = z1.clone()
    for t in scheduler.timesteps:
        z = scheduler.step(unet(z, t).sample, t, z, **step_kwargs).prev_sample
    return z


def test_trailing_timesteps_are_our_grid():
    """diffusers' trailing timesteps are our tau(t_i) = 1024 i/N - 1, i = N..1, for every N dividing 1024."""
    for k in range(11):
        n = 2**k
        tau = SCHED.time_input(SCHED.logsnr(time_grid(n)[:-1]))
        assert torch.equal(tau, tau.round())  # whole timesteps
        for sched in (ddim_scheduler("v", False), dpm_scheduler("v")):
            sched.set_timesteps(n)
            assert sched.timesteps.tolist() == tau.long().tolist(), n
    sched = ddim_scheduler("v", False)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [1023, 767, 511, 255]
    assert torch.equal(SCHED.time_input(SCHED.logsnr(time_grid(4)[:-1])), torch.tensor([1023.0, 767.0, 511.0, 255.0]))
    # ... and diffusers' alpha at timestep j is ours at t = (j + 1) / 1024; the last step goes to alpha = 1
    j = torch.tensor([1023, 767, 511, 255])
    ours = torch.sigmoid(SCHED.logsnr((j + 1).double() / 1024))
    assert (sched.alphas_cumprod[j].double() - ours).abs().max().item() < 5e-7


def test_v_parameterization_sees_a_nontrivial_unet(unet, z1):
    """Guard against a vacuous comparison: the UNet's output depends on both z and the timestep."""
    with torch.no_grad():
        a, b = unet(z1, torch.tensor(1023)).sample, unet(z1, torch.tensor(255)).sample
        c = unet(2 * z1, torch.tensor(255)).sample
    assert a.std().item() > 0.1
    assert (a - b).abs().max().item() > 1e-2 and (b - c).abs().max().item() > 1e-2


@pytest.mark.parametrize("param", ["v", "x"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_ddim_matches_diffusers(unet, z1, param, n):
    ref = diffusers_loop(unet, ddim_scheduler(param, clip=False), z1, n)
    ours = sample_ddim(Denoiser(unet, schedule=SCHED, param=param), z1, schedule=SCHED, num_steps=n, clip=False)
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("param", ["v", "x"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ddim_clipped_matches_diffusers(unet, z1, param, n):
    """Our clip=True is clip_sample=True *with* use_clipped_model_output=True (eps recomputed from the clipped x)."""
    den = Denoiser(unet, schedule=SCHED, param=param)
    ours = sample_ddim(den, z1, schedule=SCHED, num_steps=n, clip=True)
    ref = diffusers_loop(unet, ddim_scheduler(param, clip=True), z1, n, use_clipped_model_output=True)
    assert (ours - ref).abs().max().item() < TOL
    assert ours.abs().max().item() <= 1.0
    # clipping is active here (the comparison is not the unclipped one in disguise) ...
    unclipped = sample_ddim(den, z1, schedule=SCHED, num_steps=n, clip=False)
    assert (ours - unclipped).abs().max().item() > 1e-2
    # ... and without use_clipped_model_output diffusers keeps the unclipped eps: a different sampler
    # (from N = 4 on: at t = 1, alpha = 4.5e-5, so clipping x barely moves eps = (z - alpha x) / sigma)
    if n >= 4:
        other = diffusers_loop(unet, ddim_scheduler(param, clip=True), z1, n, use_clipped_model_output=False)
        assert (ours - other).abs().max().item() > 1e-3


@pytest.mark.parametrize("param", ["v", "x"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_dpmpp_2m_matches_diffusers(unet, z1, param, n):
    """DPM-Solver++(2M), midpoint, data prediction. Both start first order, use the same trailing grid, treat
    t = 0 as sigma = 0 and therefore make the final step first order (diffusers forces this for
    final_sigmas_type="zero" at every N; with N >= 15 the final step is not covered by lower_order_final).

    diffusers keeps alphas_cumprod in float32, so its logSNR near t = 0 carries ~1e-4 of cancellation error
    (1 - abar ~ 1e-3 there); with N >= 32 that moves the x-parameterized result by ~5e-5. For those N we hand
    the scheduler the float64 alphas_cumprod of the same betas (the exact abar((j+1)/T) of our schedule) so
    that the comparison stays at float32 round-off; the stock scheduler is checked at a looser tolerance.
    """
    den = Denoiser(unet, schedule=SCHED, param=param)
    ours = sample_dpmpp_2m(den, z1, schedule=SCHED, num_steps=n, clip=False)
    stock = diffusers_loop(unet, dpm_scheduler(param), z1, n)
    if n < 32:
        assert (ours - stock).abs().max().item() < TOL
        return
    assert (ours - stock).abs().max().item() < 2e-4
    sched = dpm_scheduler(param)
    j = torch.arange(1024, dtype=torch.float64)
    sched.alphas_cumprod = torch.sigmoid(SCHED.logsnr((j + 1) / 1024))
    exact = diffusers_loop(unet, sched, z1, n)
    assert (ours - exact).abs().max().item() < TOL


def test_dpmpp_2m_is_not_ddim(unet, z1):
    """The 2M comparison above is not vacuous: at N = 8 the second-order steps differ from DDIM."""
    den = Denoiser(unet, schedule=SCHED, param="v")
    a = sample_dpmpp_2m(den, z1, schedule=SCHED, num_steps=8, clip=False)
    b = sample_ddim(den, z1, schedule=SCHED, num_steps=8, clip=False)
    assert (a - b).abs().max().item() > 1e-2


@pytest.mark.parametrize("param", ["v", "x"])
@pytest.mark.parametrize("n", [1, 2, 4, 16, 64, 256])
def test_dpmpp_2m_on_whole_timesteps_matches_diffusers_for_a_1000_step_table(unet, z1, param, n):
    """An imported T = 1000 linear table samples on k_i / T (docs/method.md §10): DPM-Solver++(2M) equals
    diffusers' trailing DPMSolverMultistepScheduler also where N does not divide T (16, 64, 256).
    diffusers gets the float64 alphas_cumprod of the same betas (see above: its float32 table alone
    costs ~1e-4 near t = 0)."""
    table = Schedule(kind="discrete", betas=linear_betas(1000), grid="timesteps")
    den = Denoiser(unet, schedule=table, param=param)
    ours = sample_dpmpp_2m(den, z1, schedule=table, num_steps=n, clip=False)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=list(table.betas),
                                        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                        timestep_spacing="trailing", prediction_type=PREDICTION_TYPE[param],
                                        final_sigmas_type="zero", lower_order_final=True)
    sched.alphas_cumprod = torch.cumprod(1.0 - torch.tensor(table.betas, dtype=torch.float64), 0)
    assert (ours - diffusers_loop(unet, sched, z1, n)).abs().max().item() < TOL
