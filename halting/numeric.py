"""Python-float constants that keep their value in float64 ONNX graphs.

torch's ONNX exporter writes a Python float operand (``x * 0.21``) as a float32 constant,
even in a float64 graph, so ``0.21`` becomes ``0.2100000083...``. In a spiking model such
a constant shifts membranes by ~1e-8 and flips spikes. :func:`exact` hands float64
computations a 0-d float64 tensor instead, which is stored as it is.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def exact(value: float, like: Tensor) -> Union[float, Tensor]:
    """``value`` as a 0-d tensor when ``like`` is float64, else unchanged."""
    if like.dtype == torch.float64:
        return torch.tensor(value, dtype=torch.float64, device=like.device)
    return value
