"""Small layers shared by the spiking transformer families.

Everything here works on token tensors with any leading shape ``[..., N, D]`` so that the
same module serves the multi-step path (``[T, B, N, D]``) and the single-step path
(``[B, N, D]``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .neurons import LIF


class TokenBN(nn.BatchNorm1d):
    """BatchNorm over the channel (last) dimension of ``[..., D]`` tokens.

    Equivalent to Spikformer's ``Conv1d(k=1) -> BatchNorm1d`` over ``[T*B, D, N]``. With an
    ``active`` mask in training mode, batch statistics come from active tokens only, so
    halted tokens neither shift the statistics nor receive updates.
    """

    def forward(self, x: Tensor, active: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if active is None or not self.training:
            return self._norm(flat).reshape(shape)
        keep = active.reshape(-1).to(torch.bool)
        out = flat.clone()
        if keep.any():
            out[keep] = self._norm(flat[keep])
        return out.reshape(shape)

    def _norm(self, flat: Tensor) -> Tensor:
        """BatchNorm of ``[M, D]`` rows (overridden for cross-process statistics)."""
        return super().forward(flat)


class SpikeMatMul(nn.Module):
    """``a @ b`` as a module, so the op counter sees spike-driven products (Q K^T, attn V)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b


class LinearBN(nn.Module):
    """Token-wise ``Linear -> BN`` (Spikformer's ``Conv1d(k=1) -> BN``), bias folded into BN."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = TokenBN(out_dim)

    def forward(self, x: Tensor, active: Optional[Tensor] = None) -> Tensor:
        return self.bn(self.linear(x), active)


def fire(neuron: LIF, x: Tensor, active: Optional[Tensor], multi: bool) -> Tensor:
    """Run ``neuron`` multi-step on ``x[T, ...]`` or one step with the token mask ``active[B, N]``."""
    if multi:
        return neuron.multi_step(x)
    return neuron.single_step(x, None if active is None else active.unsqueeze(-1))


def keep_inactive(new: Tensor, old: Tensor, active: Optional[Tensor]) -> Tensor:
    """Tokens outside ``active`` keep their previous value (frozen when halted)."""
    if active is None:
        return new
    return torch.where(active.unsqueeze(-1), new, old)


def mask_tokens(x: Tensor, active: Optional[Tensor]) -> Tensor:
    """Zero the tokens outside ``active``: they send no spikes (and cost no ops)."""
    if active is None:
        return x
    return x * active.unsqueeze(-1).to(x.dtype)
