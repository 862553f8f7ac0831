"""Cross-process BatchNorm for DDP on any device (torch's SyncBatchNorm is GPU-only).

Batch statistics are summed over all ranks with a differentiable all-reduce, so N processes
with B/N images each compute exactly what one process computes with B images.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import TokenBN


def _synced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, flat: Tensor) -> Tensor:
    """Normalise ``[M, C]`` with statistics over every rank's rows; update running stats."""
    if not bn.training:
        return nn.functional.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight,
                                        bn.bias, False, 0.0, bn.eps)
    from torch.distributed.nn.functional import all_reduce

    count = flat.new_full((1,), float(flat.shape[0]))
    stats = all_reduce(torch.cat([flat.sum(0), (flat * flat).sum(0), count]))
    channels = flat.shape[1]
    n = stats[-1]
    if float(n) < 2:  # (nearly) every token halted on every rank: no batch statistics
        return nn.functional.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight,
                                        bn.bias, False, 0.0, bn.eps)
    mean = stats[:channels] / n
    var = stats[channels:2 * channels] / n - mean * mean
    with torch.no_grad():
        bn.num_batches_tracked += 1
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean.detach(), momentum)
        bn.running_var.lerp_(var.detach() * n / max(float(n) - 1.0, 1.0), momentum)
    out = (flat - mean) * torch.rsqrt(var + bn.eps)
    return out * bn.weight + bn.bias if bn.affine else out


class SyncTokenBN(TokenBN):
    def _norm(self, flat: Tensor) -> Tensor:
        return _synced_batch_norm(self, flat)


class SyncBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, c)
        return _synced_batch_norm(self, flat).reshape(b, h, w, c).permute(0, 3, 1, 2)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Switch every TokenBN / BatchNorm2d of ``model`` to cross-process statistics, in place."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    for m in model.modules():
        if type(m) is TokenBN:
            m.__class__ = SyncTokenBN
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return model
