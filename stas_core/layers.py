"""Small layers shared by the spiking transformer families.

Everything here works on token tensors with any leading shape ``[..., N, D]`` so that the
same module serves the multi-step path (``[T, B, N, D]``) and the single-step path
(``[B, N, D]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from . import kernels as _kernels
from .kernels import switched_off
from .neurons import LIF


@dataclass(frozen=True)
class TokenRows:
    """The active tokens of a ``[B, N, ...]`` step, gathered into rows ``[M, ...]``.

    The ``gather`` execution of token halting computes only these rows; per-token layers
    see ``[M, D]`` and need no mask (every row is active). ``index`` holds the positions of
    the active tokens in the flattened ``B * N`` tokens.
    """

    index: Tensor
    batch: int
    tokens: int
    full: bool = False  #: every token is active: the rows are the tokens, in order

    @classmethod
    def from_mask(cls, active: Tensor) -> "TokenRows":
        b, n = active.shape
        index = active.reshape(-1).nonzero().squeeze(1)
        return cls(index, b, n, index.numel() == b * n)

    def gather(self, x: Tensor) -> Tensor:
        """``[B, N, ...]`` -> the active rows ``[M, ...]`` (a view when every token is)."""
        if self.full:
            return x.flatten(0, 1)
        return x.flatten(0, 1).index_select(0, self.index)

    def scatter(self, rows: Tensor, base: Optional[Tensor] = None) -> Tensor:
        """Rows ``[M, ...]`` back to ``[B, N, ...]``; other tokens from ``base`` (or zero)."""
        if self.full:  # every token is a row: nothing of base is kept
            return rows.unflatten(0, (self.batch, self.tokens))
        if base is None:
            flat = rows.new_zeros(self.batch * self.tokens, *rows.shape[1:])
        else:
            flat = base.flatten(0, 1)
        return flat.index_copy(0, self.index, rows).unflatten(0, (self.batch, self.tokens))


Active = Optional[Union[Tensor, TokenRows]]
"""What per-token layers receive: None (all tokens), a ``[B, N]`` bool mask, or rows."""


def is_rows(active: Active) -> bool:
    return isinstance(active, TokenRows)


class TokenBN(nn.BatchNorm1d):
    """BatchNorm over the channel (last) dimension of ``[..., D]`` tokens.

    Equivalent to Spikformer's ``Conv1d(k=1) -> BatchNorm1d`` over ``[T*B, D, N]``. With an
    ``active`` mask in training mode, batch statistics come from active tokens only, so
    halted tokens neither shift the statistics nor receive updates.
    """

    def forward(self, x: Tensor, active: Active = None) -> Tensor:  # type: ignore[override]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if active is None or is_rows(active) or not self.training:
            return self._norm(flat).reshape(shape)
        keep = active.reshape(-1).to(torch.bool)
        out = flat.clone()
        out[keep] = self._norm(flat[keep])  # always called: subclasses may sync across ranks
        return out.reshape(shape)

    def _norm(self, flat: Tensor) -> Tensor:
        """BatchNorm of ``[M, D]`` rows (overridden for cross-process statistics). Fewer
        than two rows (nearly every token halted) have no batch statistics: the running
        ones are used then, and not updated. Under autocast the statistics are computed in
        float32 (a float16 sum of squares overflows) and the output keeps the input dtype."""
        if flat.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(flat.device.type, enabled=False):
                return self._norm(flat.float()).to(flat.dtype)
        if self.training and flat.shape[0] < 2:
            return F.batch_norm(flat, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        return super().forward(flat)


class SpikeMatMul(nn.Module):
    """``a @ b`` as a module, so the op counter sees spike-driven products (Q K^T, attn V)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b


_ONEDNN: dict = {}  # "op": the checked oneDNN linear, or None; filled on first use


def _onednn_linear_op():
    """``torch.ops.mkldnn._linear_pointwise`` where this build has it and it agrees with
    ``F.linear`` on a probe (checked once); None otherwise or with ``STAS_ONEDNN_LINEAR=0``."""
    if "op" in _ONEDNN:
        return _ONEDNN["op"]
    _ONEDNN["op"] = None
    if switched_off("STAS_ONEDNN_LINEAR"):
        return None
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(37, 19, generator=g), torch.randn(11, 19, generator=g)
        if torch.allclose(op(x, w, None, "none", [], ""), F.linear(x, w), rtol=1e-5, atol=1e-5):
            _ONEDNN["op"] = op
    except (RuntimeError, TypeError):  # an op of another signature, or not built for this CPU
        pass
    return _ONEDNN["op"]


