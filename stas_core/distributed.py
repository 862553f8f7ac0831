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
    """Normalise ``[M, C]`` with statistics over every rank's rows; update running stats.

    Statistics are summed in float32 (also under autocast: sums of squares overflow
    float16) and nothing is read back to the host: with fewer than two rows over all
    ranks (nearly every token halted) the running statistics are used and left as they are.
    """
    if not bn.training:
        return nn.functional.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight,
                                        bn.bias, False, 0.0, bn.eps)
    from torch.distributed.nn.functional import all_reduce

    x = flat.float()
    count = x.new_full((1,), float(x.shape[0]))  # a host int: no device read
    stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), count]))
    channels = x.shape[1]
    n = stats[-1]
    enough = n >= 2
    mean = stats[:channels] / n.clamp(min=1.0)
    var = (stats[channels:2 * channels] / n.clamp(min=1.0) - mean * mean).clamp(min=0.0)
    with torch.no_grad():
        bn.num_batches_tracked.add_(enough.to(bn.num_batches_tracked.dtype))
        if bn.momentum is None:  # cumulative average (also recalibration)
            momentum = 1.0 / bn.num_batches_tracked.clamp(min=1).to(x.dtype)
        else:
            momentum = x.new_tensor(bn.momentum)
        momentum = momentum * enough.to(x.dtype)
        unbiased = var.detach() * n / (n - 1.0).clamp(min=1.0)
        bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    mean = torch.where(enough, mean, bn.running_mean.float())
    var = torch.where(enough, var, bn.running_var.float())
    out = (x - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        out = out * bn.weight + bn.bias
    return out.to(flat.dtype)


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
