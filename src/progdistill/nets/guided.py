"""The w-conditioned network of guidance distillation (Meng et al., CVPR 2023; docs/method.md §9).

`GuidedNet` wraps a base network built with `class_embed_type="identity"` (diffusers' UNet2DModel, or
progdistill's MLPModel): the wrapper owns the label table e(c) and the w-MLP, and hands the base the
conditioning embedding e(c) + MLP(features(w_scale w / w_max)), which the base adds to its time
embedding exactly where a class embedding goes. Only the last linear layer of the w-MLP starts at zero,
so a student initialised from a teacher starts as the teacher's conditional (w = 0) model and the
first layer still receives gradient once the last one moves.
"""

from __future__ import annotations

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from progdistill.errors import UserError
from progdistill.nets.build import base_network_from_spec

W_SCALE = 1000.0    # w enters as W_SCALE * w / w_max: unscaled, sinusoids barely separate w = 0 from w = 0.5


def w_features(w: torch.Tensor, *, w_max: float, dim: int, scale: float = W_SCALE) -> torch.Tensor:
    """Sinusoidal features [cos(u f_j), sin(u f_j)] of u = scale * w / w_max, f_j = 10000^(-j / (dim/2))."""
    u = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * (scale / w_max)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=u.device) / half)
    args = u[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GuidedNet(ModelMixin, ConfigMixin):
    """x_eta(z_t, c, w): a base network conditioned on e(c) + MLP(w_features(w)), added to its time embedding."""

    @register_to_config
    def __init__(self, base: dict | None = None, num_class_embeds: int = 1, embed_dim: int = 128,
                 w_min: float = 0.0, w_max: float = 4.0, w_scale: float = W_SCALE):
        super().__init__()
        if base is None or base["config"].get("class_embed_type") != "identity":
            raise UserError("GuidedNet needs a base network built with class_embed_type='identity'")
        self.net = base_network_from_spec(base)
        self.class_embedding = nn.Embedding(num_class_embeds, embed_dim)
        self.w_embedding = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        nn.init.zeros_(self.w_embedding[2].weight)   # the LAST layer only: zeroing both would leave no gradient
        nn.init.zeros_(self.w_embedding[2].bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                w: torch.Tensor | None = None):
        if class_labels is None:
            raise ValueError("a w-conditioned network needs class_labels")
        cfg = self.config
        w = torch.zeros(sample.shape[0], device=sample.device) if w is None else \
            torch.as_tensor(w, device=sample.device, dtype=torch.float32).expand(sample.shape[0])
        feats = w_features(w, w_max=cfg.w_max, dim=cfg.embed_dim, scale=cfg.w_scale).to(sample.device)
        cond = self.class_embedding(class_labels) + self.w_embedding(feats)
        return self.net(sample, timestep, class_labels=cond.to(self.class_embedding.weight.dtype))


def base_spec_for(teacher_spec: dict) -> dict:
    """The teacher's architecture as the base of a GuidedNet: class_embed_type "identity", no label table."""
    config = dict(teacher_spec["config"], num_class_embeds=None, class_embed_type="identity")
    return {"class_name": teacher_spec["class_name"], "config": config}


