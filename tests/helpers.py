"""Shared test utilities."""
import torch
from torch import nn


def calibrate_bn(model: nn.Module, x: torch.Tensor, passes: int = 3) -> nn.Module:
    """Give BatchNorm layers the statistics of ``x`` (fresh BN makes eval outputs constant)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    return model.eval()
