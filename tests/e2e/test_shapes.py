"""The model fits the data it is given (issue 10 item 4): image sources keep their own shape, options
override it, lossy conversions are said in one line, attention follows the resolution, resumes keep it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from progdistill import cli
from progdistill.data.datasets import load_data
from progdistill.errors import UserError
from progdistill.nets.build import build_network, count_parameters
from progdistill.nets.presets import PRESETS, ModelConfig, for_data, nearest_valid_sides
from progdistill.nets.spec import network_spec
from progdistill.pipeline import load
from progdistill.store.card import CARD, read_json
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import measure_train_speed, resumed_config

TINY = ["--width", "8", "--iters", "2", "--batch-size", "4", "--sample-steps", "1", "--no-progress"]


def _pngs(folder: Path, sizes, *, mode: str = "RGB", seed: int = 0) -> Path:
    """Random images of the given (w, h) sizes, a.png, b.png, ... in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, size=(h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        Image.fromarray(arr, mode).save(folder / f"{chr(97 + i)}.png")
    return folder


def _train(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_folder_of_32px_rgb_trains_a_32px_rgb_model_by_default(tmp_path, capsys):
    data = _pngs(tmp_path / "pics", [(32, 32)] * 6)
    out = tmp_path / "run"
    code, printed, err = _train(["--data", f"folder:{data}", "--preset", "digits", "--out", str(out), *TINY], capsys)
    assert code == 0, err
    card = read_json(out / CARD)
    assert card["data"]["shape"] == [3, 32, 32]
    assert card["model"]["resolution"] == 32 and card["model"]["channels"] == 3
    assert card["network"]["config"]["sample_size"] == 32 and card["network"]["config"]["in_channels"] == 3
    cfg = read_json(out / "config.json")
    assert (cfg["resolution"], cfg["channels"], cfg["width"]) == (32, 3, 8)   # frozen for --resume
    assert cfg["depth"] == 1 and card["model"]["layers_per_block"] == 1      # the digits preset's depth
    assert "data:" not in printed                                            # nothing was converted


def test_depth_sets_blocks_per_level_and_mlp_layers_and_is_kept_on_resume(tmp_path, capsys):
    out = tmp_path / "deep"
    code, _, err = _train(["--data", "digits", "--preset", "digits", "--depth", "2", "--out", str(out), *TINY], capsys)
    assert code == 0, err
    card = read_json(out / CARD)
    assert card["model"]["layers_per_block"] == 2 and card["network"]["config"]["layers_per_block"] == 2
    assert load(out).sample(num=2, steps=1).isfinite().all()
    code, _, err = _train(["--out", str(out), "--resume", "--depth", "3", "--iters", "3"], capsys)
    assert code == 2 and "keeps the run's depth (2)" in err
    mlp = tmp_path / "mlp"
    code, _, err = _train(["--data", "toy:gmm", "--depth", "2", "--out", str(mlp), *TINY], capsys)
    assert code == 0, err
    assert read_json(mlp / CARD)["model"]["depth"] == 2
    code, _, err = _train(["--data", "toy:gmm", "--depth", "0", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "--depth must be a positive integer" in err


def test_gray_images_give_one_channel_and_colour_three(tmp_path):
    gray = load_data(f"folder:{_pngs(tmp_path / 'g', [(16, 16)] * 3, mode='L')}")
    assert gray.shape == (1, 16, 16) and gray.note is None
    rgb_gray = _pngs(tmp_path / "rg", [])
    for i in range(2):   # RGB files whose pixels are gray are grayscale too
        v = np.full((8, 8, 3), 40 * i, np.uint8)
        Image.fromarray(v).save(rgb_gray / f"{i}.png")
    assert load_data(f"folder:{rgb_gray}").shape == (1, 8, 8)
    mixed = _pngs(tmp_path / "m", [(8, 8)] * 2, mode="L")
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(mixed / "c.png")   # one colour image makes the set RGB
    assert load_data(f"folder:{mixed}").shape == (3, 8, 8)


def test_mixed_sizes_take_the_most_common_and_say_so(tmp_path):
    data = _pngs(tmp_path / "mixed", [(16, 16), (16, 16), (16, 16), (24, 24), (12, 8)])
    ds = load_data(f"folder:{data}")
    assert ds.shape == (3, 16, 16)
    assert ds.note == (f"folder:{data}: 2 of 5 images made 16x16 (the most common size; --resolution chooses "
                       f"another): 1 downscaled (lossy), 1 upscaled, 1 non-square centre-cropped (lossy)")
    asked = load_data(f"folder:{data}", resolution=8)
    assert asked.shape == (3, 8, 8) and "5 of 5 images made 8x8 (as requested)" in asked.note
    wide = _pngs(tmp_path / "wide", [(20, 10)] * 2)   # all non-square: the shorter side, centre-cropped
    assert load_data(f"folder:{wide}").shape == (3, 10, 10)


def test_side_the_unet_cannot_take_names_the_nearest_valid_sizes(tmp_path, capsys):
    data = _pngs(tmp_path / "pics", [(32, 32)] * 2)
    code, _, err = _train(["--data", f"folder:{data}", "--preset", "digits", "--resolution", "30",
                           "--out", str(tmp_path / "r"), *TINY], capsys)
    assert code == 2 and "\n" not in err and "nearest valid: 28 or 32" in err and "multiple of 4" in err
    odd = _pngs(tmp_path / "odd", [(30, 30)] * 2)   # the data's own side is checked too
    code, _, err = _train(["--data", f"folder:{odd}", "--preset", "digits", "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "side 30" in err and "28 or 32" in err and "\n" not in err
    assert nearest_valid_sides(29, 4) == [28] and nearest_valid_sides(3, 4) == [4] and nearest_valid_sides(8, 16) == [16]
    np.savez(tmp_path / "w.npz", x=np.zeros((3, 8, 12), np.uint8))
    code, _, err = _train(["--data", f"npz:{tmp_path / 'w.npz'}", "--preset", "digits", "--out", str(tmp_path / "n"),
                           *TINY], capsys)
    assert code == 2 and "not square" in err and "--resolution" in err


def test_channels_1_on_rgb_prints_the_conversion_line(tmp_path, capsys):
    data = _pngs(tmp_path / "pics", [(32, 32)] * 3 + [(64, 64)])
    out = tmp_path / "gray"
    code, printed, err = _train(["--data", f"folder:{data}", "--preset", "digits", "--channels", "1",
                                 "--out", str(out), *TINY], capsys)
    assert code == 0, err
    lines = [ln for ln in printed.splitlines() if ln.startswith("data:")]
    assert lines == [f"data: folder:{data}: 1 of 4 images made 32x32 (the most common size; --resolution chooses "
                     f"another): 1 downscaled (lossy); RGB -> grayscale (lossy)"]
    assert read_json(out / CARD)["data"]["shape"] == [1, 32, 32]


def test_width_scales_every_level():
    digits = PRESETS["digits"].model
    narrow = for_data(digits, resolution=8, channels=1, width=16, what="t")
    assert narrow.block_out_channels == (16, 16, 32) and narrow.norm_num_groups == 16
    n = {w: count_parameters(build_network(for_data(digits, resolution=8, channels=1, width=w, what="t"), "v"))
         for w in (16, 32, 64)}
    assert n[16] < n[32] < n[64] and n[32] == count_parameters(build_network(digits, "v"))
    mlp = for_data(PRESETS["mlp"].model, resolution=None, channels=3, width=64, what="t")
    assert mlp.hidden == 64 and mlp.channels == 3
    with pytest.raises(UserError, match="attention heads"):   # imagenet64: 64-channel heads need multiples of 64
        for_data(PRESETS["imagenet64"].model, resolution=64, channels=3, width=100, what="t")


def _blocks(cfg: ModelConfig) -> list[str]:
    return list(build_network(cfg, "v").config.down_block_types)


def test_attention_levels_follow_the_resolution():
    digits = PRESETS["digits"].model
    at8, at32 = (for_data(digits, resolution=r, channels=1, width=None, what="t") for r in (8, 32))
    assert _blocks(at8) == _blocks(at32) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]


@pytest.mark.parametrize("name, legacy", [("digits", (4,)), ("cifar10", (16, 8)), ("imagenet64", (32, 16, 8)),
                                          ("lsun128", (32, 16, 8))])
def test_cards_with_absolute_attention_resolutions_build_the_same_network(name, legacy):
    """Format-1 cards stored `attention_resolutions` in pixels: they convert to the levels the presets now name."""
    model = PRESETS[name].model
    old = {**model.to_dict(), "attention_resolutions": list(legacy)}
    del old["attention_levels"]
    back = ModelConfig.from_dict(old)
    assert back == model
    if name == "digits":
        assert network_spec(build_network(back, "v")) == network_spec(build_network(model, "v"))


def test_resume_keeps_the_shape(tmp_path, capsys):
    data = _pngs(tmp_path / "pics", [(32, 32)] * 4)
    out = tmp_path / "run"
    args = ["--data", f"folder:{data}", "--preset", "digits", "--resolution", "16", "--out", str(out)]
    assert _train([*args, *TINY], capsys)[0] == 0
    for f in data.iterdir():   # the folder changes under the run: the run keeps 16x16x3
        Image.fromarray(np.full((8, 8), 99, np.uint8), "L").save(f)
    code, printed, err = _train(["--out", str(out), "--resume", "--iters", "3", "--sample-steps", "1", "--no-progress"],
                                capsys)
    assert code == 0, err
    card = read_json(out / CARD)
    assert card["iteration"] == 3 and card["data"]["shape"] == [3, 16, 16]
    code, _, err = _train(["--out", str(out), "--resume", "--resolution", "32", "--iters", "4"], capsys)
    assert code == 2 and "keeps the run's resolution (16)" in err
    # a run written before the shape was recorded resumes at its preset's shape
    old = resumed_config({"data": "folder:x", "preset": "digits", "iters": 5}, TrainConfig())
    assert (old.resolution, old.channels, old.width) == (8, 1, 32)
    mlp = resumed_config({"data": "toy:gmm", "preset": "mlp", "iters": 5, "model_overrides": {"hidden": 64}}, TrainConfig())
    assert (mlp.resolution, mlp.channels, mlp.width) == (None, None, 64)


def test_distillation_brings_folder_data_to_the_teacher_shape(tmp_path, capsys):
    small = _pngs(tmp_path / "small", [(16, 16)] * 4)
    teacher = tmp_path / "teacher"
    assert _train(["--data", f"folder:{small}", "--preset", "digits", "--out", str(teacher), *TINY], capsys)[0] == 0
    big = _pngs(tmp_path / "big", [(32, 32)] * 4, mode="L")
    out = distill(DistillConfig(teacher=str(teacher), data=f"folder:{big}", start_steps=2, final_steps=1,
                                iters_per_round=1, batch_size=4, checkpoint_every=1), tmp_path / "d", progress=False)
    printed = capsys.readouterr().out
    assert f"data: folder:{big}: 4 of 4 images made 16x16 (as requested): 4 downscaled (lossy)" in printed
    assert read_json(out / "steps-0001" / CARD)["data"]["shape"] == [3, 16, 16]


def test_small_preset_and_speed_probe():
    small = PRESETS["small"]
    n = count_parameters(build_network(small.model, small.param))
    assert 2_000_000 < n < 8_000_000
    for side in (16, 24, 64):   # 16-64 px: the 4-level UNet takes multiples of 8
        for_data(small.model, resolution=side, channels=3, width=None, what="t")
    assert measure_train_speed(PRESETS["digits"], batch_size=4, steps=1) > 0
