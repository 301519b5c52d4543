"""Training states (`state/state-*.pt`: weights, optimizer, step, RNG): named, rotated and loaded with
`torch.load(weights_only=True)`."""

from __future__ import annotations

from pathlib import Path

import torch

from progdistill.errors import UserError
from progdistill.nets.compile import plain_state_dict


def list_states(state_dir: Path) -> list[Path]:
    return sorted(Path(state_dir).glob("state-*.pt"))


def rotate_states(state_dir: Path, keep: int) -> None:
    """Keep the newest `keep` training states (never touches model folders)."""
    for p in list_states(state_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def latest_state(state_dir: Path) -> Path | None:
    states = list_states(state_dir)
    return states[-1] if states else None


def load_state(path: Path) -> dict:
    """A training state; its network weights ("net", "ema") with plain keys (a stray `_orig_mod.` stripped)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"training state {path} is corrupt ({e.__class__.__name__}); delete it to resume from the previous one") from None
    return {k: plain_state_dict(v) if k in ("net", "ema") and isinstance(v, dict) else v for k, v in st.items()}


def state_name(*parts: int) -> str:
    return "state-" + "-".join(f"{p:08d}" for p in parts) + ".pt"
