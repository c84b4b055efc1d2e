"""Heads shared by methods: the projection from an encoder's feature to the joint embedding space."""

from __future__ import annotations

from torch import nn

PROJECTIONS = ("linear", "mlp")


def projection_head(kind: str, in_dim: int, out_dim: int, key: str = "method.projection") -> nn.Module:
    """``linear`` (CLIP: one bias-free ``Linear``) or ``mlp`` (ConVIRT: ``Linear - ReLU - Linear``).

    Args:
        kind: ``linear`` or ``mlp``.
        in_dim: width of the encoder feature.
        out_dim: width of the joint embedding.
        key: the config key ``kind`` came from (for the error message).
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    raise ValueError(f"{key} must be one of {list(PROJECTIONS)}, got '{kind}'.")


__all__ = ["PROJECTIONS", "projection_head"]