#: fewest rows for which :class:`Linear` takes oneDNN: below a few thousand rows its
#: per-call overhead made it slower than ATen's MKL GEMM (measured on an Intel Xeon, K = 64:
#: 1.1-2.3x slower at 256-4096 rows, even or faster from 25,088), which is the size of the
#: halted rows of the gather execution
ONEDNN_MIN_ROWS = 8192


def _onednn_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether :class:`Linear` takes the oneDNN route: float32 CPU tensors of at least
    :data:`ONEDNN_MIN_ROWS` rows, no autocast, and nothing that must see the ATen ops (ONNX
    export, tracing, compilation, a dispatch mode such as the FLOP counter)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or (bias is not None and bias.dtype != torch.float32) or x.dim() < 2:
        return False
    if torch.is_autocast_enabled("cpu") or torch.onnx.is_in_onnx_export() \
            or torch.jit.is_tracing() or torch.jit.is_scripting() \
            or torch.compiler.is_compiling() or _dispatch_modes() != 0:
        return False  # before any test of a size: a tracer would turn it into a guard
    return x.numel() >= max(ONEDNN_MIN_ROWS * x.shape[-1], 1) and _onednn_linear_op() is not None


def _dispatch_modes() -> int:
    """How many ``TorchDispatchMode`` s are active (-1: this torch cannot tell, so the
    caller keeps to ATen's ops)."""
    count = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return -1 if count is None else int(count())


