"""issue 15, item 5: the export of a plainly distilled student of a class-conditional teacher does not offer its
last label row as a null class for guidance (it was never distilled, and progdistill refuses to guide the
student); `progdistill_export.json` says `"guidable"`, true only for teachers trained with label dropout. Such
folders still import back (`diffusers:DIR`) with the extra row told apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from progdistill.diffusion.schedules import Schedule
from progdistill.errors import UserError
from progdistill.interop.export import META, export_model
from progdistill.nets.build import build_network
from progdistill.nets.presets import ModelConfig
from progdistill.pipeline import load
from progdistill.store.card import ModelCard
from progdistill.store.folders import save_model_folder

pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
CLASSES = 3


def write_model(folder: Path, kind: str, provenance: dict) -> Path:
    cfg = ModelConfig(resolution=8, channels=1, block_out_channels=(16, 32), attention_levels=(), norm_num_groups=8,
                      num_classes=CLASSES)
    data = {"spec": "digits", "kind": "image", "shape": [1, 8, 8], "num_classes": CLASSES}
    extra = dict(steps=2, weights="model") if kind == "student" else dict(weights="ema")
    card = ModelCard(model=cfg, param="v", schedule=Schedule(), data=data, iteration=5, kind=kind,
                     provenance=provenance, **extra)
    torch.manual_seed(0)
    nets = {"model": build_network(cfg, "v")}
    if kind == "teacher":
        nets["ema"] = build_network(cfg, "v")
    save_model_folder(folder, card, nets)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidable")
    models = {"student": write_model(root / "student", "student", {"teacher": "runs/t", "round": 0,
                                                                   "teacher_steps": 4, "seed": 0}),
              "teacher": write_model(root / "teacher", "teacher", {"seed": 0, "label_dropout": 0.1}),
              "no_dropout": write_model(root / "no-dropout", "teacher", {"seed": 0, "label_dropout": 0.0})}
    return {name: (m, export_model(m, root / f"out-{name}").out) for name, m in models.items()}


def meta(out: Path) -> dict:
    return json.loads((out / META).read_text())


def test_student_export_does_not_offer_its_null_row_for_guidance(exports):
    model, out = exports["student"]
    with pytest.raises(UserError):   # progdistill itself refuses to guide it
        load(model, device="cpu").sample(num=1, guidance=1.0)
    m = meta(out)
    assert m["null_class"] is True and m["num_classes"] == CLASSES and m["guidable"] is False
    text = (out / "README.md").read_text()
    assert "null class, for guidance" not in text and "null-class row for guidance" not in text
    assert "never distilled" in text and '"guidable": false' in text


def test_teacher_with_label_dropout_is_guidable_and_without_is_not(exports):
    _, out = exports["teacher"]
    assert meta(out)["guidable"] is True and meta(out)["null_class"] is True
    text = (out / "README.md").read_text()
    assert f"row {CLASSES} of the embedding is the null class, for guidance" in text and '"guidable": true' in text
    _, out = exports["no_dropout"]
    assert meta(out)["guidable"] is False
    text = (out / "README.md").read_text()
    assert "null class, for guidance" not in text and "null-class row for guidance" not in text
    assert "not for guidance" in text


def test_exports_import_back_with_the_extra_row_told_apart(exports):
    for name in ("student", "teacher"):
        model, out = exports[name]
        back = load(f"diffusers:{out}", device="cpu")
        assert back.card.data["num_classes"] == CLASSES and back.card.null_class is True
        assert back.card.provenance["guidable"] is meta(out)["guidable"]
        z = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(4))
        want = load(model, device="cpu").sample(steps=2, noise=z)
        assert (back.sample(steps=2, noise=z) - want).abs().max().item() <= 1e-4
