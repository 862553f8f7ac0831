"""Spikingformer (Zhou et al. 2023): membrane shortcuts with pre-activation units.

Each unit is ``LIF -> Linear/Conv -> BN``: every weight layer reads spikes (no
non-spike matrix products), while the residual stream carries membrane values
(real-valued BN outputs). The readout averages that stream, so the head is a real-valued
(MAC) layer.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..layers import Active, LinearBN, fire
from .base import SpikingTransformer
from .registry import register_family, register_model
from .spikformer import SpikingSelfAttention, SPS


class PreSpikingSelfAttention(SpikingSelfAttention):
    """``LIF -> {Q,K,V} -> attention -> attn_lif -> proj -> BN`` (output: membrane)."""

    def __init__(self, dim: int, num_heads: int, neuron_layer, **kwargs) -> None:
        super().__init__(dim, num_heads, neuron_layer, **kwargs)
        self.proj_lif = nn.Identity()
        self.pre_lif = neuron_layer()

    def forward(self, x: Tensor, active: Active = None, multi: bool = True) -> Tensor:
        s = fire(self.pre_lif, x, active, multi)
        q = fire(self.q_lif, self.q(s, active), active, multi)
        k = fire(self.k_lif, self.k(s, active), active, multi)
        v = fire(self.v_lif, self.v(s, active), active, multi)
        y = fire(self.attn_lif, self.qkv_attention(q, k, v, active), active, multi)
        return self.proj(y, active)


class PreSpikingMLP(nn.Module):
    """``BN(fc2(LIF(BN(fc1(LIF(x))))))`` (output: membrane)."""

    def __init__(self, dim: int, hidden: int, neuron_layer) -> None:
        super().__init__()
        self.lif1, self.fc1 = neuron_layer(), LinearBN(dim, hidden)
        self.lif2, self.fc2 = neuron_layer(), LinearBN(hidden, dim)

    def forward(self, x: Tensor, active: Active = None, multi: bool = True) -> Tensor:
        x = self.fc1(fire(self.lif1, x, active, multi), active)
        return self.fc2(fire(self.lif2, x, active, multi), active)


class PreSPS(SPS):
    """Spikingformer patch splitting: ``Conv -> BN`` on the image, then ``LIF -> Conv -> BN``
    stages (max-pooled on membrane) and a ``LIF -> Conv -> BN`` position branch."""

    def forward(self, x: Tensor) -> Tensor:
        steps = x.shape[0]
        y = self._images(x)
        for i, (conv, bn, lif, pool) in enumerate(zip(self.convs, self.bns, self.lifs, self.pools)):
            if i > 0:
                y = self._lif2d(lif, y, steps)
            y = pool(bn(self._conv(conv, y)))
        y = y + self.rpe_bn(self.rpe_conv(self._lif2d(self.rpe_lif, y, steps)))
        return y.flatten(2).transpose(1, 2).unflatten(0, (steps, -1))


@register_family("spikingformer")
class Spikingformer(SpikingTransformer):
    """Spikingformer backbone; same arguments as :class:`~.spikformer.Spikformer`."""

    head_input_spiking = False

    def __init__(self, *, sps_layer=PreSPS, attn_layer=PreSpikingSelfAttention,
                 mlp_layer=PreSpikingMLP, **kwargs) -> None:
        super().__init__(**kwargs)
        self._build(sps_layer, attn_layer, mlp_layer)
        self.patch_embed.lifs[0] = nn.Identity()  # the first conv reads the image itself


@register_model
def spikingformer_2_128(**kwargs) -> Spikingformer:
    return Spikingformer(depth=2, embed_dim=128, **{"num_heads": 4, **kwargs})


@register_model
def spikingformer_4_384(**kwargs) -> Spikingformer:
    return Spikingformer(depth=4, embed_dim=384, **{"num_heads": 12, **kwargs})


@register_model
def spikingformer_8_512(**kwargs) -> Spikingformer:
    kwargs = {"num_heads": 8, "img_size": 224, "num_classes": 1000, **kwargs}
    return Spikingformer(depth=8, embed_dim=512, **kwargs)
