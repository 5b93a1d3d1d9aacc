"""The projector maps vision patch tokens into the LM's embedding space, built from a name."""
from __future__ import annotations

from torch import nn


def linear(d_vision: int, d_lm: int) -> nn.Module:
    """LLaVA-1's projector."""
    return nn.Linear(d_vision, d_lm)


def mlp2x_gelu(d_vision: int, d_lm: int) -> nn.Module:
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(d_vision, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))


PROJECTORS = {"linear": linear, "mlp2x_gelu": mlp2x_gelu}


def build_projector(name: str, d_vision: int, d_lm: int) -> nn.Module:
    """[.., D_vision] -> [.., D_lm]."""
    if name not in PROJECTORS:
        raise ValueError(f"Unknown projector {name!r}; known: {', '.join(PROJECTORS)}.")
    return PROJECTORS[name](d_vision, d_lm)
