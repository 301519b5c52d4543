"""Model card format 2: every field round-trips, format-1 cards still load and build the same network,
and a network rebuilt from the card's diffusers config loads its saved weights."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

from progdistill.diffusion.schedules import Schedule, linear_betas
from progdistill.errors import UserError
from progdistill.nets.build import build_network
from progdistill.nets.presets import ModelConfig
from progdistill.nets.spec import network_spec
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, CARD_FORMAT, ModelCard, num_classes, read_json
from progdistill.store.folders import build_network_from_card, load_network, save_model_folder
from progdistill.store.load import load_card, load_denoiser

TINY = ModelConfig(resolution=8, channels=1, block_out_channels=(16, 32), attention_levels=(1,), norm_num_groups=8,
                   num_classes=3)
DATA = {"spec": "digits", "kind": "image", "shape": [1, 8, 8], "num_classes": 3, "class_names": None}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_card_v2_every_field_round_trips(tmp_path):
    torch.manual_seed(0)
    net = build_network(TINY, "v")
    card = ModelCard(model=TINY, param="v", schedule=Schedule(kind="discrete", betas=linear_betas(20)), data=DATA,
                     iteration=7, kind="student", steps=4, weights="model", provenance={"round": 2},
                     clip=False, clip_range=1.5, null_class=True, normalizer={"mean": [0.5], "std": [2.0]},
                     source="diffusers:somewhere")
    save_model_folder(tmp_path, card, {"model": net})
    raw = read_json(tmp_path / CARD)
    assert raw["format"] == CARD_FORMAT == 2
    assert raw["network"] == json.loads(json.dumps(network_spec(net)))   # written for own models too
    back = load_card(tmp_path)
    for field in ("model", "param", "schedule", "data", "iteration", "kind", "steps", "weights", "provenance", "clip",
                  "clip_range", "null_class", "normalizer", "source"):
        assert getattr(back, field) == getattr(card, field), field
    assert back.network["class_name"] == "UNet2DModel"
    assert num_classes(back) == 3 and back.network["config"]["num_class_embeds"] == 4   # + the null row
    den, _ = load_denoiser(tmp_path)
    assert same_weights(den.net, net)
    # and the dict itself is a fixed point
    assert ModelCard.from_dict(json.loads(json.dumps(back.to_dict()))) == back


def v1_dict(model: ModelConfig, kind: str = "image") -> dict:
    """A card as format 1 wrote it: no network, clip, null_class, normalizer or source."""
    return {"format": 1, "model": model.to_dict(), "param": "eps", "schedule": Schedule().to_dict(),
            "data": {**DATA, "kind": kind}, "iteration": 100, "kind": "teacher", "steps": None, "weights": "ema",
            "provenance": {"preset": "digits"}}


@pytest.mark.parametrize("model", [TINY, ModelConfig(kind="mlp", channels=2, hidden=32, depth=2, block_out_channels=(),
                                                     attention_levels=())], ids=["unet", "mlp"])
def test_card_v1_still_loads_and_builds_the_same_network(tmp_path, model):
    kind = "image" if model.kind == "unet" else "vector"
    torch.manual_seed(1)
    net = build_network(model, "eps")
    net.save_pretrained(tmp_path / "ema", safe_serialization=True)
    write_json(tmp_path / CARD, v1_dict(model, kind))
    card = load_card(tmp_path)
    assert card.network is None and card.model == model
    assert card.clip is (kind == "image") and card.clip_range == 1.0   # the format-1 rule
    assert card.null_class is True and card.normalizer is None and card.source is None
    assert num_classes(card) == model.num_classes
    built = build_network_from_card(card)
    assert type(built) is type(net) and network_spec(built) == network_spec(net)
    assert same_weights(load_network(tmp_path, card), net)
    # re-saved, it becomes a format-2 card with the same network
    save_model_folder(tmp_path / "again", card, {"ema": load_network(tmp_path, card)})
    again = load_card(tmp_path / "again")
    assert again.network == json.loads(json.dumps(network_spec(net))) and again.clip == card.clip
    assert same_weights(load_network(tmp_path / "again", again), net)


def test_any_unet2d_round_trips_through_its_network_config(tmp_path):
    """A UNet2DModel no ModelConfig describes (other blocks, class table without a null row) is rebuilt from the card."""
    torch.manual_seed(2)
    net = UNet2DModel(sample_size=(8, 16), in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=2,
                      down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                      norm_num_groups=4, num_class_embeds=5, flip_sin_to_cos=False, freq_shift=1).eval()
    card = ModelCard(model=None, param="x", schedule=Schedule(kind="discrete", betas=linear_betas(50)),
                     data={"kind": "image", "shape": [3, 8, 16], "spec": None, "num_classes": 5}, weights="model",
                     null_class=False, network=network_spec(net))
    save_model_folder(tmp_path, card, {"model": net})
    back = load_card(tmp_path)
    assert back.model is None and back.network == json.loads(json.dumps(network_spec(net)))
    assert num_classes(back) == 5 and back.clip is True
    den, _ = load_denoiser(tmp_path)
    assert same_weights(den.net, net)
    z, y = torch.randn(2, 3, 8, 16), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(den.net(z, 3.5, class_labels=y).sample, net(z, 3.5, class_labels=y).sample)


@pytest.mark.parametrize("teacher,student,channels", [("eps", "v", 1), ("eps", "both", 2), ("both", "x", 1), ("v", "v", 1)])
def test_student_network_from_a_card(tmp_path, teacher, student, channels):
    """build_network_from_card(card, param): same architecture, output channels for the student's parameterization."""
    torch.manual_seed(3)
    cfg = ModelConfig(resolution=8, channels=1, block_out_channels=(16, 32), attention_levels=(1,),
                      norm_num_groups=8, dropout=0.1)
    net = build_network(cfg, teacher)
    card = ModelCard(model=cfg, param=teacher, schedule=Schedule(), data=DATA, network=network_spec(net))
    for c in (card, ModelCard.from_dict({**card.to_dict(), "network": None})):   # from network, and from model
        st = build_network_from_card(c, student, dropout=0.0)
        assert st.config.out_channels == channels and st.config.in_channels == 1 and st.config.dropout == 0.0
        assert list(st.config.block_out_channels) == list(net.config.block_out_channels)
        own, src = st.state_dict(), net.state_dict()
        differ = [k for k in own if own[k].shape != src[k].shape]
        assert sorted(own) == sorted(src) and all(k.startswith("conv_out") for k in differ)
        assert bool(differ) == ((teacher == "both") != (student == "both"))
    assert build_network_from_card(card).config.dropout == 0.1   # no param: the card's own network


def test_num_classes_and_card_validation():
    base = dict(param="v", schedule=Schedule(), data=DATA)
    foreign = ModelCard(model=None, network={"class_name": "UNet2DModel", "config": {"num_class_embeds": 10}},
                        null_class=False, **base)
    own = ModelCard(model=None, network={"class_name": "UNet2DModel", "config": {"num_class_embeds": 11}}, **base)
    uncond = ModelCard(model=None, network={"class_name": "UNet2DModel", "config": {"num_class_embeds": None}}, **base)
    assert (num_classes(foreign), num_classes(own), num_classes(uncond)) == (10, 10, 0)
    with pytest.raises(UserError, match="network config or a progdistill model config"):
        ModelCard(model=None, **base)
    with pytest.raises(UserError, match="newer than this progdistill"):
        ModelCard.from_dict({**own.to_dict(), "format": CARD_FORMAT + 1})
    with pytest.raises(UserError, match="unknown network class"):
        build_network_from_card(ModelCard(model=None, network={"class_name": "Transformer2DModel", "config": {}}, **base))
