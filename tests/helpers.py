"""Shared test utilities."""
from typing import Iterable, Union

import torch
from torch import nn


def calibrate_bn(model: nn.Module, batches: Union[torch.Tensor, Iterable[torch.Tensor]],
                 passes: int = 3) -> nn.Module:
    """Give BatchNorm layers the cumulative statistics of ``batches`` (a tensor, fed
    ``passes`` times, or a list of batches fed once each), then eval mode. Fresh BatchNorm
    makes eval outputs constant, which would make equality tests vacuous."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    if isinstance(batches, torch.Tensor):
        batches = [batches] * passes
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()
