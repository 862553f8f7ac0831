"""Distributed training (``torchrun``, DDP): the process group, each rank's device and
seeds, the collectives training needs, and cross-process BatchNorm on any device
(torch's SyncBatchNorm is GPU-only).

Batch statistics are summed over all ranks with a differentiable all-reduce, so N processes
with B/N images each compute exactly what one process computes with B images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError
from .layers import TokenBN

__all__ = ["Dist", "init_distributed", "rank_device", "augmentation_seed", "all_reduce_sum",
           "gather_rng_states", "leave", "SyncTokenBN", "SyncBatchNorm2d",
           "convert_sync_batchnorm"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE set), else single process.
    On CUDA each rank is bound to ``cuda:LOCAL_RANK`` before the group is formed."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        if dist.is_initialized():
            return Dist(dist.get_rank(), dist.get_world_size(), local_rank)
        return Dist()
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                              f"CUDA device(s); start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def rank_device(device: torch.device, d: Dist) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` under torchrun on CUDA."""
    if device.type == "cuda" and "WORLD_SIZE" in os.environ:
        return torch.device("cuda", d.local_rank)
    return device


def augmentation_seed(seed: int, rank: int) -> int:
    """The RNG seed of one rank's data augmentation: every rank draws its own crops and
    flips (rank 0 of N and a single process draw alike)."""
    return seed + 1_000_003 * rank


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """``values`` summed over the ranks (unchanged in a single process)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_rng_states(d: Dist) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (augmentation draws from it), for exact resumption."""
    state = torch.get_rng_state()
    if not d.enabled or dist.get_backend() != "gloo":  # NCCL gathers CUDA tensors only
        return [state]
    states = [torch.empty_like(state) for _ in range(d.world)]
    dist.all_gather(states, state)
    return states


def leave(d: Dist) -> None:
    """Wait for every rank, then leave the process group (nothing in a single process)."""
    if d.enabled:
        dist.barrier()
        dist.destroy_process_group()


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
