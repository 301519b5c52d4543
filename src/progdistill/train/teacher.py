"""Teacher training: paper Algorithm 1 in continuous time, single process or torchrun DDP."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from progdistill.data.datasets import Dataset, load_data, random_hflip
from progdistill.data.normalize import Normalizer, fit_normalizer
from progdistill.data.stream import chunk_noise
from progdistill.diffusion.denoiser import Denoiser
from progdistill.diffusion.losses import weighted_x_loss
from progdistill.diffusion.schedules import Schedule, noised
from progdistill.errors import UserError
from progdistill.nets.build import build_network, count_parameters
from progdistill.nets.compile import compile_denoiser
from progdistill.nets.device import prepare_network, run_note, run_settings
from progdistill.nets.presets import ModelConfig, Preset, check_side, for_data, get_preset, scaled_width
from progdistill.seeds import generator_for, seed_for
from progdistill.store.atomic import clean_run_folder, write_json
from progdistill.store.card import CARD, PUBLIC, ModelCard, read_json
from progdistill.store.folders import save_model_folder
from progdistill.store.states import latest_state, load_state
from progdistill.train.config import DEFAULT_SCHEDULE, TrainConfig, from_dict, resume_config, to_dict, with_defaults
from progdistill.train.loop import EMA, MetricsLog, init_distributed, lr_warmup_constant, lr_warmup_cosine
from progdistill.train.optim import adamw, warn_bf16
from progdistill.train.stage import Run, Stage, run_stage
from progdistill.version import __version__


def default_preset(data_spec: str) -> str | None:
    """`digits` for digits, `mlp` for 2-D toy data; elsewhere the preset must be named."""
    if data_spec == "digits":
        return "digits"
    if data_spec.startswith("toy:"):
        return "mlp"
    return None


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill unset fields from the preset (docs/method.md §5 defaults)."""
    preset_name = cfg.preset or default_preset(cfg.data)   # None: decided by the data (vectors -> mlp)
    p = get_preset(preset_name) if preset_name else None
    fill = {}
    if p is not None:
        fill = dict(preset=p.name, iters=p.iters, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                    warmup=p.warmup, ema_decay=p.ema_decay, dropout=p.model.dropout, param=p.param, hflip=p.hflip,
                    lr_decay=p.extra.get("lr_decay", "constant"))
    changes = {k: v for k, v in fill.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **changes).validate()


def preset_model(preset: Preset, overrides: dict) -> ModelConfig:
    """The preset's architecture with the run's `model_overrides` (ModelConfig fields)."""
    try:
        return dataclasses.replace(preset.model, **overrides)
    except TypeError as e:
        raise UserError(f"bad model override {overrides}: {e}") from None


def model_config_for(preset: Preset, data: Dataset, cfg: TrainConfig) -> ModelConfig:
    """The preset's architecture at the data's shape and the run's width, checked against the data's kind."""
    m = preset_model(preset, cfg.model_overrides)
    if data.kind == "vector":
        if m.kind != "mlp":
            raise UserError(f"{data.name} holds vectors of shape {data.shape}; use --preset mlp")
        m = for_data(m, resolution=None, channels=data.shape[0], width=cfg.width, what=data.name)
    else:
        if m.kind != "unet":
            raise UserError(f"{data.name} holds images of shape {data.shape}; --preset {preset.name} is for vectors")
        c, h, w = data.shape
        if h != w:
            raise UserError(f"{data.name} images are {h}x{w}, not square; pass --resolution to centre-crop them")
        m = for_data(m, resolution=h, channels=c, width=cfg.width,
                     what=f"{data.name} ({h}x{h} images, preset {preset.name})")
    num_classes = data.num_classes if cfg.class_cond else 0
    if cfg.class_cond and not num_classes:
        raise UserError(f"--class-cond needs labelled data, but {data.name} has no labels")
    if cfg.depth is not None:
        m = dataclasses.replace(m, **{"depth" if m.kind == "mlp" else "layers_per_block": cfg.depth})
    return dataclasses.replace(m, dropout=cfg.dropout, num_classes=num_classes)


def frozen_shape(cfg: TrainConfig, data: Dataset, model: ModelConfig) -> TrainConfig:
    """The run's config with the shape it trains at written in, so `--resume` never re-derives it."""
    depth = model.depth if model.kind == "mlp" else model.layers_per_block
    if data.kind == "vector":
        return dataclasses.replace(cfg, width=model.width, depth=depth)
    return dataclasses.replace(cfg, resolution=model.resolution, channels=model.channels, width=model.width,
                               depth=depth)


