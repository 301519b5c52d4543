"""Import a diffusers pipeline as a teacher: `diffusers:PATH` (docs/method.md §8).

PATH is a local pipeline folder (`model_index.json` with `unet` and `scheduler` entries, e.g. a
saved `DDPMPipeline`), a folder with `unet/` and `scheduler/` subfolders, or a hub id
(`owner/name`, downloaded by huggingface_hub when online). PATH is local when its first component
exists (relative to the working directory, after `~` expansion): `runs/ddpm-digtis` with a `runs/`
folder is a mistyped local path, never sent to the hub; only otherwise is an `owner/name` PATH a hub id. The UNet must be a pixel-space
`UNet2DModel` with a positional (sinusoidal) time embedding, so that it accepts fractional
timesteps. The schedule is read through diffusers itself: the scheduler class named in its
config is instantiated and its `alphas_cumprod` becomes a discrete table, entry j at
t = (j + 1) / T, network time input tau = T t - 1 = j.

Zero terminal SNR: the table ends at abar = 0 exactly when the scheduler config has
`rescale_betas_zero_snr: true` or its last alphas_cumprod is exactly 0, whatever class saved it (DDIM
and DDPM store 0, DPMSolverMultistep and EulerDiscrete 2^-24 for numerical reasons). No threshold on the
value could decide it: plain `squaredcos_cap_v2` at T = 1000 ends at 2.4e-9, below 2^-24.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import torch

from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.schedules import Schedule
from progdistill.errors import UserError
from progdistill.nets.spec import network_spec
from progdistill.store.card import DIFFUSERS_PREFIX, ModelCard

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
EXPORT_META = "progdistill_export.json"   # progdistill's exporter: {"null_class", "guidable", "num_classes", ...}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["model_index.json", "unet/*", "scheduler/*", EXPORT_META]


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({e.__class__.__name__}); is the pipeline folder complete?") from None


def _download(repo_id: str, local: Path) -> Path:
    """diffusers' own route to a hub pipeline (only the unet, the scheduler and their index)."""
    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception:  # offline, unknown repo, gated ...: all end the same way for the user
        raise UserError(f"could not download {repo_id} (offline?) as a hub id, and it is no local folder either "
                        f"({local.parts[0]} not found in {Path.cwd()}): download it elsewhere and pass the local "
                        f"folder as diffusers:DIR, or fix the local path") from None


def _is_local(path: Path) -> bool:
    """A path whose first component exists here is the user's local path (a typo below it, not a hub id)."""
    return path.is_absolute() or not path.parts or Path(path.parts[0]).exists() or Path(path.parts[0]).is_symlink()


def pipeline_folder(spec: str) -> Path:
    """The local folder for `diffusers:PATH`, with `unet/` and `scheduler/` checked to exist."""
    raw = spec[len(DIFFUSERS_PREFIX):] if spec.startswith(DIFFUSERS_PREFIX) else spec
    if not raw:
        raise UserError("diffusers: needs a path, e.g. diffusers:runs/ddpm-digits (a saved DDPMPipeline folder)")
    path = Path(raw).expanduser()
    if not path.exists():
        if HUB_ID.fullmatch(raw) and not _is_local(path):
            path = _download(raw, path)
        else:
            hint = (f" ({path.parts[0]} exists here, so it is a local path, not a hub id)" if HUB_ID.fullmatch(raw)
                    else "")
            raise UserError(f"diffusers pipeline folder {path} not found{hint}; check the path")
    path = path.resolve()
    expected = ("expected a diffusers pipeline folder: model_index.json with 'unet' and 'scheduler' entries "
                "(e.g. a saved DDPMPipeline), or unet/ and scheduler/ subfolders")
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: {expected}")
    index = path / "model_index.json"
    if index.is_file():
        entries = _read_json(index, "pipeline index")
        if "vae" in entries or "text_encoder" in entries:
            raise UserError(f"{path} is a latent or text-conditioned pipeline ({entries.get('_class_name')}): only "
                            f"pixel-space UNet2DModel pipelines (DDPMPipeline, DDIMPipeline) are supported")
        if "unet" not in entries or "scheduler" not in entries:
            raise UserError(f"{path}/model_index.json has no 'unet' and 'scheduler' entries: {expected}")
    for sub, name in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (path / sub / name).is_file():
            raise UserError(f"{path} has no {sub}/{name}: {expected}")
    return path


def _unet_config(path: Path) -> dict:
    """unet/config.json, checked to be a UNet2DModel that takes fractional timesteps, with its defaults filled in."""
    from diffusers import UNet2DModel

    cfg = _read_json(path / "unet" / "config.json", "unet config")
    cls = cfg.get("_class_name")
    if cls != "UNet2DModel":
        raise UserError(f"{path}: the unet is a {cls}; only UNet2DModel (pixel-space, unconditional or "
                        f"class-conditional with num_class_embeds) is supported")
    params = inspect.signature(UNet2DModel.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in cfg.items() if k in full})
    full = {k: (list(v) if isinstance(v, tuple) else v) for k, v in full.items()}
    kind = full["time_embedding_type"]
    if kind == "learned":
        raise UserError(f"{path}: the unet's time embedding is 'learned' (a table of integer timesteps), which cannot "
                        f"take the fractional timesteps distillation needs; not supported")
    if kind != "positional":
        raise UserError(f"{path}: the unet's time embedding is {kind!r} (continuous-sigma models); only 'positional' "
                        f"(DDPM-style integer timesteps) is supported")
    if full["class_embed_type"] is not None:
        raise UserError(f"{path}: class_embed_type {full['class_embed_type']!r} is not supported; class-conditional "
                        f"UNets must use num_class_embeds (an embedding table)")
    if full["out_channels"] != full["in_channels"]:
        raise UserError(f"{path}: the unet has {full['out_channels']} output channels for {full['in_channels']} input "
                        f"channels (learned variance?); only one prediction per channel is supported")
    if full["sample_size"] is None:
        raise UserError(f"{path}: unet/config.json has no sample_size, so the image size is unknown")
    return full


