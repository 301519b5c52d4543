"""issue 15, items 7 and 8: `diffusers:a/b` is local when `a` exists here (a typo is "not found", never a hub
download), and zero terminal SNR is read from `rescale_betas_zero_snr` (or an exact 0), not from the value the
saving scheduler class keeps in its last alphas_cumprod entry."""

from __future__ import annotations

import json

import pytest
import torch

from progdistill.errors import UserError
from progdistill.store.diffusers_reader import schedule_from_scheduler
from progdistill.store.load import load_card

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def tiny_pipeline(folder, **sched_kw):
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=8)
    DDPMPipeline(unet=net, scheduler=DDPMScheduler(**sched_kw)).save_pretrained(folder)
    return folder


def one_line(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- item 7: local path or hub id
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """snapshot_download recorded: offline (raises) unless a folder is given to return."""
    import huggingface_hub

    calls: list[str] = []

    def fake(repo_id, **kw):
        calls.append(repo_id)
        if fake.folder is None:
            raise OSError("network unreachable")
        return str(fake.folder)

    fake.folder = None
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    fake.calls = calls
    return fake


def test_mistyped_local_path_is_not_found_and_never_sent_to_the_hub(hub, tmp_path):
    tiny_pipeline(tmp_path / "runs" / "ddpm-digits", prediction_type="v_prediction")
    hub.folder = tmp_path / "runs" / "ddpm-digits"        # even online, the typo is not a repo id
    msg = one_line(lambda: load_card("diffusers:runs/ddpm-digtis"))
    assert "runs/ddpm-digtis not found" in msg and "download" not in msg and "offline" not in msg
    assert hub.calls == []
    assert load_card("diffusers:runs/ddpm-digits").param == "v"            # the right path loads
    # ~ is expanded before the first component is looked up
    msg = one_line(lambda: load_card(f"diffusers:~/{tmp_path.name}-nowhere/x"))
    assert "not found" in msg and hub.calls == []


def test_hub_id_failure_names_both_readings(hub):
    msg = one_line(lambda: load_card("diffusers:someone/tiny-ddpm"))
    assert hub.calls == ["someone/tiny-ddpm"]
    assert msg.startswith("could not download someone/tiny-ddpm (offline?)")
    assert "no local folder" in msg and "someone not found" in msg and "diffusers:DIR" in msg


def test_hub_id_is_tried_when_its_first_component_is_not_here(hub, tmp_path):
    hub.folder = tiny_pipeline(tmp_path / "cache" / "snap", prediction_type="sample")
    assert load_card("diffusers:someone/tiny-ddpm").param == "x" and hub.calls == ["someone/tiny-ddpm"]


# ---------------------------------------------------------------- item 8: zero terminal SNR by flag
def scheduler_folder(tmp_path, name, **cfg):
    folder = tmp_path / f"{name}-{'-'.join(f'{k}{v}' for k, v in sorted(cfg.items()))}"
    getattr(diffusers, name)(**cfg).save_config(folder / "scheduler")
    return folder


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
def test_rescaled_zero_snr_imports_like_ddim_whatever_class_saved_it(tmp_path, cls, betas):
    kw = dict(beta_schedule=betas, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ddim, _, _, _ = schedule_from_scheduler(scheduler_folder(tmp_path, "DDIMScheduler", **kw))
    other, param, _, _ = schedule_from_scheduler(scheduler_folder(tmp_path, cls, **kw))
    assert ddim.zero_terminal_snr and other.zero_terminal_snr and param == "v"
    assert other.betas == ddim.betas
    # an eps teacher on it is refused in one line, as for a DDIM/DDPM zero-terminal-SNR config
    eps = scheduler_folder(tmp_path, cls, **{**kw, "prediction_type": "epsilon"})
    msg = one_line(lambda: schedule_from_scheduler(eps))
    assert "zero-terminal-SNR" in msg and "cannot give x at t = 1" in msg


def test_exact_zero_is_zero_terminal_and_plain_cosine_is_not(tmp_path):
    plain, _, _, _ = schedule_from_scheduler(scheduler_folder(tmp_path, "DDPMScheduler",
                                                              beta_schedule="squaredcos_cap_v2"))
    assert not plain.zero_terminal_snr and 0 < plain.betas[-1] < 1   # last abar 2.4e-9: below 2^-24, yet not zero
    # an eps teacher on it stays importable
    eps = scheduler_folder(tmp_path, "EulerDiscreteScheduler", beta_schedule="squaredcos_cap_v2",
                           prediction_type="epsilon")
    assert not schedule_from_scheduler(eps)[0].zero_terminal_snr
    # a class that stores the exact 0 without the flag in its config: zero terminal SNR
    folder = scheduler_folder(tmp_path, "DDIMScheduler", beta_schedule="linear", rescale_betas_zero_snr=True,
                              prediction_type="v_prediction")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rescale_betas_zero_snr")
    cfg["trained_betas"] = DDPMScheduler(beta_schedule="linear", rescale_betas_zero_snr=True).betas.tolist()
    cfg_path.write_text(json.dumps(cfg))
    assert schedule_from_scheduler(folder)[0].zero_terminal_snr
