"""MLPModel: a residual MLP over vectors, conditioned on the timestep and an optional class embedding."""

from __future__ import annotations

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn


def _timestep_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the (fractional) timestep tau, as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=tau.device) / half)
    args = tau.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class MLPModel(ModelMixin, ConfigMixin):
    """A residual MLP over vectors, conditioned on the timestep and an optional class embedding."""

    @register_to_config
    def __init__(self, dim: int = 2, out_dim: int = 2, hidden: int = 256, depth: int = 4,
                 num_class_embeds: int | None = None, dropout: float = 0.0, class_embed_type: str | None = None):
        super().__init__()
        self.temb = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # "identity" (as diffusers' UNet2DModel): class_labels is already an embedding, added as is (nets/guided.py)
        self.class_embedding = (nn.Identity() if class_embed_type == "identity"
                                else nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                          nn.Dropout(dropout), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        timestep = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])
        emb = self.temb(_timestep_embedding(timestep, self.config.hidden))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class-conditional MLP needs class_labels")
            emb = emb + self.class_embedding(class_labels)
        h = self.inp(sample)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)
