"""Shared test utilities."""
import os
from pathlib import Path
from typing import Iterable, Union

import pytest
import torch
from torch import nn

from stas_core.data import SYSTEM_FASHION_MNIST_DIR

FMNIST_MISSING = "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
#: Under CI (``CI=true``) a missing system component fails the test instead of skipping it:
#: ``.ci/run`` installs Fashion-MNIST and PostgreSQL, so a skip there would hide a failure.
IN_CI = os.environ.get("CI", "").lower() == "true"


def have_fmnist() -> bool:
    return Path(os.environ.get("STAS_FASHION_MNIST_DIR", SYSTEM_FASHION_MNIST_DIR)).is_dir()


def missing(reason: str) -> None:
    """Skip the test for a missing system component, or fail it under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: .ci/run must install it)", pytrace=False)
    pytest.skip(reason)


#: Under CI the marked test always runs, so missing data fails it with the loader's error.
needs_fmnist = pytest.mark.skipif(not IN_CI and not have_fmnist(), reason=FMNIST_MISSING)


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


def tiny_converted_vit(images: int = 2, timesteps: int = 3, seed: int = 0, depth: int = 2,
                       **vit_kwargs):
    """A calibrated converted ViT (``depth`` blocks) on 28x28 inputs and its calibration batch."""
    import timm

    from convert.calibrate import calibrate
    from convert.spiking_vit import SpikingViT

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                            num_classes=10, depth=depth, embed_dim=48, num_heads=3,
                            **vit_kwargs).eval()
    snn = SpikingViT(vit, timesteps=timesteps)
    x = torch.randn(images, 1, 28, 28)
    calibrate(snn, [x])
    return snn, x
