"""A halting fine-tune of the ANN before conversion (A-ViT style), so that the converted
SNN inherits a halting signal that was trained to mean something.

The ANN runs its blocks with A-ViT's adaptive computation: after block ``l`` each patch
token scores ``h = sigmoid(alpha * y[0] + beta)`` from channel 0 of its output (the signal
the SNN's halting plugin reads), accumulates ``H += h`` and stops once ``H >= 1 - eps``
(forced at the last block); a stopped token keeps its value, which the other tokens still
attend to (the SNN's frozen K/V), and the class token never stops. The loss is the task
loss plus ``delta_p`` times the ponder loss ``mean(N + R)`` over patch tokens (depth plus
remainder), whose gradient reaches channel 0 through the remainders. The weights change
everywhere, so the fine-tune also keeps the accuracy up while it teaches channel 0 when a
token is done. After conversion, ``HaltingConfig(score='mean')`` (the converted default)
reads the running mean of that channel; ``stas-tune`` then sets alpha/beta/eps for the
block-and-timestep window of the SNN.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stas_core.errors import ConfigError

logger = logging.getLogger(__name__)


def adaptive_forward(vit: nn.Module, x: Tensor, *, alpha: float, beta: float, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, ponder loss, per-token depth ``[B, N]``) of a timm ViT run with A-ViT
    token halting over its blocks."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    b, n, _ = h.shape
    prefix = int(vit.num_prefix_tokens)
    free = torch.ones(b, n, dtype=torch.bool, device=h.device)
    free[:, :prefix] = False  # the class token never stops
    mask = torch.ones_like(free)
    H = torch.zeros(b, n, dtype=h.dtype, device=h.device)
    R = torch.zeros_like(H)
    N = torch.zeros_like(H)
    depth = len(vit.blocks)
    for l, blk in enumerate(vit.blocks):
        y = blk(h)
        h = torch.where(mask.unsqueeze(-1), y, h)  # stopped tokens keep their value
        score = torch.sigmoid(alpha * h[..., 0] + beta) * free.to(h.dtype)
        if l == depth - 1:
            score = free.to(h.dtype)
        live = (mask & free).to(h.dtype)
        reached = (H + score >= 1.0 - eps) & mask & free
        R = R + torch.where(reached, 1.0 - H, torch.zeros_like(H))
        N = N + live
        H = H + score * live
        mask = mask & ~reached
    logits = vit.forward_head(vit.norm(h))
    ponder = (N + R)[:, prefix:].mean()
    return logits, ponder, N


def halting_finetune(vit: nn.Module, loader: DataLoader, epochs: int, *, lr: float,
                     alpha: float, beta: float, eps: float, delta_p: float, device,
                     progress: Optional[bool] = None) -> list[dict]:
    """Fine-tune ``vit`` in place for ``epochs`` with the task loss plus ``delta_p`` times
    A-ViT's ponder loss (AdamW, warmup + cosine, label smoothing 0.1). Returns one record
    per epoch: loss, train top-1 and mean patch-token depth."""
    from stas_core.train import build_scheduler, progress_bar

    if epochs < 1:
        raise ConfigError(f"halting_finetune must be >= 1 epochs to run; got {epochs}")
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"eps must be in [0, 1); got {eps}")
    opt = torch.optim.AdamW(vit.parameters(), lr=lr, weight_decay=0.05)
    sched = build_scheduler(opt, epochs * len(loader), max(1, len(loader) // 10))
    task = nn.CrossEntropyLoss(label_smoothing=0.1)
    history = []
    prefix = int(vit.num_prefix_tokens)
    for epoch in range(epochs):
        vit.train()
        bar = progress_bar(progress, len(loader), f"halting fine-tune {epoch + 1}/{epochs}", True)
        seen = correct = loss_sum = depth_sum = 0.0
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            logits, ponder, depth = adaptive_forward(vit, x, alpha=alpha, beta=beta, eps=eps)
            loss = task(logits, y) + delta_p * ponder
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update(epoch * len(loader) + step + 1)
            seen += len(y)
            correct += float((logits.argmax(-1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            depth_sum += float(depth[:, prefix:].mean()) * len(y)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": correct / seen,
                  "mean_depth": depth_sum / seen, "of_blocks": len(vit.blocks),
                  "seconds": time.perf_counter() - start}
        logger.info("halting fine-tune epoch %d: loss %.4f top-1 %.4f depth %.2f of %d",
                    epoch + 1, record["loss"], record["train_top1"], record["mean_depth"],
                    len(vit.blocks))
        history.append(record)
    vit.eval()
    return history
