"""The skeleton every direct-trained spiking transformer shares.

``SPS (patch splitting) -> L blocks -> readout``, with two executions of one set of weights:

* multi-step (``forward``): every block runs all T timesteps at once, fastest for training;
* per-timestep (the haltable-model protocol of ``halting.protocol``): ``reset``, ``tokens``,
  ``blocks[l].step(x, active)``, ``readout``, driven ``for t: for l:`` by
  :func:`halting.protocol.run_stepwise` or by the halting plugin.

I-SPS (``sps='integrated'``): a static image goes through the patch-splitting stack once and
the same token set is fed at every timestep; a time-varying input ``[T, B, C, H, W]`` goes
through it frame by frame and is integrated (``max`` or ``mean`` over time) into one token
set. ``sps='vanilla'`` runs the stack at every timestep (the Spikformer baseline).
``integrate='learned'`` integrates by a learned weighted sum: softmax weights over the
``timesteps`` frames (initialised equal, i.e. the mean), trained with the model.

Frames come time-first (``[T, B, C, H, W]``); a model built with ``batch_first=True`` takes
``[B, T, C, H, W]`` instead, the layout an event loader's batches have (every batch-first
tool, e.g. op counting over ``images[:n]``, then works on event batches unchanged).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_choice, check_positive_int
from ..layers import TokenRows, keep_inactive
from ..neurons import LIF, make_surrogate, reset_net

SPS_MODES = ("integrated", "vanilla")
INTEGRATE_MODES = ("max", "mean", "learned")


def make_neuron_layer(*, tau: float = 2.0, backend: str = "fused", surrogate: str = "sigmoid",
                      surrogate_alpha: Optional[float] = None, detach_reset: bool = True,
                      reset: str = "hard", v_reset: float = 0.0) -> Callable[..., LIF]:
    """A ``neuron_layer`` factory (LIF with these settings; ``v_threshold`` may be overridden).

    ``reset='soft'`` subtracts the threshold; ``'hard'`` sets the membrane to ``v_reset``.
    """
    check_choice("reset", reset, ("hard", "soft"))
    return functools.partial(LIF, tau, backend=backend, detach_reset=detach_reset,
                             v_reset=None if reset == "soft" else v_reset,
                             surrogate=make_surrogate(surrogate, surrogate_alpha))


def pools_for(img_size: int) -> int:
    """Number of 2x max-pools in SPS: 28/32 px -> 7/8 tokens a side, 224 px -> 14."""
    return 2 if img_size <= 64 else 4


class TransformerBlock(nn.Module):
    """``x + attn(x)`` then ``x + mlp(x)``; halted tokens pass through unchanged."""

    def __init__(self, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp

    def run(self, x: Tensor, active: Optional[Tensor], multi: bool) -> Tensor:
        x = keep_inactive(x + self.attn(x, active, multi), x, active)
        return keep_inactive(x + self.mlp(x, active, multi), x, active)

    def forward(self, x: Tensor) -> Tensor:
        """Multi-step: ``x[T, B, N, D]``."""
        return self.run(x, None, True)

    def step(self, x: Tensor, active: Optional[Tensor] = None, *, gather: bool = False) -> Tensor:
        """One timestep: ``x[B, N, D]``, ``active[B, N]`` bool (None: all tokens).

        ``gather=True`` computes the active tokens only (rows ``[M, D]``; attention scatters
        Q/K/V back per sample); the result equals the masked (dense) execution.
        """
        if not gather or active is None:
            return self.run(x, active, False)
        rows = TokenRows.from_mask(active)
        if rows.index.numel() == 0:  # no active token in the batch: nothing to compute
            return x
        return rows.scatter(self.run(rows.gather(x), rows, False), base=x)


class SpikingTransformer(nn.Module):
    """Base of the Spikformer / Spikingformer families (see module docstring).

    Subclasses call :meth:`_build` with their patch-splitting (``[T, B, C, H, W]`` to
    ``[T, B, N, D]`` tokens), attention and MLP layers.
    """

    head_input_spiking = True

    def __init__(self, *, img_size: int = 32, in_chans: int = 3, num_classes: int = 10,
                 embed_dim: int = 384, depth: int = 4, num_heads: Optional[int] = None,
                 mlp_ratio: float = 4.0, timesteps: int = 4, sps: str = "integrated",
                 integrate: str = "max", neuron_layer: Optional[Callable[..., LIF]] = None,
                 bn_init: Optional[float] = None, batch_first: bool = False,
                 **neuron_kwargs) -> None:
        super().__init__()
        self.img_size = check_positive_int("img_size", img_size)
        self.in_chans = check_positive_int("in_chans", in_chans)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.depth = check_positive_int("depth", depth)
        self.timesteps = check_positive_int("timesteps", timesteps)
        self.sps = check_choice("sps", sps, SPS_MODES)
        self.integrate = check_choice("integrate", integrate, INTEGRATE_MODES)
        self.batch_first = bool(batch_first)
        if self.integrate == "learned":  # logits of the frame weights; zeros: the mean
            self.frame_logits = nn.Parameter(torch.zeros(self.timesteps))
        self.num_heads = num_heads if num_heads is not None else max(1, embed_dim // 32)
        if embed_dim % 8 or embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim must be divisible by 8 and by num_heads "
                              f"({self.num_heads}); got {embed_dim}")
        self.n_pools = pools_for(img_size)
        if img_size % (2 ** self.n_pools):
            raise ConfigError(f"img_size must be divisible by {2 ** self.n_pools}; got {img_size}")
        self.grid = img_size // 2 ** self.n_pools
        self.num_tokens = self.grid * self.grid
        self.mlp_ratio = mlp_ratio
        self.neuron_layer = neuron_layer or make_neuron_layer(**neuron_kwargs)
        # A LIF integrates X / tau per step, so unit-variance pre-activations rarely reach the
        # threshold in the first steps (I-SPS runs its stack for a single step). BatchNorm
        # scales starting at tau fix that; short CPU runs learn several times faster.
        self.bn_init = float(bn_init if bn_init is not None else neuron_kwargs.get("tau", 2.0))
        self._cached_tokens: Optional[Tensor] = None

    def _build(self, sps_layer, attn_layer, mlp_layer) -> None:
        """Patch splitting, ``depth`` blocks, head and weight init from the family's layers."""
        nl, dim = self.neuron_layer, self.embed_dim
        self.patch_embed = sps_layer(self.in_chans, dim, self.n_pools, nl)
        hidden = int(dim * self.mlp_ratio)
        self.blocks = nn.ModuleList(
            TransformerBlock(attn_layer(dim, self.num_heads, nl), mlp_layer(dim, hidden, nl))
            for _ in range(self.depth))
        self._finish_init()

    def _finish_init(self) -> None:
        """Head and weight init (BatchNorm scales start at ``bn_init``)."""
        self.head = nn.Linear(self.embed_dim, self.num_classes)
        if self.head_input_spiking:  # mean of spike counts: accumulate, don't multiply
            self.head.stas_input = "spike"
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.constant_(m.weight, self.bn_init)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ input handling
    def _frames(self, x: Tensor) -> Tensor:
        """Validate input and return it time-first: ``[F, B, C, H, W]`` (F=1 for a static image)."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() not in (4, 5) or tuple(x.shape[-3:]) != expected:
            order = "[B, T, ...]" if self.batch_first else "[T, B, ...]"
            raise ConfigError(
                f"input must be [B, {expected[0]}, {expected[1]}, {expected[2]}] (static image) "
                f"or {order} (time-varying); got {list(x.shape)}. Build the model with the "
                f"dataset's img_size/in_chans.")
        if x.dim() == 4:
            frames = x.unsqueeze(0)
        else:
            frames = x.transpose(0, 1) if self.batch_first else x
        if self.sps == "vanilla" and frames.shape[0] not in (1, self.timesteps):
            raise ConfigError(f"vanilla SPS needs 1 or timesteps={self.timesteps} frames; "
                              f"got {frames.shape[0]}")
        if self.integrate == "learned" and frames.shape[0] not in (1, self.timesteps):
            raise ConfigError(f"integrate='learned' weighs timesteps={self.timesteps} frames; "
                              f"got {frames.shape[0]}")
        return frames

    def _integrate(self, tok_seq: Tensor) -> Tensor:
        if tok_seq.shape[0] == 1:
            return tok_seq[0]
        if self.integrate == "learned":
            w = self.frame_logits.softmax(0).to(tok_seq.dtype)
            return torch.einsum("f,f...->...", w, tok_seq)
        return tok_seq.amax(0) if self.integrate == "max" else tok_seq.mean(0)

    # ------------------------------------------------------------------ multi-step path
    def embed(self, x: Tensor) -> Tensor:
        """Input tokens for all timesteps, ``[T, B, N, D]`` (I-SPS: one tensor, expanded)."""
        frames = self._frames(x)
        if self.sps == "integrated":
            tok = self._integrate(self.patch_embed(frames))
            return tok.unsqueeze(0).expand(self.timesteps, *tok.shape)
        if frames.shape[0] == 1:
            frames = frames.expand(self.timesteps, *frames.shape[1:])
        return self.patch_embed(frames)

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens after the last block, ``[T, B, N, D]``; starts from reset neurons."""
        self.reset()
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits from ``[T, B, N, D]`` tokens: mean over tokens, head, mean over time."""
        return self.head(x.mean(-2)).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, classes]``; each call starts from reset neurons."""
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ haltable protocol
    def reset(self) -> None:
        """Clear all neuron state and the I-SPS token cache."""
        reset_net(self)
        self._cached_tokens = None

    def tokens(self, x: Tensor, t: int) -> Tensor:
        """Input tokens of timestep ``t``, ``[B, N, D]`` (I-SPS: computed at t=0, reused)."""
        if self.sps == "integrated":
            if t == 0 or self._cached_tokens is None:
                self._cached_tokens = self._integrate(self.patch_embed(self._frames(x)))
            return self._cached_tokens
        frames = self._frames(x)
        frame = frames[0] if frames.shape[0] == 1 else frames[t]
        return self.patch_embed(frame.unsqueeze(0))[0]

    def readout(self, per_token_out: Tensor) -> Tensor:
        """Logits ``[B, classes]`` of one timestep's (or a mean-field) ``[B, N, D]`` tokens."""
        return self.head(per_token_out.mean(-2))

