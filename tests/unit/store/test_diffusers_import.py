"""`diffusers:PATH` teachers: import of small random-init pipelines, and progdistill's N-step DDIM equal to
diffusers' DDIMScheduler run by hand on the same UNet (issue 7, items 1 and 2; method.md §8).

diffusers' side: `DDIMScheduler.from_config(teacher scheduler config, timestep_spacing="trailing",
set_alpha_to_one=True, steps_offset=0)`, then `for t in timesteps: z = step(unet(z, t).sample, t, z, eta=0,
use_clipped_model_output=True).prev_sample`. Our side: `sample_ddim` on the imported Denoiser with the card's clip.
Both run the UNet in float32; the budget is 1e-4 (measured: at most 1.1e-5, mostly ~1e-6).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.sampling import sample_ddim, time_grid
from progdistill.errors import UserError
from progdistill.store.card import ModelCard, num_classes
from progdistill.store.folders import build_network_from_card
from progdistill.store.load import load_card, load_denoiser

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
TOL = 1e-4
PARAM = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=num_class_embeds).eval()


def make_pipeline(folder, *, num_class_embeds=None, pipeline=DDPMPipeline, scheduler=DDPMScheduler, **sched_kw):
    """A random-init UNet2DModel saved with its scheduler as a pipeline folder; returns (folder, unet, scheduler)."""
    net = tiny_unet(num_class_embeds)
    sched = scheduler(**sched_kw)
    pipeline(unet=net, scheduler=sched).save_pretrained(folder)
    return folder, net, sched


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def z1():
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class Recorder:
    """Wraps a denoiser and counts x_pred elements inside [-r, r] (not clipped) before the sampler clips."""

    def __init__(self, den, r: float = 1.0):
        self.den, self.r, self.inside, self.total = den, r, 0, 0

    def __call__(self, z, logsnr, y):
        x = self.den(z, logsnr, y)
        self.inside += int((x.abs() <= self.r).sum())
        self.total += x.numel()
        return x

    @property
    def unclipped_share(self) -> float:
        return self.inside / self.total


@torch.no_grad()
def diffusers_ddim(unet, teacher_sched, z1, n, class_labels=None, **overrides):
    sched = DDIMScheduler.from_config(teacher_sched.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                      steps_offset=0, **overrides)
    sched.set_timesteps(n)
    z = z1.clone()
    for t in sched.timesteps:
        out = unet(z, t, class_labels=class_labels).sample
        z = sched.step(out, t, z, eta=0.0, use_clipped_model_output=True).prev_sample
    return z


def ours_ddim(den, card, z1, n, class_labels=None, **kw):
    rec = Recorder(den, card.clip_range)
    kw = {"clip": card.clip, "clip_range": card.clip_range, **kw}
    return sample_ddim(rec, z1, schedule=card.schedule, num_steps=n, class_labels=class_labels, **kw), rec


# ---------------------------------------------------------------- import sweep


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_import_sweep(tmp_path, z1, beta_schedule, prediction_type):
    folder, net, sched = make_pipeline(tmp_path, beta_schedule=beta_schedule, prediction_type=prediction_type)
    den, card = load_denoiser(f"diffusers:{folder}")
    assert card.param == PARAM[prediction_type] and card.kind == "teacher" and card.model is None
    assert card.clip is True and card.clip_range == 1.0     # DDPMScheduler's defaults
    assert card.data["shape"] == [1, 8, 8] and card.data["kind"] == "image" and num_classes(card) == 0
    assert card.source == f"diffusers:{folder}" and card.provenance["num_train_timesteps"] == 1000
    assert card.provenance["scheduler"] == "DDPMScheduler" and card.network["class_name"] == "UNet2DModel"
    # the table is diffusers' own: abar_j = alphas_cumprod[j] at t = (j + 1) / T, tau = j
    knots = torch.arange(1, 1001, dtype=torch.float64) / 1000
    abar = torch.sigmoid(card.schedule.logsnr(knots))
    assert (abar / sched.alphas_cumprod.double() - 1).abs().max().item() < 1e-12
    assert torch.equal(card.schedule.time_input(card.schedule.logsnr(knots)), torch.arange(1000.0))
    assert card == load_card(f"diffusers:{folder}")
    for n in (1, 4):
        ours, _ = ours_ddim(den, card, z1, n)
        assert (ours - diffusers_ddim(net, sched, z1, n)).abs().max().item() < TOL, n


def test_card_of_an_imported_teacher_round_trips_and_rebuilds_the_unet(tmp_path):
    folder, net, _ = make_pipeline(tmp_path, prediction_type="v_prediction", clip_sample=False, clip_sample_range=2.0)
    den, card = load_denoiser(f"diffusers:{folder}")
    assert card.clip is False and card.clip_range == 2.0 and card.weights == "unet"
    back = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert back == card
    rebuilt = build_network_from_card(back)
    rebuilt.load_state_dict(net.state_dict())   # same architecture, strict
    assert sorted(rebuilt.state_dict()) == sorted(den.net.state_dict())


def test_folder_with_unet_and_scheduler_subfolders_and_a_ddim_pipeline(tmp_path, z1):
    net, sched = tiny_unet(), DDPMScheduler(prediction_type="sample")
    net.save_pretrained(tmp_path / "a" / "unet")
    sched.save_pretrained(tmp_path / "a" / "scheduler")
    den, card = load_denoiser(f"diffusers:{tmp_path / 'a'}")
    assert card.param == "x"
    folder, net2, sched2 = make_pipeline(tmp_path / "b", pipeline=DDIMPipeline, scheduler=DDIMScheduler,
                                         prediction_type="v_prediction", clip_sample=False)
    den2, card2 = load_denoiser(f"diffusers:{folder}")
    assert card2.provenance["scheduler"] == "DDIMScheduler" and card2.clip is False
    ours, _ = ours_ddim(den2, card2, z1, 8)
    assert (ours - diffusers_ddim(net2, sched2, z1, 8)).abs().max().item() < TOL


# ---------------------------------------------------------------- DDIM equality for every kind of table (item 2)

# name -> (scheduler kwargs, step counts N dividing T, min unclipped share of x_pred over the run)
TEACHERS = {
    # standard DDPM: a random eps UNet at alpha(1) = 0.0064 clips nearly everything (x ~ 500); the clip path itself
    # is what this one checks. "eps-gentle" (alpha(1) = 0.59) checks eps with about half the predictions unclipped.
    "eps-linear-1000": (dict(prediction_type="epsilon"), (1, 2, 4, 8, 125), 0.0),
    "eps-gentle-1000": (dict(prediction_type="epsilon", beta_end=0.002), (2, 8, 40), 0.3),
    "v-scaled-1000": (dict(prediction_type="v_prediction", beta_schedule="scaled_linear"), (1, 4, 8, 125), 0.3),
    "x-cos-128": (dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2", num_train_timesteps=128),
                  (1, 2, 16, 64), 0.3),
    "v-zerosnr-1000": (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True), (1, 4, 8, 40), 0.3),
    "x-zerosnr-200": (dict(prediction_type="sample", rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                           num_train_timesteps=200), (1, 8, 25), 0.3),
    "v-trained-200": (dict(prediction_type="v_prediction", num_train_timesteps=200,
                           trained_betas=[min(0.999, 1e-3 * 1.03**j) for j in range(200)]), (1, 4, 50), 0.3),
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    out = {}
    for name, (kw, _, _) in TEACHERS.items():
        folder, net, sched = make_pipeline(tmp_path_factory.mktemp(name), **kw)
        den, card = load_denoiser(f"diffusers:{folder}")
        out[name] = (den, card, net, sched)
    return out


@pytest.mark.parametrize("name", list(TEACHERS))
def test_ddim_equals_diffusers_ddim(teachers, z1, name):
    den, card, net, sched = teachers[name]
    _, steps, min_share = TEACHERS[name]
    T = card.schedule.num_train_timesteps
    assert card.clip and card.schedule.zero_terminal_snr == bool(sched.config.rescale_betas_zero_snr)
    for n in steps:
        assert T % n == 0
        ours, rec = ours_ddim(den, card, z1, n)
        ref = diffusers_ddim(net, sched, z1, n)
        assert (ours - ref).abs().max().item() < TOL, (name, n)
        # a real share of predictions was not clipped, and clipping did act somewhere (not vacuous either way)
        assert rec.unclipped_share >= min_share, (name, n, rec.unclipped_share)
        assert rec.unclipped_share < 1.0 or n == 1, (name, n)


@pytest.mark.parametrize("name", ["v-scaled-1000", "x-cos-128", "v-zerosnr-1000", "eps-gentle-1000"])
def test_ddim_equals_diffusers_ddim_without_clipping(teachers, z1, name):
    den, card, net, sched = teachers[name]
    for n in TEACHERS[name][1][:3]:
        ours, rec = ours_ddim(den, card, z1, n, clip=False)
        assert (ours - diffusers_ddim(net, sched, z1, n, clip_sample=False)).abs().max().item() < TOL, (name, n)


def test_unclipped_eps_teacher_matches_within_the_float32_error_it_amplifies(teachers, z1):
    """Without clipping an eps teacher's x = (z - sigma eps) / alpha amplifies float32 round-off by 1/alpha(1)
    (~158 for linear betas; here x reaches ~600): the budget is 1e-4 / alpha(1) (measured ~1e-4, i.e. 2e-7 of |x|)."""
    den, card, net, sched = teachers["eps-linear-1000"]
    alpha_1 = math.sqrt(float(sched.alphas_cumprod[-1]))
    assert 150 < 1 / alpha_1 < 170
    for n in (1, 4, 40):
        ours, _ = ours_ddim(den, card, z1, n, clip=False)
        ref = diffusers_ddim(net, sched, z1, n, clip_sample=False)
        assert ours.abs().max().item() > 100          # the amplification is real
        assert (ours - ref).abs().max().item() < TOL / alpha_1, n


def test_a_time_input_off_by_one_breaks_the_equality(teachers, z1):
    """Negative control: feeding the UNet tau + 1 (or a table shifted by one entry) is caught by the comparison."""

    class Shifted(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z, tau, class_labels=None):
            return self.net(z, tau + 1, class_labels=class_labels)

    for name in ("v-scaled-1000", "x-cos-128"):
        den, card, net, sched = teachers[name]
        bad = Denoiser(Shifted(net), schedule=card.schedule, param=card.param)
        ours, _ = ours_ddim(bad, card, z1, 4)
        assert (ours - diffusers_ddim(net, sched, z1, 4)).abs().max().item() > 30 * TOL, name


def test_grid_points_are_diffusers_trailing_timesteps(teachers):
    for name in ("v-scaled-1000", "x-cos-128", "v-zerosnr-1000"):
        _, card, _, sched = teachers[name]
        T = card.schedule.num_train_timesteps
        for n in (d for d in range(1, T + 1) if T % d == 0):
            ddim = DDIMScheduler.from_config(sched.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                             steps_offset=0)
            ddim.set_timesteps(n)
            tau = card.schedule.time_input(card.schedule.logsnr(time_grid(n)[:-1]))
            assert torch.equal(tau, ddim.timesteps.float()), (name, n)


def test_class_conditional_unet(tmp_path, z1):
    folder, net, sched = make_pipeline(tmp_path / "c", num_class_embeds=3, prediction_type="v_prediction")
    den, card = load_denoiser(f"diffusers:{folder}")
    assert card.null_class is False and num_classes(card) == 3 and card.data["num_classes"] == 3
    y = torch.tensor([0, 1, 2, 1])
    ours, _ = ours_ddim(den, card, z1, 4, class_labels=y)
    assert (ours - diffusers_ddim(net, sched, z1, 4, class_labels=y)).abs().max().item() < TOL
    other, _ = ours_ddim(den, card, z1, 4, class_labels=torch.tensor([2, 2, 0, 0]))
    assert (other - ours).abs().max().item() > 1e-3   # the labels reach the UNet
    # progdistill's own exports carry a null row for guidance, marked in progdistill_export.json
    (folder / "progdistill_export.json").write_text(json.dumps({"null_class": True}))
    card = load_card(f"diffusers:{folder}")
    assert card.null_class is True and num_classes(card) == 2 and card.data["num_classes"] == 2


# ---------------------------------------------------------------- errors: one line each


@pytest.fixture
def good(tmp_path):
    return make_pipeline(tmp_path / "good", prediction_type="v_prediction")[0]


def breakers():
    def empty(tmp, good):
        (tmp / "empty").mkdir()
        return tmp / "empty", "expected a diffusers pipeline folder"

    def no_unet_entry(tmp, good):
        edit_json(good / "model_index.json", unet=None)
        d = json.loads((good / "model_index.json").read_text())
        d.pop("unet")
        (good / "model_index.json").write_text(json.dumps(d))
        return good, "no 'unet' and 'scheduler' entries"

    def a_file(tmp, good):
        return good / "model_index.json", "not a folder"

    def condition_unet(tmp, good):
        edit_json(good / "unet" / "config.json", _class_name="UNet2DConditionModel")
        return good, "the unet is a UNet2DConditionModel; only UNet2DModel"

    def latent(tmp, good):
        edit_json(good / "model_index.json", vae=["diffusers", "AutoencoderKL"])
        return good, "latent or text-conditioned pipeline"

    def learned_time(tmp, good):
        edit_json(good / "unet" / "config.json", time_embedding_type="learned")
        return good, "time embedding is 'learned'"

    def fourier_time(tmp, good):
        edit_json(good / "unet" / "config.json", time_embedding_type="fourier")
        return good, "time embedding is 'fourier'"

    def thresholding(tmp, good):
        edit_json(good / "scheduler" / "scheduler_config.json", thresholding=True)
        return good, "dynamic thresholding"

    def eps_zero_snr(tmp, good):
        edit_json(good / "scheduler" / "scheduler_config.json", prediction_type="epsilon", rescale_betas_zero_snr=True)
        return good, "cannot give x at t = 1"

    def bad_prediction(tmp, good):
        edit_json(good / "scheduler" / "scheduler_config.json", prediction_type="flow")
        return good, "prediction_type 'flow' is not supported"

    def missing(tmp, good):
        return tmp / "nowhere" / "x" / "y", "not found"

    return [empty, no_unet_entry, a_file, condition_unet, latent, learned_time, fourier_time, thresholding,
            eps_zero_snr, bad_prediction, missing]


@pytest.mark.parametrize("breaker", breakers(), ids=lambda f: f.__name__)
def test_errors_are_one_line(tmp_path, good, breaker):
    path, expected = breaker(tmp_path, good)
    for load in (load_card, load_denoiser):
        with pytest.raises(UserError) as e:
            load(f"diffusers:{path}")
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hub_id_offline_says_to_download_it(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as e:
        load_card("diffusers:google/ddpm-cifar10-32")
    msg = str(e.value)
    assert msg.startswith("could not download google/ddpm-cifar10-32 (offline?)") and "diffusers:DIR" in msg
    assert "\n" not in msg


def test_hub_id_uses_the_downloaded_snapshot(monkeypatch, tmp_path):
    import huggingface_hub

    folder = make_pipeline(tmp_path / "snap", prediction_type="sample")[0]
    seen = {}

    def fake(repo_id, **kw):
        seen.update(repo_id=repo_id, **kw)
        return str(folder)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    card = load_card("diffusers:someone/tiny-ddpm")
    assert seen["repo_id"] == "someone/tiny-ddpm" and "unet/*" in seen["allow_patterns"]
    assert card.param == "x" and card.source == "diffusers:someone/tiny-ddpm"
    assert card.provenance["path"] == str(folder.resolve())
