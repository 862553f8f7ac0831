"""A timm Vision Transformer rebuilt as a spiking transformer (mean framing, ECMT style).

Per timestep, every Linear (qkv, proj, fc1, fc2, head) reads graded spikes of a
multi-threshold neuron; so do the spike-by-spike products Q K^T and attn V; LayerNorm,
softmax and GELU are expectation-compensated. The image enters through the patch
embedding once (I-SPS: its tokens are cached and re-fed at every step). After ``t`` steps
the mean readout converges to the ANN's logits as ``t`` grows.

The same module also runs the ANN exactly (:meth:`SpikingViT.ann_forward`), which is how
thresholds are calibrated and how a test proves the rebuild is faithful.
The model implements the haltable-model protocol of ``halting.protocol``.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from halting.protocol import HaltingDefaults

from .errors import ConversionError
from .ops import (Compensated, CompensatedMatMul, HeldRows, MultiThresholdNeuron, ProductRows,
                  KernelLayerNorm, gelu_fn, softmax_fn)

Recorder = Optional[Callable[[nn.Module, Tensor], None]]
HALTED_KV = ("frozen", "drop")
DROPPED_SCORE = -1e4  # a halted key's attention score in 'drop' mode: its weight goes to 0


def _linear_with_scale(linear: nn.Linear, ls: nn.Module) -> nn.Linear:
    """Copy of ``linear`` with a following LayerScale folded into its weights."""
    out = copy.deepcopy(linear)
    gamma = getattr(ls, "gamma", None)
    if gamma is not None:
        with torch.no_grad():
            out.weight.mul_(gamma.detach()[:, None])
            if out.bias is not None:
                out.bias.mul_(gamma.detach())
    return out


def _events(linear: nn.Linear, source: MultiThresholdNeuron) -> nn.Linear:
    """Mark ``linear`` as reading ``source``'s spikes, for the op counter (one AC per spike
    and synapse; the reference is kept out of the module tree)."""
    linear.stas_input = "events"
    object.__setattr__(linear, "stas_source", source)
    return linear


class ConvertedBlock(nn.Module):
    """One timm ``Block`` (pre-norm attention + MLP) as a spiking block."""

    def __init__(self, blk: nn.Module, levels: int) -> None:
        super().__init__()
        attn, mlp = blk.attn, blk.mlp
        self.num_heads, self.scale = attn.num_heads, float(attn.scale)
        self.norm1 = Compensated(KernelLayerNorm.converted(blk.norm1))
        self.in_qkv = MultiThresholdNeuron(levels)
        self.qkv = _events(copy.deepcopy(attn.qkv), self.in_qkv)
        self.n_q, self.n_k, self.n_v = (MultiThresholdNeuron(levels) for _ in range(3))
        self.qk = CompensatedMatMul()
        self.softmax = Compensated(softmax_fn(self.scale), "softmax")
        self.n_attn = MultiThresholdNeuron(levels)
        self.av = CompensatedMatMul()
        self.in_proj = MultiThresholdNeuron(levels)
        self.proj = _events(_linear_with_scale(attn.proj, blk.ls1), self.in_proj)
        self.norm2 = Compensated(KernelLayerNorm.converted(blk.norm2))
        self.in_fc1 = MultiThresholdNeuron(levels)
        self.fc1 = _events(copy.deepcopy(mlp.fc1), self.in_fc1)
        approx = getattr(mlp.act, "approximate", "none")
        self.gelu = Compensated(gelu_fn(approx), "gelu")
        self.in_fc2 = MultiThresholdNeuron(levels)
        self.fc2 = _events(_linear_with_scale(mlp.fc2, blk.ls2), self.in_fc2)
        self.held = HeldRows(list(self.children()))
        self.reset()

    halted_kv = "frozen"  # or 'drop' (see SpikingViT.set_halted_kv)

    def reset(self) -> None:
        self.key_count = None  # steps each token has fed K/V (None: all tokens, every step)
        self.held.reset()
        self._dense = False    # this sample's state is dense (not rows)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(self._heads(t) for t in x.chunk(3, dim=-1))

    def ann(self, x: Tensor, record: Recorder = None) -> Tensor:
        """The original block on real values; ``record(neuron, input)`` sees each spike site."""
        rec = record or (lambda n, v: None)
        h = self.norm1.fn(x)
        rec(self.in_qkv, h)
        q, k, v = self._qkv(self.qkv(h))
        rec(self.n_q, q), rec(self.n_k, k), rec(self.n_v, v)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        rec(self.n_attn, attn)
        o = (attn @ v).transpose(-3, -2).flatten(-2)
        rec(self.in_proj, o)
        x = x + self.proj(o)
        h = self.norm2.fn(x)
        rec(self.in_fc1, h)
        h = self.gelu.fn(self.fc1(h))
        rec(self.in_fc2, h)
        return x + self.fc2(h)

    def step(self, x: Tensor, active: Optional[Tensor] = None, *, gather: bool = False) -> Tensor:
        """One timestep on ``x[B, N, D]``; halted tokens (``active`` False) stay unchanged,
        leave Q/K/V and keep their state.

        ``gather=True`` (with a mask) is the row execution: every per-token state of the
        block is held for the active tokens only and compacted when the active set changes
        (:class:`~convert.ops.HeldRows`), so queries, softmax rows, the MLP and every neuron
        are computed for active tokens only; halted tokens' running-mean K/V stay in a
        frozen dense buffer that active queries still attend to. Same result as the masked
        execution. Without ``gather`` the block runs dense and masked (static shapes: the
        ONNX form). One sample runs under one execution (``reset()`` between).
        """
        if gather and active is not None:
            return self._rows_step(x, active)
        if self.held.mask is not None:
            raise ConversionError("this sample started under the row (gather) execution; "
                                  "call reset() before running it masked")
        self._dense = True
        tok = None if active is None else active.unsqueeze(-1)            # [B, N, 1]
        row = None if active is None else active[:, None, :, None]        # [B, 1, N, 1]
        # compensated ops are called as modules, so the op counter's hooks see them
        h = self.in_qkv.step(self.norm1(x, tok), tok)
        q, k, v = self._qkv(self.qkv(h))
        q, k, v = self.n_q.step(q, row), self.n_k.step(k, row), self.n_v.step(v, row)
        self._count_keys(active)
        kc = None if self.key_count is None else self.key_count[:, None, None, :]
        vc = None if self.key_count is None else self.key_count[:, None, :, None]
        scores = self.qk(q, k.transpose(-2, -1), kc, row)
        if self.halted_kv == "drop" and active is not None:  # halted keys leave the softmax
            scores = scores.masked_fill(~active[:, None, None, :], DROPPED_SCORE)
        a = self.n_attn.step(self.softmax(scores, row), row)
        o = self.av(a, v, vc, row).transpose(-3, -2).flatten(-2)
        y = x + self.proj(self.in_proj.step(o, tok))
        h = self.in_fc1.step(self.norm2(y, tok), tok)
        h = self.in_fc2.step(self.gelu(self.fc1(h), tok), tok)
        y = y + self.fc2(h)
        return y if active is None else torch.where(tok, y, x)

    def _count_keys(self, active: Optional[Tensor]) -> None:
        if active is not None:
            step_count = active.to(self.qkv.weight.dtype)
            self.key_count = step_count if self.key_count is None else self.key_count + step_count
        elif self.key_count is not None:
            self.key_count = self.key_count + 1

    def _rows_step(self, x: Tensor, active: Tensor) -> Tensor:
        """The row execution of :meth:`step`: ``[M, ...]`` rows of the active tokens."""
        if self._dense:
            raise ConversionError("this sample started under the masked execution; call "
                                  "reset() before running it with gather")
        rows = self.held.update(active)
        self._count_keys(active)
        if rows.index.numel() == 0:  # nothing to compute; halted tokens pass unchanged
            return x
        dim = x.shape[-1]
        key_count = self.key_count.reshape(-1, 1).clamp(min=1)
        ctx = {kind: ProductRows(kind, rows, self.num_heads, dim, key_count, self.held.padded)
               for kind in ("qk", "av")}
        xr = rows.gather(x)                                               # [M, D]
        h = self.in_qkv.step(self.norm1(xr, rows), rows)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = self.n_q.step(q, rows), self.n_k.step(k, rows), self.n_v.step(v, rows)
        scores = self.qk(q, k, ctx["qk"])                                 # [M, H, N]
        if self.halted_kv == "drop":
            halted_keys = (~active).index_select(0, rows.index // rows.tokens)
            scores = scores.masked_fill(halted_keys[:, None, :], DROPPED_SCORE)
        a = self.n_attn.step(self.softmax(scores, rows), rows)
        o = self.av(a, v, ctx["av"])                                      # [M, D]
        y = xr + self.proj(self.in_proj.step(o, rows))
        h = self.in_fc1.step(self.norm2(y, rows), rows)
        h = self.in_fc2.step(self.gelu(self.fc1(h), rows), rows)
        return rows.scatter(y + self.fc2(h), base=x)


class SpikingViT(nn.Module):
    """Converted ViT; build it with :func:`from_timm`."""

    #: The readout (compensated norm, head neurons) must run once per timestep, on the last
    #: block's tokens. Per-step values fluctuate around their running mean, so the score
    #: reads how settled that mean is; alpha 0.5, beta -4, eps 0.01 is the operating point
    #: measured best for converted ViTs (docs/results.md: level with the fewer-timesteps
    #: hull at 0.47 of the unhalted energy; the running-mean score at alpha 1, beta -2 lost
    #: about 23 points on the same ViT).
    halting_defaults = HaltingDefaults(
        output="last", score="convergence", outputs=("last",), alpha=0.5, beta=-4.0, eps=0.01,
        why="a converted ViT's readout is stateful and must be called once per timestep "
            "on the last block's tokens")

    def __init__(self, vit: nn.Module, *, levels: int = 8, timesteps: int = 8) -> None:
        super().__init__()
        pe = vit.patch_embed
        self.img_size = tuple(pe.img_size)
        self.in_chans = pe.proj.in_channels
        self.num_classes = vit.num_classes
        self.timesteps = int(timesteps)
        self.levels = int(levels)
        self.patch_proj = copy.deepcopy(pe.proj)
        self.patch_norm = copy.deepcopy(pe.norm)
        self.patch_neuron = MultiThresholdNeuron(levels)
        prefix = [t for t in (vit.cls_token, getattr(vit, "dist_token", None)) if t is not None]
        self.prefix = nn.Parameter(torch.cat(prefix, 1).detach().clone(), requires_grad=False) \
            if prefix else None
        self.pos_embed = nn.Parameter(vit.pos_embed.detach().clone(), requires_grad=False)
        self.blocks = nn.ModuleList(ConvertedBlock(b, levels) for b in vit.blocks)
        self.norm = Compensated(KernelLayerNorm.converted(vit.norm))
        self.global_pool = vit.global_pool
        self.num_prefix_tokens = vit.num_prefix_tokens
        fc_norm = getattr(vit, "fc_norm", nn.Identity())
        self.fc_norm = None if isinstance(fc_norm, nn.Identity) \
            else Compensated(KernelLayerNorm.converted(fc_norm))
        heads = [vit.head] + ([vit.head_dist] if hasattr(vit, "head_dist") else [])
        self.head_neurons = nn.ModuleList(MultiThresholdNeuron(levels) for _ in heads)
        self.heads = nn.ModuleList(_events(copy.deepcopy(h), n)
                                   for h, n in zip(heads, self.head_neurons))
        self.requires_grad_(False)
        self._cached_tokens: Optional[Tensor] = None

    # ------------------------------------------------------------------ shared pieces
    def _check(self, x: Tensor) -> None:
        want = (self.in_chans, *self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ConversionError(f"input must be [B, {want[0]}, {want[1]}, {want[2]}]; "
                                  f"got {list(x.shape)}")

    def _patches(self, x: Tensor) -> Tensor:
        return self.patch_norm(self.patch_proj(x).flatten(2).transpose(1, 2))

    def _add_prefix(self, x: Tensor) -> Tensor:
        if self.prefix is not None:
            x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def _pool_tokens(self, x: Tensor) -> list[Tensor]:
        if len(self.heads) == 2:
            return [x[:, 0], x[:, 1]]
        if self.global_pool == "avg":
            return [x[:, self.num_prefix_tokens:].mean(1)]
        return [x[:, 0]]

    # ------------------------------------------------------------------ ANN path
    def ann_forward(self, x: Tensor, record: Recorder = None) -> Tensor:
        """The original ViT's logits, computed with this module's weights."""
        self._check(x)
        rec = record or (lambda n, v: None)
        p = self._patches(x)
        rec(self.patch_neuron, p)
        h = self._add_prefix(p)
        for blk in self.blocks:
            h = blk.ann(h, record)
        h = self.norm.fn(h)
        outs = []
        for tok, neuron, head in zip(self._pool_tokens(h), self.head_neurons, self.heads):
            if self.fc_norm is not None:
                tok = self.fc_norm.fn(tok)
            rec(neuron, tok)
            outs.append(head(tok))
        return sum(outs) / len(outs)

    # ------------------------------------------------------------------ haltable protocol
    def reset(self) -> None:
        """Clear every neuron and compensation state, and the cached patch tokens."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset"):
                m.reset()
        self._cached_tokens = None

    def tokens(self, x: Tensor, t: int) -> Tensor:
        """Input tokens of timestep ``t``: graded spikes of the (cached) patch embedding,
        with the class token(s) and position embedding added."""
        if t == 0 or self._cached_tokens is None:
            self._check(x)
            self._cached_tokens = self._patches(x)
        return self._add_prefix(self.patch_neuron.step(self._cached_tokens))

    def readout(self, per_token_out: Tensor) -> Tensor:
        """Logits of one timestep (stateful: call once per timestep, in order); their mean
        over timesteps is the SNN's answer."""
        h = self.norm(per_token_out)
        outs = []
        for tok, neuron, head in zip(self._pool_tokens(h), self.head_neurons, self.heads):
            if self.fc_norm is not None:
                tok = self.fc_norm(tok)
            outs.append(head(neuron.step(tok)))
        return sum(outs) / len(outs)

    def forward(self, x: Tensor, timesteps: Optional[int] = None) -> Tensor:
        """Mean logits over ``timesteps`` (default ``self.timesteps``) spiking steps."""
        from halting.protocol import run_stepwise

        return run_stepwise(self, x, timesteps or self.timesteps)

    def compile(self, enabled: bool = True) -> "SpikingViT":  # type: ignore[override]
        """Run this model's per-step element-wise work (compensation updates, and the
        neurons where the single-pass CPU kernel does not run, e.g. on CUDA) through
        ``torch.compile`` with dynamic shapes, halted runs included (the row execution's
        changing row counts share one graph). Other models are unaffected.
        Needs a C++ compiler; the first steps compile (about a minute), results are the
        eager ones within rounding (tested). ``enabled=False`` goes back to eager."""
        for m in self.modules():
            if hasattr(m, "compiled"):
                m.compiled = bool(enabled)
        return self

    def set_halting_refills(self, refills: bool) -> None:
        """Halting protocol hint, for this sample (``reset()`` restores True): False
        promises that no stopped token becomes active again (accumulation ``'both'`` and
        ``'time'``), so the row execution drops a stopped token's state instead of parking
        it for a return that never comes. A broken promise is an error, never a wrong
        result."""
        for blk in self.blocks:
            blk.held.refills = bool(refills)

    def set_halted_kv(self, mode: str) -> "SpikingViT":
        """What the other tokens see of a halted token: ``'frozen'`` (default) keeps its
        running-mean key/value in attention, not recomputed; ``'drop'`` removes it from the
        softmax (its cumulative attention weight is compensated back to zero)."""
        if mode not in HALTED_KV:
            raise ConversionError(f"halted_kv must be one of {', '.join(HALTED_KV)}; got {mode!r}")
        for blk in self.blocks:
            blk.halted_kv = mode
        return self

    def neurons(self) -> dict[str, MultiThresholdNeuron]:
        return {n: m for n, m in self.named_modules() if isinstance(m, MultiThresholdNeuron)}
