"""`progdistill export`: diffusers' DDIMPipeline on the exported folder equals progdistill's N-step DDIM.

Tiny random UNets written as model folders (no training): a cosine v student, a cosine x teacher
(EMA weights), a class-conditional student, and an imported diffusers DDPM teacher. Each is exported,
loaded with `DiffusionPipeline.from_pretrained`, sampled with the exact call of its README, and
compared with `progdistill.load(...).sample(steps=N, noise=z)` from the pipeline's own initial noise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from progdistill import cli
from progdistill.diffusion.schedules import Schedule
from progdistill.interop.export import META, export_model
from progdistill.nets.build import build_network
from progdistill.nets.presets import ModelConfig
from progdistill.pipeline import load
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, ModelCard
from progdistill.store.folders import save_model_folder

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TOL = 1e-4
SHAPE = (1, 8, 8)
DATA = {"spec": "digits", "kind": "image", "shape": list(SHAPE), "num_classes": 0}


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(resolution=8, channels=1, block_out_channels=(16, 32), attention_levels=(),
                       norm_num_groups=8, **kw)


def tiny_net(cfg: ModelConfig, param: str, seed: int) -> torch.nn.Module:
    """A random network whose outputs are scaled down (conv_out x 0.1), so few predictions get clipped."""
    torch.manual_seed(seed)
    net = build_network(cfg, param)
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.mul_(0.1)
    return net


def write_model(folder: Path, *, param: str, kind: str, steps: int | None = None, num_classes: int = 0,
                seed: int = 0) -> Path:
    cfg = tiny_config(num_classes=num_classes)
    data = dict(DATA, num_classes=num_classes)
    if kind == "student":
        card = ModelCard(model=cfg, param=param, schedule=Schedule(), data=data, iteration=7, kind="student",
                         steps=steps, weights="model",
                         provenance={"teacher": "runs/teacher", "round": 5, "teacher_steps": 2 * steps, "seed": 0})
        save_model_folder(folder, card, {"model": tiny_net(cfg, param, seed)})
    else:
        # the raw weights differ from the EMA ones: the export must carry the EMA weights
        card = ModelCard(model=cfg, param=param, schedule=Schedule(), data=data, iteration=11, kind="teacher",
                         weights="ema", provenance={"preset": "digits", "weighting": "snr_trunc", "seed": 0})
        save_model_folder(folder, card, {"model": tiny_net(cfg, param, seed + 100), "ema": tiny_net(cfg, param, seed)})
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    run = root / "distill"   # a distillation run around the student, with an eval.json
    student = write_model(run / "steps-0004", param="v", kind="student", steps=4)
    write_json(run / CARD, {"kind": "distillation", "teacher": "runs/teacher", "start_steps": 16, "final_steps": 4,
                            "student_param": "v", "latest": "steps-0004",
                            "rounds": [{"round": 0, "steps": 8, "iters": 30, "seconds": 1.5},
                                       {"round": 1, "steps": 4, "iters": 30, "seconds": 1.5}]})
    write_json(run / "eval.json", [
        {"method": "pd", "steps": 4, "nfe": 4, "num": 100, "seed": 0, "data": "digits", "fd_feature": 1.234},
        {"method": "ddim", "steps": 4, "nfe": 4, "num": 100, "seed": 0, "data": "digits", "fd_feature": 9.876},
        {"method": "ddim", "steps": 8, "nfe": 8, "num": 100, "seed": 0, "data": "digits", "fd_feature": 5.5}])
    return {"run": run, "student": student,
            "teacher": write_model(root / "teacher", param="x", kind="teacher"),
            "cond": write_model(root / "cond", param="v", kind="student", steps=2, num_classes=3),
            "eps_teacher": write_model(root / "eps-teacher", param="eps", kind="teacher", seed=3),
            "root": root}


class ClipCounter:
    """Wraps a denoiser and records the share of x_pred entries that clipping leaves unchanged."""

    def __init__(self, denoiser):
        self.denoiser, self.inside = denoiser, []

    def __call__(self, z, logsnr, class_labels=None):
        x = self.denoiser(z, logsnr, class_labels)
        self.inside.append((x.abs() <= 1).float().mean().item())
        return x


def pipeline_call(out: Path, *, n: int, batch: int, seed: int) -> np.ndarray:
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=n, eta=0.0,
                use_clipped_model_output=True, output_type="np").images


def progdistill_call(model_path, *, n: int, batch: int, seed: int, labels=False) -> tuple[np.ndarray, float]:
    """progdistill's N-step DDIM from the pipeline's own initial noise, as the pipeline outputs it (NHWC [0, 1])."""
    model = load(model_path, device="cpu")
    z = randn_tensor((batch, *model.card.data["shape"]), generator=torch.Generator().manual_seed(seed))
    counter = ClipCounter(model.denoiser)
    model.denoiser = counter
    x = model.sample(steps=n, noise=z)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), float(np.mean(counter.inside))


def readme_code(out: Path) -> str:
    return re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[0]


@pytest.mark.parametrize("name, n", [("student", 4), ("teacher", 8)])
def test_export_equals_progdistill_ddim(models, tmp_path, name, n):
    out = tmp_path / "exported"
    assert cli.main(["export", str(models[name]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", META, "scheduler", "unet"]
    assert not list(tmp_path.glob(".exported*")), "temp folder left behind"
    got = pipeline_call(out, n=n, batch=3, seed=5)
    want, inside = progdistill_call(models[name], n=n, batch=3, seed=5)
    assert inside > 0.5, f"only {inside:.0%} of the predictions are unclipped: the check would be vacuous"
    assert got.shape == (3, 8, 8, 1)
    assert np.abs(got - want).max() <= TOL
    # the README's code is this exact call
    code = readme_code(out)
    assert code.lstrip().startswith("import torch") and f'DiffusionPipeline.from_pretrained("{out}")' in code
    assert "use_clipped_model_output=True" in code and f"num_inference_steps={n if name == 'student' else 64}" in code


def test_export_files_and_readme(models, tmp_path, capsys):
    out = tmp_path / "pd"
    assert cli.main(["export", str(models["run"]), "--out", str(out)]) == 0   # a run: its last round
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: diffusers DDIMPipeline (4-step student, v_prediction") and "\n" not in line
    meta = json.loads((out / META).read_text())
    assert meta == {**meta, "format": 1, "null_class": False, "num_classes": 0, "param": "v", "steps": 4,
                    "kind": "student", "clip": True, "clip_range": 1.0, "source": str(models["student"])}
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["num_train_timesteps"] == 1024
    assert (sched["timestep_spacing"], sched["set_alpha_to_one"], sched["steps_offset"], sched["prediction_type"],
            sched["clip_sample"]) == ("trailing", True, 0, "v_prediction", True)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    text = (out / "README.md").read_text()
    assert text.index("DiffusionPipeline.from_pretrained") < text.index("## What it is")
    assert "use_clipped_model_output=None" in text and "50 steps" in text
    assert "N0 = 16 → N = 4 in 2 halving rounds" in text and "8→4: 30" in text
    assert "| pd | 4 |" in text and "1.234" in text and "9.876" in text and "5.5" not in text  # only N = 4 rows
    # a teacher: EMA weights, and its README lists the N that divide T
    out_t = tmp_path / "teacher"
    export_model(models["teacher"], out_t)
    ema = load(models["teacher"]).denoiser.net.state_dict()
    unet = UNet2DModel.from_pretrained(out_t / "unet").state_dict()
    assert all(torch.equal(ema[k], unet[k]) for k in ema)
    assert "1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024" in (out_t / "README.md").read_text()
    assert json.loads((out_t / META).read_text())["steps"] is None
    # eps exports as "epsilon" (its sampling equality needs a non-random eps net: a random one clips everything
    # at t = 1, so it is checked on imported teachers with clipping off, in the import tests)
    export_model(models["eps_teacher"], tmp_path / "eps")
    sched = json.loads((tmp_path / "eps" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"


def test_export_refuses_existing_folder_unless_forced(models, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", str(models["student"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "--force" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli.main(["export", str(models["student"]), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / META).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["export", str(models["student"]), "--out", str(empty)]) == 0   # an empty folder is fine
    # never over the model itself
    assert cli.main(["export", str(models["student"]), "--out", str(models["run"]), "--force"]) == 2
    assert (models["student"] / CARD).is_file()


@pytest.mark.parametrize("what, message", [
    ("steps3", "diffusers' trailing timestep spacing places N steps exactly only when N divides T = 1024"),
    ("both", "no diffusers prediction_type reads; eps, x and v models export"),
    ("mlp", "vector (MLP) model and diffusers has no pipeline for vectors"),
    ("missing", "not found"),
    ("unfinished_run", "has no finished round yet"),
    ("unfinished_teacher", "stopped before its budget"),
    ("discrete16", "N divides T = 1000"),
])
def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys, what, message):
    src = tmp_path / "model"
    if what == "steps3":
        write_model(src, param="v", kind="student", steps=3)
    elif what == "both":
        write_model(src, param="both", kind="student", steps=4)
    elif what == "mlp":
        cfg = ModelConfig(kind="mlp", channels=2, hidden=16, depth=1, block_out_channels=(), attention_levels=())
        card = ModelCard(model=cfg, param="v", schedule=Schedule(), kind="student", steps=4, weights="model",
                         data={"spec": "toy:moons", "kind": "vector", "shape": [2], "num_classes": 0})
        save_model_folder(src, card, {"model": build_network(cfg, "v")})
    elif what == "unfinished_run":
        write_json(src / CARD, {"kind": "distillation", "teacher": "t", "start_steps": 8, "final_steps": 1,
                                "rounds": [], "latest": None})
    elif what == "unfinished_teacher":
        write_model(src, param="v", kind="teacher")
        write_json(src / "timing.json", {"iters": 3, "finished": False})
    elif what == "discrete16":   # T = 1000 linear betas: a 16-step student is off diffusers' integer grid
        write_model(src, param="v", kind="student", steps=16)
        card = json.loads((src / CARD).read_text())
        card["schedule"] = Schedule(kind="discrete", betas=tuple(np.linspace(1e-4, 0.02, 1000))).to_dict()
        write_json(src / CARD, card)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["export", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written, no temp folder


def test_class_conditional_export_loads_and_readme_loop_matches(models, tmp_path):
    out = tmp_path / "cond"
    res = export_model(models["cond"], out)
    assert res.meta["num_classes"] == 3 and res.meta["null_class"] is True
    pipe = DiffusionPipeline.from_pretrained(out)   # unet + scheduler load
    assert pipe.unet.config.num_class_embeds == 4
    code = readme_code(out)
    assert "class_labels=y" in code and "DiffusionPipeline.from_pretrained" in code
    scope: dict = {}
    exec(code, scope)   # the README's own loop, as a user would paste it
    model = load(models["cond"], device="cpu")
    z = randn_tensor((16, *SHAPE), generator=torch.Generator().manual_seed(0))
    want = (model.sample(steps=2, noise=z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # labels k mod 3
    assert np.abs(scope["images"] - want).max() <= TOL


# ------------------------------------------------------------------------- imported diffusers teachers
def ddpm_folder(folder: Path, prediction_type: str = "epsilon", num_class_embeds: int | None = None) -> Path:
    """A random diffusers DDPM teacher: UNet2DModel + DDPMScheduler, 1000 linear betas."""
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=num_class_embeds)
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.mul_(0.1)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder, safe_serialization=True)
    return folder


def test_imported_teacher_exports_its_own_table(tmp_path):
    src = ddpm_folder(tmp_path / "ddpm", "v_prediction")
    out = tmp_path / "exported"
    assert cli.main(["export", f"diffusers:{src}", "--out", str(out)]) == 0
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    teacher = DDPMScheduler.from_pretrained(src / "scheduler")
    exported = DiffusionPipeline.from_pretrained(out).scheduler
    assert sched["num_train_timesteps"] == 1000
    # the teacher's own table (as imported: float32 round-off of its alphas_cumprod at most)
    assert (torch.tensor(sched["trained_betas"]) - teacher.betas).abs().max().item() <= 2e-7
    assert (exported.alphas_cumprod - teacher.alphas_cumprod).abs().max().item() <= 1e-6
    meta = json.loads((out / META).read_text())
    assert meta["null_class"] is False and meta["source"].startswith("diffusers:")
    assert "1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500, 1000" in (out / "README.md").read_text()
    got = pipeline_call(out, n=10, batch=3, seed=2)
    want, inside = progdistill_call(f"diffusers:{src}", n=10, batch=3, seed=2)
    assert inside > 0.5
    assert np.abs(got - want).max() <= TOL
    # a foreign class-conditional UNet: all its class rows are real classes (no null row)
    src_c = ddpm_folder(tmp_path / "ddpm-cond", "v_prediction", num_class_embeds=3)
    meta = export_model(f"diffusers:{src_c}", tmp_path / "exported-cond").meta
    assert (meta["num_classes"], meta["null_class"]) == (3, False)


def test_round_trip_exported_folder_imports_back(models, tmp_path):
    """progdistill export -> diffusers:DIR samples the same as the run it came from."""
    out = tmp_path / "pd"
    export_model(models["student"], out)
    z = randn_tensor((4, *SHAPE), generator=torch.Generator().manual_seed(9))
    want = load(models["student"], device="cpu").sample(steps=4, noise=z)
    back = load(f"diffusers:{out}", device="cpu")
    assert back.card.param == "v" and back.card.schedule.num_train_timesteps == 1024
    assert (back.sample(steps=4, noise=z) - want).abs().max().item() <= TOL
    out_c = tmp_path / "cond"
    export_model(models["cond"], out_c)
    back_c = load(f"diffusers:{out_c}", device="cpu")
    assert back_c.card.data["num_classes"] == 3   # the null row is told apart through progdistill_export.json
    z = randn_tensor((6, *SHAPE), generator=torch.Generator().manual_seed(3))
    want_c = load(models["cond"], device="cpu").sample(steps=2, noise=z)
    assert (back_c.sample(steps=2, noise=z) - want_c).abs().max().item() <= TOL