class _OneDNNLinearFn(torch.autograd.Function):
    """``F.linear`` by oneDNN: the forward and the input gradient as oneDNN GEMMs, the
    weight gradient by ``mm``. Same arithmetic (float32 products, float32 sums), another
    summation order."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_forward(x, weight, bias)

    @staticmethod
    @once_differentiable  # no second derivative: a clear error, not a silent zero
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_forward(g2, weight.t().contiguous(), None).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def _onednn_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = _onednn_linear_op()(rows, weight.contiguous(), bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 CPU GEMMs go through oneDNN (``STAS_ONEDNN_LINEAR=0``:
    ATen's). ATen's CPU ``mm`` is MKL's, which on some CPUs (measured: AMD EPYC with
    AVX-512) runs 1.2-1.7x slower than oneDNN on these shapes ([25088, 128] x [128, 512]:
    88 vs 101-110 GFLOP/s; x [128, 128]: 108 vs 170); the whole spikformer-2-128 training
    step -10%, inference -11%. Elsewhere (CUDA, autocast, export, compilation, FLOP
    counting) and on fewer than :data:`ONEDNN_MIN_ROWS` rows it is ``nn.Linear``. Same
    parameters and state-dict keys."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not _onednn_applies(x, self.weight, self.bias):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or (
                self.bias is not None and self.bias.requires_grad)):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        return _onednn_forward(x, self.weight, self.bias)


def _pair(v) -> tuple[int, int]:
    """``k`` or ``(k,)`` or ``(kh, kw)`` as ``(kh, kw)`` (nn.MaxPool2d's argument forms)."""
    if isinstance(v, int):
        return int(v), int(v)
    v = tuple(v)
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


class _MaxPoolFn(torch.autograd.Function):
    """Max pooling by the kernels: byte window offsets saved instead of int64 indices,
    and a gathered backward that writes the input gradient once (ATen's zero-fills it,
    then scatters into it)."""

    @staticmethod
    def forward(ctx, x: Tensor, window: tuple) -> Tensor:
        y, idx = _kernels.load().max_pool_forward(x, *window, True)
        ctx.save_for_backward(idx)
        ctx.window, ctx.size = window, x.shape[-2:]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        return _kernels.load().max_pool_backward(grad, idx, *ctx.size, *ctx.window), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools channels-last float32 CPU images with the single-pass
    kernels (:func:`_MaxPoolFn`): the same outputs, and gradients bitwise ATen's (same
    tie rule, same summation order; tested). Measured on SPS's pools (``[512, 64, 28, 28]``
    spikes): ATen's backward spends most of its time zero-filling the input gradient.
    Elsewhere (another layout, dilation, ``ceil_mode``, indices asked for, CUDA, export,
    tracing, compilation, a dispatch mode) it is ``nn.MaxPool2d``."""

    def _window(self) -> Optional[tuple]:
        kh, kw = _pair(self.kernel_size)
        sh, sw = _pair(self.stride if self.stride not in (None, [], ()) else self.kernel_size)
        ph, pw = _pair(self.padding)
        if _pair(self.dilation) != (1, 1) or self.ceil_mode or self.return_indices \
                or kh * kw > 255:
            return None
        return kh, kw, sh, sw, ph, pw

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        window = self._window()
        if window is None or x.dim() != 4 or _dispatch_modes() != 0 \
                or not _kernels.usable(x, dtypes=(torch.float32,), autograd=True) \
                or x.numel() == 0 or not x.is_contiguous(memory_format=torch.channels_last) \
                or x.shape[-2] + 2 * window[4] < window[0] \
                or x.shape[-1] + 2 * window[5] < window[1]:  # ATen says what is wrong
            return super().forward(x)  # (sizes tested last: a tracer would guard on them)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPoolFn.apply(x, window)
        return _kernels.load().max_pool_forward(x, *window, False)[0]


class LinearBN(nn.Module):
    """Token-wise ``Linear -> BN`` (Spikformer's ``Conv1d(k=1) -> BN``), bias folded into BN."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = Linear(in_dim, out_dim, bias=False)
        self.bn = TokenBN(out_dim)

    def forward(self, x: Tensor, active: Active = None) -> Tensor:
        return self.bn(self.linear(x), active)

    def fire(self, neuron: nn.Module, x: Tensor, active: Active, multi: bool) -> Tensor:
        """``fire(neuron, self(x, active), active, multi)``; on the multi-step path the
        BatchNorm runs inside the neuron's kernel (:func:`bn_fire`)."""
        if multi and active is None:
            return bn_fire(neuron, self.bn, self.linear(x))
        if is_rows(active) and isinstance(neuron, LIF) and not self.bn.training \
                and _foldable(self.bn):  # inference on rows: the BatchNorm in the neuron's step
            return neuron.rows_step(self.linear(x), active.index, active.batch * active.tokens,
                                    bn=self.bn)
        return fire(neuron, self(x, active), active, multi)


def _foldable(bn: nn.Module) -> bool:
    """A plain BatchNorm the neuron kernel may fold in: exact types (the cross-process
    subclasses of :mod:`stas_core.distributed` compute their own statistics), affine, with
    running statistics, and no hooks that would expect its forward to run."""
    return type(bn) in (TokenBN, nn.BatchNorm2d) and bn.affine and bn.track_running_stats \
        and not (bn._forward_hooks or bn._forward_pre_hooks)


def bn_fire(neuron: nn.Module, bn: nn.Module, x_seq: Tensor, channel_dim: int = -1) -> Tensor:
    """``neuron.multi_step(bn(x_seq))`` for ``x_seq[T, ...]`` with ``bn``'s channels at
    ``channel_dim`` (tokens ``[T, B, N, D]`` for a :class:`TokenBN`, images ``[T, B, C, H,
    W]`` for a BatchNorm2d). Where the LIF kernel runs, the BatchNorm is folded into its
    input: the normalised activation is never stored, and the backward saves the
    BatchNorm's reduction pass (measured: ``bench/bn_fold_speed.py``). Elsewhere the two
    modules run; the values agree within rounding (tested)."""
    if isinstance(neuron, LIF) and _foldable(bn) and not (
            bn.training and x_seq.numel() < 2 * x_seq.shape[channel_dim]):
        spikes = neuron.multi_step_bn(x_seq, bn, channel_dim)
        if spikes is not None:
            return spikes
    if isinstance(bn, TokenBN):
        return neuron.multi_step(bn(x_seq))
    return neuron.multi_step(bn(x_seq.flatten(0, 1)).unflatten(0, x_seq.shape[:2]))


def fire(neuron: LIF, x: Tensor, active: Active, multi: bool) -> Tensor:
    """Run ``neuron`` multi-step on ``x[T, ...]``, or one step with the token mask
    ``active[B, N]``, or one step on gathered rows (``active`` a :class:`TokenRows`)."""
    if multi:
        return neuron.multi_step(x)
    if is_rows(active):
        return neuron.rows_step(x, active.index, active.batch * active.tokens)
    return neuron.single_step(x, None if active is None else active.unsqueeze(-1))


def keep_inactive(new: Tensor, old: Tensor, active: Active) -> Tensor:
    """Tokens outside ``active`` keep their previous value (frozen when halted)."""
    if active is None or is_rows(active):
        return new
    return torch.where(active.unsqueeze(-1), new, old)


def mask_tokens(x: Tensor, active: Active) -> Tensor:
    """Zero the tokens outside ``active``: they send no spikes (and cost no ops)."""
    if active is None or is_rows(active):
        return x
    return x * active.unsqueeze(-1).to(x.dtype)
