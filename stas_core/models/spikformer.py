"""Spikformer (Zhou et al., ICLR 2023): SPS + spiking self-attention (SSA) + spiking MLP.

Every Linear/Conv is followed by BatchNorm and a LIF neuron, so blocks exchange spikes;
residuals add spikes; attention has no softmax: ``attn_lif((Q K^T) V * 0.125)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import (Active, LinearBN, MaxPool2d, SpikeMatMul, bn_fire, fire, is_rows,
                      mask_tokens)
from .base import SpikingTransformer
from .registry import register_family, register_model


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[..., N, D]`` -> ``[..., heads, N, D / heads]``."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """``[..., heads, N, d]`` -> ``[..., N, heads * d]``."""
    return x.transpose(-3, -2).flatten(-2)


class SpikingSelfAttention(nn.Module):
    """Spikformer SSA. ``(Q K^T) V`` on spike counts, scaled after the product (same value,
    integer intermediate: the op counter sees spike counts). Halted tokens (``active``
    False) send no Q/K/V spikes, so they leave attention for everyone else.
    """

    def __init__(self, dim: int, num_heads: int, neuron_layer, scale: float = 0.125,
                 attn_threshold: float = 0.5) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, scale
        self.q, self.k, self.v = LinearBN(dim, dim), LinearBN(dim, dim), LinearBN(dim, dim)
        self.q_lif, self.k_lif, self.v_lif = neuron_layer(), neuron_layer(), neuron_layer()
        self.qk, self.av = SpikeMatMul(), SpikeMatMul()
        self.attn_lif = neuron_layer(v_threshold=attn_threshold)
        self.proj = LinearBN(dim, dim)
        self.proj_lif = neuron_layer()

    def qkv_attention(self, q: Tensor, k: Tensor, v: Tensor, active: Active = None) -> Tensor:
        if is_rows(active):  # gathered rows: attention is per sample, on dense tokens
            dense = self.qkv_attention(*(active.scatter(t) for t in (q, k, v)))
            return active.gather(dense)
        h = self.num_heads
        q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
        return merge_heads(self.av(self.qk(q, k.transpose(-2, -1)), v) * self.scale)

    def forward(self, x: Tensor, active: Active = None, multi: bool = True) -> Tensor:
        x = mask_tokens(x, active)
        q = self.q.fire(self.q_lif, x, active, multi)
        k = self.k.fire(self.k_lif, x, active, multi)
        v = self.v.fire(self.v_lif, x, active, multi)
        y = fire(self.attn_lif, self.qkv_attention(q, k, v, active), active, multi)
        return self.proj.fire(self.proj_lif, y, active, multi)


class SpikingMLP(nn.Module):
    """``LIF(BN(fc2(LIF(BN(fc1(x))))))``."""

    def __init__(self, dim: int, hidden: int, neuron_layer) -> None:
        super().__init__()
        self.fc1, self.lif1 = LinearBN(dim, hidden), neuron_layer()
        self.fc2, self.lif2 = LinearBN(hidden, dim), neuron_layer()

    def forward(self, x: Tensor, active: Active = None, multi: bool = True) -> Tensor:
        x = mask_tokens(x, active)
        x = self.fc1.fire(self.lif1, x, active, multi)
        return self.fc2.fire(self.lif2, x, active, multi)


class SPS(nn.Module):
    """Spiking patch splitting: 4 x (Conv3x3 -> BN -> LIF [-> MaxPool]) + a relative position
    branch (Conv3x3 -> BN -> LIF) added to its input. ``[T, B, C, H, W] -> [T, B, N, D]``.
    """

    def __init__(self, in_chans: int, embed_dim: int, n_pools: int, neuron_layer) -> None:
        super().__init__()
        chans = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.convs, self.bns, self.lifs, self.pools = (nn.ModuleList() for _ in range(4))
        prev = in_chans
        for i, c in enumerate(chans):
            self.convs.append(nn.Conv2d(prev, c, 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(c))
            self.lifs.append(neuron_layer())
            pooled = i >= len(chans) - n_pools
            self.pools.append(MaxPool2d(3, 2, 1) if pooled else nn.Identity())
            prev = c
        self.rpe_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dim)
        self.rpe_lif = neuron_layer()

    @staticmethod
    def _lif2d(lif, y: Tensor, steps: int) -> Tensor:
        return lif.multi_step(y.unflatten(0, (steps, -1))).flatten(0, 1)

    @staticmethod
    def _bn_lif2d(bn: nn.Module, lif, y: Tensor, steps: int) -> Tensor:
        """``lif(bn(y))`` over ``[T * B, C, H, W]``, the BatchNorm in the neuron's kernel."""
        return bn_fire(lif, bn, y.unflatten(0, (steps, -1)), channel_dim=2).flatten(0, 1)

    @staticmethod
    def _images(x: Tensor) -> Tensor:
        """``[T, B, C, H, W]`` -> ``[T * B, C, H, W]`` in channels-last memory: convolutions,
        BatchNorms and pools run faster on it on the CPU (measured: the conv stack's forward +
        backward -28%), the neurons run on its memory order, and the tokens come out of it
        without a copy."""
        return x.flatten(0, 1).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def _conv(conv: nn.Module, y: Tensor) -> Tensor:
        """``conv(y)`` kept channels-last (a one-channel input is both layouts at once, and
        the convolution then picks the other)."""
        return conv(y).contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        steps = x.shape[0]
        y = self._images(x)
        for conv, bn, lif, pool in zip(self.convs, self.bns, self.lifs, self.pools):
            y = pool(self._bn_lif2d(bn, lif, self._conv(conv, y), steps))
        y = y + self._bn_lif2d(self.rpe_bn, self.rpe_lif, self.rpe_conv(y), steps)
        return y.flatten(2).transpose(1, 2).unflatten(0, (steps, -1))


@register_family("spikformer")
class Spikformer(SpikingTransformer):
    """Spikformer backbone; see :class:`SpikingTransformer` for the shared arguments.

    ``sps_layer``, ``attn_layer`` and ``mlp_layer`` may be swapped (timm style).
    """

    def __init__(self, *, sps_layer=SPS, attn_layer=SpikingSelfAttention,
                 mlp_layer=SpikingMLP, **kwargs) -> None:
        super().__init__(**kwargs)
        self._build(sps_layer, attn_layer, mlp_layer)


@register_model
def spikformer_2_128(**kwargs) -> Spikformer:
    """Small CPU config: 2 blocks, dim 128, 4 heads."""
    return Spikformer(depth=2, embed_dim=128, **{"num_heads": 4, **kwargs})


@register_model
def spikformer_4_384(**kwargs) -> Spikformer:
    """CIFAR config of the paper: 4 blocks, dim 384, 12 heads."""
    return Spikformer(depth=4, embed_dim=384, **{"num_heads": 12, **kwargs})


@register_model
def spikformer_8_384(**kwargs) -> Spikformer:
    return Spikformer(depth=8, embed_dim=384, **{"num_heads": 12, **kwargs})


@register_model
def spikformer_8_512(**kwargs) -> Spikformer:
    """ImageNet config: 8 blocks, dim 512, 8 heads (default input 3x224x224)."""
    kwargs = {"num_heads": 8, "img_size": 224, "num_classes": 1000, **kwargs}
    return Spikformer(depth=8, embed_dim=512, **kwargs)


@register_model
def spikformer_8_768(**kwargs) -> Spikformer:
    kwargs = {"num_heads": 12, "img_size": 224, "num_classes": 1000, **kwargs}
    return Spikformer(depth=8, embed_dim=768, **kwargs)