def schedule_from_scheduler(path: Path) -> tuple[Schedule, str, dict, str]:
    """(discrete schedule whose abar equals the scheduler's alphas_cumprod, param, scheduler config, class name)."""
    import diffusers

    cfg = _read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    name = cfg.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"{path}: unknown scheduler class {name!r} in scheduler/scheduler_config.json")
    sched = cls.from_config(cfg)
    conf = dict(sched.config)
    if conf.get("thresholding"):
        raise UserError(f"{path}: the scheduler uses dynamic thresholding (thresholding=True), which progdistill's "
                        f"samplers do not reproduce; not supported")
    ptype = conf.get("prediction_type", "epsilon")
    if ptype not in PREDICTION_TYPES:
        raise UserError(f"{path}: prediction_type {ptype!r} is not supported: use one of {', '.join(PREDICTION_TYPES)}")
    abar = getattr(sched, "alphas_cumprod", None)
    if abar is None:
        raise UserError(f"{path}: scheduler {name} has no alphas_cumprod (not a discrete-time DDPM-family scheduler)")
    abar = torch.as_tensor(abar, dtype=torch.float64).clone()
    if abar.dim() == 1 and len(abar) and (conf.get("rescale_betas_zero_snr") is True or float(abar[-1]) == 0.0):
        abar[-1] = 0.0      # zero terminal SNR, whatever value the saving class keeps there (module docstring)
    # beta_j = 1 - abar_j / abar_{j-1} (abar_{-1} = 1): our float64 cumprod gives diffusers' alphas_cumprod back.
    if abar.dim() != 1 or len(abar) < 3 or not bool((abar[:-1] > 0).all() & (abar[-1] >= 0)
                                                    & (abar[0] < 1) & (abar[1:] < abar[:-1]).all()):
        raise UserError(f"{path}: the scheduler's alphas_cumprod is not a strictly decreasing table in (0, 1) of at "
                        f"least 3 entries; cannot use it as a schedule")
    betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    schedule = Schedule(kind="discrete", betas=tuple(betas.tolist()), grid="timesteps")   # whole timesteps (§10)
    param = PREDICTION_TYPES[ptype]
    if param == "eps" and schedule.zero_terminal_snr:
        raise UserError(f"{path}: an epsilon-prediction teacher with a zero-terminal-SNR schedule cannot give x at "
                        f"t = 1 (alpha = 0, x = (z - sigma eps) / alpha); use a v_prediction or sample model")
    return schedule, param, conf, str(name)


def load_diffusers_card(spec: str) -> ModelCard:
    """The model card of an imported teacher (reads configs only; no weights)."""
    path = pipeline_folder(spec)
    unet = _unet_config(path)
    schedule, param, sconf, sname = schedule_from_scheduler(path)
    size = unet["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    rows = unet["num_class_embeds"] or 0
    meta = _read_json(path / EXPORT_META, "export metadata") if (path / EXPORT_META).is_file() else {}
    null_class = bool(meta.get("null_class", False)) and rows > 0
    n_classes = int(meta.get("num_classes", rows - 1 if null_class else rows))
    data = {"kind": "image", "shape": [unet["in_channels"], h, w], "spec": None, "num_classes": n_classes,
            "class_names": meta.get("class_names")}
    provenance = {"imported": "diffusers", "path": str(path), "num_train_timesteps": len(schedule.betas),
                  "scheduler": sname}
    if null_class and "guidable" in meta:   # a progdistill export: whether its null row was trained for guidance
        provenance["guidable"] = bool(meta["guidable"])
    return ModelCard(model=None, param=param, schedule=schedule, data=data, kind="teacher", weights="unet",
                     provenance=provenance, network={"class_name": "UNet2DModel", "config": unet},
                     clip=bool(sconf.get("clip_sample", False)), clip_range=float(sconf.get("clip_sample_range", 1.0)),
                     null_class=null_class, source=spec)


def load_diffusers_teacher(spec: str, device: str | torch.device = "cpu") -> tuple[Denoiser, ModelCard]:
    """`diffusers:PATH` as an eval-mode Denoiser (UNet2DModel.from_pretrained) plus its card."""
    from diffusers import UNet2DModel

    card = load_diffusers_card(spec)
    net = UNet2DModel.from_pretrained(Path(card.provenance["path"]) / card.weights, torch_dtype=torch.float32,
                                      low_cpu_mem_usage=False)
    card.network = network_spec(net)
    return Denoiser(net.to(device).eval(), schedule=card.schedule, param=card.param), card
