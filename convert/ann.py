"""The ANN side of a conversion: build the timm ViT for a data set, train it here, and
count its MACs. Shared by :mod:`convert.pipeline` and the A-ViT halting fine-tune
(:mod:`convert.halting_finetune`).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stas_core.data import get_dataset_info
from stas_core.energy import EnergyCosts, ann_macs
from stas_core.train import build_scheduler, progress_bar

from .timm_models import check_convertible, create_vit

if TYPE_CHECKING:
    from .pipeline import ConvertConfig

__all__ = ["build_ann", "fit_ann", "train_ann", "ann_energy"]

logger = logging.getLogger("convert.pipeline")


def build_ann(cfg: "ConvertConfig") -> nn.Module:
    """The timm ViT ``cfg`` names, sized for its data set, with its weights (pretrained,
    from a checkpoint, or fresh); refused when it cannot be converted."""
    info = get_dataset_info(cfg.dataset)
    kwargs = dict(cfg.model_kwargs)
    if cfg.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.pretrained_file)
    vit = create_vit(cfg.model, img_size=kwargs.pop("img_size", info.img_size),
                     in_chans=kwargs.pop("in_chans", info.in_chans),
                     num_classes=kwargs.pop("num_classes", info.num_classes),
                     pretrained=cfg.pretrained or bool(cfg.pretrained_file),
                     checkpoint=cfg.checkpoint, model_kwargs=kwargs)
    check_convertible(vit)
    return vit


def fit_ann(vit: nn.Module, loader: DataLoader, epochs: int, *, lr: float, warmup_steps: int,
            forward, desc: str, device, progress: Optional[bool] = None) -> list[dict]:
    """The ANN training loop shared by :func:`train_ann` and the halting fine-tune: AdamW
    (wd 0.05), timm's warmup + cosine by step, label-smoothed (0.1) cross-entropy plus what
    ``forward(vit, x) -> (logits, extra_loss, extras)`` adds (``extras``: per-batch means
    to average over the epoch). Returns per epoch ``{"epoch", "loss", "train_top1",
    "seconds", **extras}``."""
    opt = torch.optim.AdamW(vit.parameters(), lr=lr, weight_decay=0.05)
    sched = build_scheduler(opt, epochs * len(loader), warmup_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    history = []
    for epoch in range(epochs):
        vit.train()
        bar = progress_bar(progress, len(loader), f"{desc} {epoch + 1}/{epochs}", True)
        seen = correct = loss_sum = 0.0
        sums: dict[str, float] = {}
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            logits, extra_loss, extras = forward(vit, x)
            loss = loss_fn(logits, y) + extra_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update(epoch * len(loader) + step + 1)
            seen += len(y)
            correct += float((logits.argmax(-1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            for k, v in extras.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(y)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": correct / seen,
                        "seconds": time.perf_counter() - start,
                        **{k: v / seen for k, v in sums.items()}})
    return history


def train_ann(vit: nn.Module, loader: DataLoader, epochs: int, *, lr: float, device,
              progress: Optional[bool] = None) -> list[dict]:
    """Train the ANN here (AdamW, wd 0.05, warmup + cosine, label smoothing 0.1)."""
    history = []
    for r in fit_ann(vit, loader, epochs, lr=lr, warmup_steps=max(1, len(loader) // 5),
                     forward=lambda m, x: (m(x), 0.0, {}), desc="ANN epoch", device=device,
                     progress=progress):
        record = {"epoch": r["epoch"], "train_loss": r["loss"], "train_top1": r["train_top1"],
                  "epoch_s": r["seconds"]}
        logger.info("ANN epoch %d: loss %.4f train top-1 %.4f", record["epoch"],
                    record["train_loss"], record["train_top1"])
        history.append(record)
    return history


def ann_energy(vit: nn.Module, x: Tensor, costs: Optional[EnergyCosts] = None) -> dict:
    """Per-image MACs/energy of the ANN on batch ``x`` (torch's FLOP counter, see
    :func:`stas_core.energy.ann_macs`)."""
    macs = ann_macs(vit, x)["macs"]
    return {"macs": macs, "energy_mj": (costs or EnergyCosts()).energy_pj(macs, 0.0) * 1e-9}