def data_info(data: Dataset) -> dict:
    return {"spec": data.name, "kind": data.kind, "shape": list(data.shape), "num_classes": data.num_classes,
            "class_names": data.class_names, "size": len(data)}


def run_normalizer(out: Path, data: Dataset, kind: str, *, resume: bool) -> Normalizer | None:
    """The run's vector normaliser: fitted on the training data once; a resumed run reuses its card's."""
    if data.kind != "vector":
        return None                       # images are already in [-1, 1]
    if resume and (out / CARD).is_file():
        return Normalizer.from_dict(read_json(out / CARD, "model card").get("normalizer"))
    return fit_normalizer(data.x, kind)


def load_train_data(cfg: TrainConfig, preset: Preset | None) -> Dataset:
    """The training data at the run's shape: the data's own unless `cfg` fixes resolution/channels."""
    if cfg.resolution is not None and preset is not None and preset.model.kind == "unet":
        m = preset_model(preset, cfg.model_overrides)
        m = m if cfg.width is None else scaled_width(m, cfg.width)
        check_side(m, cfg.resolution, what=f"--resolution {cfg.resolution} with preset {preset.name}")  # before reading
    return load_data(cfg.data, split="train", resolution=cfg.resolution, channels=cfg.channels, seed=cfg.seed)


def teacher_config(cfg: TrainConfig, out: Path, *, resume: bool) -> TrainConfig:
    """The run's config, resolved: the given fields over the defaults, or with `resume` the saved config
    continued under the one resume rule (`config.resume_config`). Raises before anything is written."""
    cfg.validate()
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"--resume: {out} has no config.json; start a new run without --resume")
        cfg = resumed_config(read_json(out / "config.json", "run config"), cfg, out)
    elif (out / "config.json").exists():
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    return resolve_config(with_defaults(cfg, "train"))


def resumed_config(saved_d: dict, cfg: TrainConfig, out: Path | str = "the run") -> TrainConfig:
    """The saved run config, continued: a given field must keep its saved value unless resume-mutable
    (RESUME_MUTABLE["train"]: session options and a longer budget); configs of older versions resume too."""
    saved_d = dict(saved_d)
    saved_d.setdefault("lr_decay", "constant")   # runs from before the option kept a constant lr
    if "resolution" not in saved_d and saved_d.get("preset"):   # runs from before the shape was recorded:
        m = preset_model(get_preset(saved_d["preset"]), saved_d.get("model_overrides", {}))   # at the preset's shape
        saved_d.update(width=m.width, **({"resolution": m.resolution, "channels": m.channels} if m.kind == "unet" else {}))
    saved = with_defaults(from_dict(TrainConfig, saved_d), "train")   # fields older versions did not write
    for name in ("resolution", "channels", "width", "depth"):
        asked, kept = getattr(cfg, name), getattr(saved, name)
        if asked is not None and asked != kept:
            raise UserError(f"--resume keeps the run's {name} ({kept}); drop --{name} {asked} or start a new run")
    return with_defaults(resume_config(saved, cfg, "train", Path(out)), "train")


def teacher_plan(n: int, *, step: int, seed: int, batch_size: int, label_dropout: float) -> dict:
    """The global batch plan of one step, a function of (seed, step) only: example indices, t, flips, label drops."""
    g = generator_for(torch.device("cpu"), seed, step)
    idx = torch.randint(n, (batch_size,), generator=g)
    t = torch.rand(batch_size, generator=g, dtype=torch.float64)
    flip = torch.rand(batch_size, generator=g) < 0.5
    drop = torch.rand(batch_size, generator=g) < label_dropout
    return {"idx": idx, "t": t, "flip": flip, "drop": drop}


def teacher_batch(data: Dataset, *, step: int, seed: int, batch_size: int, hflip: bool, label_dropout: float,
                  device: torch.device, part: slice = slice(None), read: Callable | None = None) -> dict:
    """Examples `part` of the global batch of one step (Algorithm 1): x, y, t, eps.

    A function of (seed, step) and the examples' positions only: the plan is drawn whole (it is
    small), the noise per chunk of positions (`chunk_noise`), so a process draws and reads only its
    part and any split across processes or micro-batches gives the same examples. `read(idx)` gives
    the images (default: `data.examples`).
    """
    plan = teacher_plan(len(data), step=step, seed=seed, batch_size=batch_size, label_dropout=label_dropout)
    idx = plan["idx"][part]
    x = (read or data.examples)(idx).to(device)
    if hflip:
        x = random_hflip(x, plan["flip"][part])
    y = None
    if data.y is not None:
        y = data.y[idx]
        y = torch.where(plan["drop"][part], torch.full_like(y, data.num_classes), y).to(device)   # null class
    eps = chunk_noise((seed, step), part, batch_size, data.shape)
    return {"x": x, "y": y, "t": plan["t"][part].to(device), "eps": eps.to(device)}


