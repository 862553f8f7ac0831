"""Threshold calibration of converted models from ANN activations.

Each multi-threshold neuron sits where the ANN has a real-valued activation ``a``; in mean
framing the neuron's per-step input is ``a`` itself once the network settles. The threshold
``theta`` is chosen from samples of ``|a|`` over a few hundred calibration images:

* ``percentile``: ``theta`` = the p-th percentile of ``|a|`` (default 99.99);
* ``mse`` (default): the ``theta`` on a grid below ``max |a|`` that minimises the error of
  one step of the neuron's quantiser capped at one spike, ``E[(q_theta(a) - a)^2]`` (with
  bursts allowed, ever smaller thresholds would win at the price of many more spikes).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import Tensor

from .errors import ConfigError, ConversionError
from .ops import MultiThresholdNeuron
from .spiking_vit import SpikingViT

logger = logging.getLogger(__name__)

METHODS = ("mse", "percentile")
SAMPLES_PER_SITE = 65_536


class _Reservoir:
    """Uniform samples of ``|a|`` per neuron (bounded memory), plus the exact maximum."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.gen = size, generator
        self.chunks: list[Tensor] = []
        self.seen = 0
        self.max = 0.0

    def add(self, a: Tensor) -> None:
        flat = a.detach().abs().flatten().float().cpu()
        self.max = max(self.max, float(flat.max())) if flat.numel() else self.max
        keep = min(flat.numel(), max(1, self.size // 8))
        idx = torch.randint(flat.numel(), (keep,), generator=self.gen)
        self.chunks.append(flat[idx])
        self.seen += flat.numel()

    def values(self) -> Tensor:
        v = torch.cat(self.chunks)
        if v.numel() > self.size:
            v = v[torch.randperm(v.numel(), generator=self.gen)[: self.size]]
        return v


def choose_threshold(samples: Tensor, neuron: MultiThresholdNeuron, method: str,
                     percentile: float, max_abs: float) -> float:
    """Threshold for one neuron from samples of ``|a|``."""
    if max_abs <= 0:
        return 1.0  # a site that is always zero: any threshold works
    if method == "percentile":
        q = torch.quantile(samples.double(), percentile / 100.0)
        return float(q) if q > 0 else max_abs
    best, best_err = max_abs, float("inf")
    for frac in torch.linspace(0.05, 1.0, 40).tolist():
        theta = frac * max_abs
        neuron.threshold.fill_(theta)
        err = float(((neuron.quantize(samples, burst=False) - samples) ** 2).mean())
        if err < best_err:
            best, best_err = theta, err
    return best


@torch.no_grad()
def calibrate(model: SpikingViT, images: Iterable[Tensor], *, method: str = "mse",
              percentile: float = 99.99, max_images: int = 256, seed: int = 0,
              device: Optional[torch.device] = None) -> dict[str, float]:
    """Set every neuron's threshold from ANN activations on ``images`` (batches ``[B,C,H,W]``
    or ``(images, labels)`` pairs). Returns ``{neuron name: threshold}``."""
    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(METHODS)}; got {method!r}")
    if not 0 < percentile <= 100:
        raise ConfigError(f"percentile must be in (0, 100]; got {percentile}")
    gen = torch.Generator().manual_seed(seed)
    names = {m: n for n, m in model.neurons().items()}
    res = {m: _Reservoir(SAMPLES_PER_SITE, gen) for m in names}
    seen = 0
    model.eval()
    for batch in images:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if seen >= max_images:
            break
        x = x[: max_images - seen]
        if device is not None:
            x = x.to(device)
        model.ann_forward(x, record=lambda n, a: res[n].add(a))
        seen += x.shape[0]
    if seen == 0:
        raise ConversionError("calibration set is empty: pass at least one image "
                              "(--calib-images N with N >= 1 and a non-empty dataset)")
    thresholds = {}
    for neuron, r in res.items():
        theta = choose_threshold(r.values(), neuron, method, percentile, r.max)
        neuron.threshold.fill_(theta)
        thresholds[names[neuron]] = theta
    logger.info("calibrated %d neurons on %d images (%s)", len(thresholds), seen, method)
    return thresholds
