"""Load a spiking model from either kind of checkpoint: ``stas-train`` or ``stas-convert``.

Lives in ``convert`` because it must know both formats (``convert`` may import
``stas_core``, never the reverse).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from halting import HaltingConfig
from stas_core.checkpoint import read_header
from stas_core.errors import CheckpointError

from . import pipeline

DIRECT, CONVERTED = "direct", "converted"


@dataclass
class LoadedModel:
    """A model ready for inference and what its checkpoint says about it."""

    model: nn.Module
    kind: str                        # 'direct' or 'converted'
    name: str                        # registry / timm model name
    dataset: Optional[str]
    timesteps: int
    halting: Optional[HaltingConfig]  # the knobs a stage-2 (halting) run was trained with


def checkpoint_kind(path: str | os.PathLike) -> str:
    """'direct' or 'converted', from the checkpoint's format field (clear error otherwise)."""
    from stas_core.train import CHECKPOINT_FORMAT

    fmt = read_header(path).get("format")
    if fmt == CHECKPOINT_FORMAT:
        return DIRECT
    if fmt == pipeline.FORMAT:
        return CONVERTED
    raise CheckpointError(f"{path} is neither a stas-train checkpoint ({CHECKPOINT_FORMAT}) nor "
                          f"a stas-convert model ({pipeline.FORMAT}); its format is {fmt!r}")


def load_spiking_model(path: str | os.PathLike,
                       device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model saved at ``path`` (either kind), in eval mode."""
    if checkpoint_kind(path) == CONVERTED:
        snn = pipeline.load_converted(path, device)
        header = read_header(path)
        return LoadedModel(snn, CONVERTED, header["timm_model"], header.get("dataset"),
                           snn.timesteps, None)
    from stas_core.train import load_trained_model

    model, cfg = load_trained_model(path, device)
    return LoadedModel(model, DIRECT, cfg.model, cfg.dataset, cfg.timesteps,
                       cfg.halting_config())