def diffusion_loss(denoiser, batch: dict, sl: slice, *, schedule: Schedule, weighting: str, class_cond: bool) -> torch.Tensor:
    """L = w(lambda_t) ||x - x_pred(z_t)||^2 with z_t = alpha_t x + sigma_t eps (Algorithm 1)."""
    x, t, eps = batch["x"][sl], batch["t"][sl], batch["eps"][sl]
    logsnr = schedule.logsnr(t).float()
    z_t = noised(x, eps, logsnr)
    y = batch["y"][sl] if class_cond else None
    x_pred = denoiser(z_t, logsnr, y)
    return weighted_x_loss(x, x_pred, logsnr, weighting).mean()


def measure_train_speed(preset: Preset, *, batch_size: int, steps: int = 3, resolution: int | None = None,
                        channels: int | None = None) -> float:
    """Training examples/s of a preset's network at its default shape (or the given one) on random data:
    one warm-up step, then `steps` timed AdamW steps of Algorithm 1 (forward, backward, clip, update)."""
    m = preset.model
    if m.kind == "unet":
        m = for_data(m, resolution=resolution or m.resolution, channels=channels or m.channels, width=None,
                     what=f"preset {preset.name}")
    torch.manual_seed(0)
    net = build_network(m, preset.param)
    schedule = Schedule.from_dict(DEFAULT_SCHEDULE)
    model = Denoiser(net, schedule=schedule, param=preset.param)
    optimizer = torch.optim.AdamW(net.parameters(), lr=preset.lr)
    shape = (m.channels,) if m.kind == "mlp" else (m.channels, m.resolution, m.resolution)
    batch = {"x": torch.rand(batch_size, *shape) * 2 - 1, "t": torch.rand(batch_size, dtype=torch.float64),
             "eps": torch.randn(batch_size, *shape),
             "y": torch.randint(m.num_classes, (batch_size,)) if m.num_classes else None}
    elapsed = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = diffusion_loss(model, batch, slice(None), schedule=schedule, weighting="snr_trunc",
                              class_cond=m.num_classes > 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        elapsed += (time.perf_counter() - start) if step else 0.0
    return batch_size * steps / elapsed


def teacher_lr(cfg: TrainConfig):
    """Warm-up, then constant (docs/method.md §5) or a cosine decay to lr_final_frac x lr over the run."""
    if cfg.lr_decay == "cosine":
        return lr_warmup_cosine(cfg.lr, cfg.warmup, cfg.iters, cfg.lr_final_frac)
    return lr_warmup_constant(cfg.lr, cfg.warmup)


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a teacher into run folder `out`; returns it. Resumable exactly with `resume=True`."""
    out = Path(out)
    dist_info = init_distributed()
    cfg = teacher_config(cfg, out, resume=resume)
    settings = run_settings(dist_info.device, cfg.compile)   # CUDA: channels_last, TF32, fused AdamW; CPU: none
    cfg, data, model_cfg = teacher_data(cfg)
    preset = get_preset(cfg.preset)
    normalizer = run_normalizer(out, data, cfg.normalize, resume=resume)
    if normalizer is not None:   # the diffusion sees u = (x - shift) / scale; sampling decodes
        data.x = normalizer.encode(data.x.double()).float()

    torch.manual_seed(seed_for(cfg.seed, 10_000 + dist_info.rank))  # dropout only; all else is passed in
    net = prepare_network(build_network(model_cfg, cfg.param).to(dist_info.device), settings)
    ema = EMA(net, cfg.ema_decay, cfg.ema_warmup)
    optimizer = adamw(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, settings=settings)
    state_path = latest_state(out / "state") if resume else None
    state = load_state(state_path) if state_path is not None else None
    if dist_info.is_main:
        if resume and state is None:
            print(f"--resume: no training state in {out / 'state'}; starting from step 0")
        out.mkdir(parents=True, exist_ok=True)
        clean_run_folder(out, PUBLIC)    # what a killed save left; repairs the public links
        write_json(out / "config.json", to_dict(cfg))
        if data.note:
            print(f"data: {data.note}")
        print(f"teacher: preset {preset.name}, {count_parameters(net):,} parameters, data {data.name} "
              f"({len(data)} x {tuple(data.shape)}{', read per batch' if data.stream is not None else ''}), "
              f"{cfg.iters} iters, batch {cfg.batch_size}, param {cfg.param}{run_note(settings, cfg.compile)}")
        warn_bf16(cfg.param, cfg.precision)
    if data.x is not None:
        data.x = data.x.to(dist_info.device)
    card = ModelCard(model=model_cfg, param=cfg.param, schedule=Schedule.from_dict(cfg.schedule), data=data_info(data),
                     kind="teacher", weights="ema", normalizer=normalizer.to_dict() if normalizer is not None else None,
                     provenance={"progdistill": __version__, "preset": preset.name,
                                 "weighting": cfg.weighting, "seed": cfg.seed,
                                 # guidance needs a trained null class: recorded so that guidance can check it
                                 "label_dropout": cfg.label_dropout if cfg.class_cond else 0.0})
    run = Run(cfg, dist_info, settings, data, MetricsLog(out / "metrics.jsonl", dist_info.is_main),
              deadline=time.time() + 60 * cfg.time_limit if cfg.time_limit else None, progress=progress)
    result = run_stage(run, teacher_stage(run, out, net=net, ema=ema, optimizer=optimizer, card=card), state)
    if dist_info.is_main:
        write_json(out / "timing.json", {"iters": result.step, "seconds_this_session": result.seconds,
                                         "finished": result.finished,
                                         **_accumulate_time(out, result.seconds, result.start)})
    return out


def teacher_data(cfg: TrainConfig) -> tuple[TrainConfig, Dataset, ModelConfig]:
    """The training data and network of a resolved config; the config with its preset and shape decided."""
    preset_name = cfg.preset
    if preset_name is None and cfg.data.split(":")[0] in ("folder", "cifar10", "prepared"):
        get_preset(None)  # raises: images need a named preset (only vectors imply `mlp`)
    data = load_train_data(cfg, get_preset(preset_name) if preset_name else None)
    if preset_name is None:
        if data.kind != "vector":
            get_preset(None)  # raises: images need a named preset
        cfg = resolve_config(dataclasses.replace(cfg, preset="mlp"))
    model_cfg = model_config_for(get_preset(cfg.preset), data, cfg)
    return frozen_shape(cfg, data, model_cfg), data, model_cfg


def teacher_stage(run: Run, out: Path, *, net, ema: EMA, optimizer, card: ModelCard) -> Stage:
    """Algorithm 1 as a stage: batches of `teacher_batch`, the diffusion loss; every save publishes the run."""
    cfg, data, dist_info = run.cfg, run.data, run.dist_info
    schedule = card.schedule
    label_dropout = cfg.label_dropout if cfg.class_cond else 0.0

    def plan_idx(step: int) -> torch.Tensor:
        return teacher_plan(len(data), step=step, seed=cfg.seed, batch_size=cfg.batch_size,
                            label_dropout=label_dropout)["idx"]

    def batch(step: int, part: slice, read) -> dict:
        return teacher_batch(data, step=step, seed=cfg.seed, batch_size=cfg.batch_size, hflip=cfg.hflip,
                             label_dropout=label_dropout, device=dist_info.device, part=part, read=read)

    def loss(model, b: dict) -> torch.Tensor:
        return diffusion_loss(model, b, slice(None), schedule=schedule, weighting=cfg.weighting,
                              class_cond=cfg.class_cond)

    def wrap():
        denoiser = compile_denoiser(Denoiser(net, schedule=schedule, param=cfg.param), cfg.compile)
        return DistributedDataParallel(denoiser) if dist_info.enabled else denoiser

    def publish(step: int) -> None:
        card.iteration = step
        save_model_folder(out, card, {"model": net, "ema": ema.net})

    def resumed(start: int) -> None:
        if _published_iteration(out) != start:
            publish(start)   # killed between the state file and the model folder of one save: publish the state's

    return Stage(desc="teacher", net=net, optimizer=optimizer, iters=cfg.iters, lr_fn=teacher_lr(cfg),
                 states=out / "state", plan_idx=plan_idx, batch=batch, loss=loss, wrap=wrap, ema=ema,
                 publish=publish, resumed=resumed)


def _published_iteration(out: Path) -> int | None:
    """The iteration of the model folder `out` publishes now (None before the first save)."""
    p = out / CARD
    return int(read_json(p, "model card").get("iteration", -1)) if p.is_file() else None


def _accumulate_time(out: Path, seconds: float, start: int) -> dict:
    """Total training wall time across resumed sessions (for cost reports)."""
    prev = 0.0
    p = out / "timing.json"
    if start > 0 and p.is_file():
        prev = float(read_json(p).get("seconds_total", 0.0))
    return {"seconds_total": prev + seconds}
