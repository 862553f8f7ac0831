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
token is done. After conversion, ``HaltingConfig(score='mean')`` reads the running mean
of that channel (the converted default, ``'convergence'``, ignores it: pass
``--halting-score mean``, and the fine-tune's alpha 1 / beta -2 as a start); ``stas-tune
--halting-score mean`` then sets alpha/beta/eps for the block-and-timestep window of the SNN.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stas_core.errors import ConfigError

from .ann import fit_ann

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

    if epochs < 1:
        raise ConfigError(f"halting_finetune must be >= 1 epochs to run; got {epochs}")
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"eps must be in [0, 1); got {eps}")
    prefix = int(vit.num_prefix_tokens)

    def forward(model: nn.Module, x: Tensor):
        logits, ponder, depth = adaptive_forward(model, x, alpha=alpha, beta=beta, eps=eps)
        return logits, delta_p * ponder, {"mean_depth": depth[:, prefix:].mean()}

    history = fit_ann(vit, loader, epochs, lr=lr, warmup_steps=max(1, len(loader) // 10),
                      forward=forward, desc="halting fine-tune", device=device,
                      progress=progress)
    for record in history:
        record["of_blocks"] = len(vit.blocks)
        logger.info("halting fine-tune epoch %d: loss %.4f top-1 %.4f depth %.2f of %d",
                    record["epoch"], record["loss"], record["train_top1"],
                    record["mean_depth"], len(vit.blocks))
    vit.eval()
    return history
