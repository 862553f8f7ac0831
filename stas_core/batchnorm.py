"""BatchNorm running statistics that belong to the final weights ("precise BN").

During training the running statistics are an exponential average over batches seen
while the weights were still moving. In a spiking network the lag is amplified (a shifted
pre-activation puts neurons on the wrong side of their threshold), so a short run can
evaluate at chance although its weights are good. :func:`recalibrate_batchnorm` recomputes
the statistics for the current weights: it runs some training batches forward in train
mode without gradients, with cumulative averaging (``momentum=None``) from the first
batch on; a layer that receives no rows keeps the statistics it had.
Under DDP the synchronised BatchNorm layers (:mod:`stas_core.distributed`) all-reduce
every batch's statistics, so every rank ends with the same running statistics.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
from typing import Iterable

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batches_for(images: int, global_batch: int) -> int:
    """Batches per process that together cover ``images`` training images (0: off)."""
    if images <= 0:
        return 0
    return max(1, math.ceil(images / global_batch))


@torch.no_grad()
def frozen_batchnorms(model: nn.Module, *, halting: bool, sps: str) -> list[nn.Module]:
    """BatchNorm layers whose statistics stay fixed in stage 2: with vanilla (per-timestep)
    SPS and halting, the patch-splitting stack normalises each timestep's batch on its own
    in training, while its running statistics average over timesteps (stage 1 trains all
    timesteps in one batch); once halting puts nearly all the computation at t = 0 the two
    disagree and an evaluation collapses (measured: 16.8% with running statistics against
    76.0% with batch statistics, same weights). Frozen, training and evaluation normalise
    alike. I-SPS runs the stack once per image, so nothing is frozen there."""
    if not halting or sps != "vanilla" or not hasattr(model, "patch_embed"):
        return []
    return batchnorm_layers(model.patch_embed)


def normalization(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, invstd)`` per channel with which ``bn`` normalises ``x`` (contiguous,
    channels innermost), as its forward would: in training the batch statistics, with the
    running statistics and ``num_batches_tracked`` updated as ``nn.BatchNorm`` does
    (``momentum=None``: a cumulative average); in evaluation the running statistics. For
    kernels that fold the normalisation into the next operation (``bn.affine`` and
    ``bn.track_running_stats`` assumed). The batch moments are summed in float64."""
    from . import kernels

    channels = bn.num_features
    if not bn.training:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    else:
        factor = 0.0 if bn.momentum is None else float(bn.momentum)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        rows = x.numel() // channels
        moments = kernels.load().channel_moments(x.detach(), channels)  # [2, C] float64
        mean = moments[0] / rows
        var = (moments[1] / rows - mean * mean).clamp(min=0.0)
        with torch.no_grad():
            bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            unbiased = var * (rows / max(rows - 1, 1))
            bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    invstd = torch.rsqrt(var + bn.eps)
    return mean.to(x.dtype), invstd.to(x.dtype)


def recalibrate_batchnorm(net: nn.Module, loader: Iterable, device: torch.device, *,
                          batches: int, amp: bool = False,
                          amp_dtype: torch.dtype = torch.float16,
                          frozen: Iterable[nn.Module] = ()) -> int:
    """Recompute the running statistics of every BatchNorm in ``net`` from the first
    ``batches`` batches of ``loader``; returns the number of batches used.

    ``net`` is called as in training (it may be a :class:`halting.Halted` wrapper, so
    halted tokens stay out of the statistics as they do in training); ``frozen`` layers
    (:func:`frozen_batchnorms`) keep their statistics. Every process must
    call this with the same ``batches`` (synchronised BatchNorm is a collective). The
    layers' momentum and the module's train/eval mode are restored afterwards.
    """
    frozen = list(frozen)
    layers = [bn for bn in batchnorm_layers(net) if all(bn is not f for f in frozen)]
    if not layers or batches <= 0:
        return 0
    momenta = [bn.momentum for bn in layers]
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in layers]
    was_training = net.training
    for bn in layers:
        # a cumulative average from the first batch on: that batch's statistics replace
        # the old ones outright (factor 1 / 1), so a layer that receives no rows at all
        # (every token halted before it) keeps the statistics training left, and while
        # recalibrating, a layer given fewer than two rows normalises with those too
        bn.num_batches_tracked.zero_()
        bn.momentum = None
    net.train()
    for bn in frozen:  # normalise with their fixed statistics, as in training
        bn.eval()
    used = 0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp else contextlib.nullcontext()
    try:
        with autocast:
            for images, _ in itertools.islice(loader, batches):
                net(images.to(device, non_blocking=True))
                used += 1
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        net.train(was_training)
    untouched = [i for i, bn in enumerate(layers) if int(bn.num_batches_tracked) == 0]
    if used and untouched:
        logger.info("BatchNorm recalibration: %d of %d layers saw no rows (every token "
                    "halted before them) and keep their trained statistics",
                    len(untouched), len(layers))
    if used == 0:  # an empty loader: keep the statistics training left
        for bn, (mean, var, tracked) in zip(layers, saved):
            bn.running_mean.copy_(mean), bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(tracked)
        logger.warning("BatchNorm recalibration saw no batch: the loader is empty")
    return used
