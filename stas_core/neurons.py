"""Spiking neurons: LIF and IF with surrogate gradients, two interchangeable backends.

Dynamics (spikingjelly convention, ``decay_input``)::

    H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau      # LIF  (IF: H = V + X)
    S[t] = Heaviside(H[t] - v_threshold)
    V[t] = H[t] - v_threshold * S[t]                       # soft reset (v_reset=None)
    V[t] = H[t] * (1 - S[t]) + v_reset * S[t]              # hard reset

Backends:

* ``fused`` (default): one autograd Function runs the whole time loop forward and a
  hand-written backward through time, so autograd records one node per call instead of
  ~6 per timestep; on CPU a single-pass C++ kernel (``stas_core.kernels``), 4-10x faster
  than sinabs (``bench/neuron_speed.py``). :func:`lif_bn_multistep` runs a preceding
  BatchNorm inside that kernel (``bench/bn_fold_speed.py``).
* ``sinabs``: sinabs' ``LIF`` / ``IAF`` layers driven with this module's surrogate and
  reset dataclasses (sinabs accepts any callable for both), giving identical spikes and
  gradients (``tests/test_neurons.py``).

Tensors are time-first: multi-step input is ``[T, B, ...]``, single-step input ``[B, ...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import kernels as _kernels
from .errors import ConfigError, check_choice

__all__ = [
    "Sigmoid", "ATan", "SURROGATES", "make_surrogate", "LIF", "IF", "BACKENDS",
    "reset_net", "set_step_mode", "lif_multistep", "lif_bn_multistep",
]

BACKENDS = ("fused", "sinabs")
STEP_MODES = ("s", "m")


# --------------------------------------------------------------------------- surrogates
@dataclass(frozen=True)
class Sigmoid:
    """Surrogate d S / d H = alpha * sig(alpha u) * (1 - sig(alpha u)), u = H - threshold.

    Callable as ``surrogate(v_mem, spike_threshold)``, the protocol sinabs layers use.
    """

    alpha: float = 4.0

    def __call__(self, v_mem: Tensor, spike_threshold: float | Tensor) -> Tensor:
        sig = torch.sigmoid(self.alpha * (v_mem - spike_threshold))
        return self.alpha * sig * (1.0 - sig)


@dataclass(frozen=True)
class ATan:
    """Surrogate d S / d H = (alpha / 2) / (1 + (pi / 2 * alpha * u)^2), u = H - threshold."""

    alpha: float = 2.0

    def __call__(self, v_mem: Tensor, spike_threshold: float | Tensor) -> Tensor:
        u = (math.pi / 2 * self.alpha) * (v_mem - spike_threshold)
        return (self.alpha / 2) / (1.0 + u * u)


SURROGATES = {"sigmoid": Sigmoid, "atan": ATan}


def make_surrogate(name: str, alpha: Optional[float] = None):
    """Build a surrogate by name (``sigmoid`` or ``atan``), with its default alpha unless given."""
    check_choice("surrogate", name, tuple(SURROGATES))
    cls = SURROGATES[name]
    return cls() if alpha is None else cls(alpha=float(alpha))


# --------------------------------------------------------------------------- fused backend
class _FusedNeuronFn(torch.autograd.Function):
    """Whole-sequence neuron update with backpropagation through time done by hand."""

    @staticmethod
    def forward(ctx, x_seq: Tensor, v0: Optional[Tensor], decay: float, scale: float,
                bias: float, v_th: float, v_reset: Optional[float], detach_reset: bool,
                surrogate) -> tuple[Tensor, Tensor]:
        steps = x_seq.shape[0]
        h_seq = torch.empty_like(x_seq)
        s_seq = torch.empty_like(x_seq)
        v = v0  # None: at rest (0), so the first step skips reading a state
        for t in range(steps):
            h = h_seq[t]
            if v is None:
                torch.mul(x_seq[t], scale, out=h) if scale != 1.0 else h.copy_(x_seq[t])
            else:
                torch.mul(v, decay, out=h) if decay != 1.0 else h.copy_(v)
                h.add_(x_seq[t], alpha=scale)
            if bias != 0.0:
                h.add_(bias)
            spiked = h >= v_th  # one byte per element
            s_seq[t].copy_(spiked)
            if v_reset is None:
                v = torch.sub(h, s_seq[t], alpha=v_th)
            else:
                v = h.masked_fill(spiked, v_reset)
        ctx.save_for_backward(h_seq)
        ctx.params = (decay, scale, v_th, v_reset, detach_reset, surrogate, v0 is not None)
        return s_seq, v

    @staticmethod
    def backward(ctx, grad_s: Optional[Tensor], grad_v: Optional[Tensor]):
        (h_seq,) = ctx.saved_tensors
        decay, scale, v_th, v_reset, detach_reset, surrogate, has_v0 = ctx.params
        grad_x = torch.empty_like(h_seq)
        g_v = grad_v if grad_v is not None else torch.zeros_like(h_seq[0])
        for t in range(h_seq.shape[0] - 1, -1, -1):
            h = h_seq[t]
            sg = surrogate(h, v_th)
            g_h = sg * grad_s[t] if grad_s is not None else torch.zeros_like(h)
            if v_reset is None:  # soft: dV/dH = 1, dV/dS = -v_th
                g_h = g_h + g_v
                if not detach_reset:
                    g_h = g_h - (v_th * sg) * g_v
            else:  # hard: dV/dH = 1 - S, dV/dS = v_reset - H
                not_spiked = (h < v_th).to(h.dtype)
                g_h = g_h + g_v * not_spiked
                if not detach_reset:
                    g_h = g_h + g_v * (v_reset - h) * sg
            torch.mul(g_h, scale, out=grad_x[t]) if scale != 1.0 else grad_x[t].copy_(g_h)
            g_v = g_h * decay if decay != 1.0 else g_h
        return grad_x, (g_v if has_v0 else None), None, None, None, None, None, None, None


def _traceable_update(x_seq: Tensor, v0: Optional[Tensor], decay: float, scale: float,
                      bias: float, v_th: float, v_reset: Optional[float]) -> tuple[Tensor, Tensor]:
    """The forward of :class:`_FusedNeuronFn` with out-of-place ops only, for tracers
    (ONNX export); same spikes and state."""
    v = v0  # None: at rest (0); no constant is made, so the batch size stays symbolic
    spikes = []
    for t in range(x_seq.shape[0]):
        h = x_seq[t] * scale
        if v is not None:
            h = h + (v * decay if decay != 1.0 else v)
        if bias != 0.0:
            h = h + bias
        s = (h >= v_th).to(x_seq.dtype)
        if v_reset is None:
            v = h - s * v_th
        else:
            v = h * (1.0 - s) + (s * v_reset if v_reset != 0.0 else 0.0)
        spikes.append(s)
    return torch.stack(spikes), v


class _KernelNeuronFn(torch.autograd.Function):
    """:class:`_FusedNeuronFn` in one pass over memory (``stas_core.kernels``; CPU, float32,
    the sigmoid and atan surrogates): the membrane stays in a register over the T steps.
    Only the input is saved; the backward recomputes the membranes from it, bit for bit."""

    @staticmethod
    def forward(ctx, x_seq: Tensor, v0: Optional[Tensor], decay: float, scale: float,
                bias: float, v_th: float, v_reset: Optional[float], detach_reset: bool,
                kind: int, alpha: float) -> tuple[Tensor, Tensor]:
        s_seq, v = _kernels.load().lif_forward(x_seq, v0, decay, scale, bias, v_th, v_reset,
                                               None, None)
        if any(ctx.needs_input_grad[:2]):  # the backward recomputes the membranes from these
            ctx.save_for_backward(x_seq, v0)
        ctx.params = (decay, scale, bias, v_th, v_reset, detach_reset, kind, alpha,
                      v0 is not None)
        return s_seq, v

    @staticmethod
    def backward(ctx, grad_s: Optional[Tensor], grad_v: Optional[Tensor]):
        x_seq, v0 = ctx.saved_tensors
        decay, scale, bias, v_th, v_reset, detach_reset, kind, alpha, has_v0 = ctx.params
        grad_x, grad_v0 = _kernels.load().lif_backward(x_seq, v0, grad_s, grad_v, decay, scale,
                                                      bias, v_th, v_reset, detach_reset, kind,
                                                      alpha, None, None)
        return grad_x, (grad_v0 if has_v0 else None), *([None] * 8)


class _KernelBNNeuronFn(torch.autograd.Function):
    """A BatchNorm and :class:`_KernelNeuronFn` in one pass over memory: the kernel reads
    the BatchNorm's input ``x`` (channels innermost) and charges the neuron with
    ``y = x * ca + cb``, ``ca = weight * invstd``, ``cb = bias - mean * ca``, so the
    normalised activation is never written, read back or saved. ``mean`` and ``invstd`` are
    the batch statistics (``training``) or the running ones, given without a graph.

    The backward returns the BatchNorm's gradients: the neuron kernel also sums ``gy`` and
    ``gy * x`` per channel while it writes ``gy`` (the gradient of ``y``), which saves the
    BatchNorm backward's own reduction pass; one more pass turns ``gy`` into the input
    gradient in place (``kernels.bn_backward_input``)."""

    @staticmethod
    def forward(ctx, x_seq: Tensor, v0: Optional[Tensor], weight: Tensor, bias_bn: Tensor,
                mean: Tensor, invstd: Tensor, training: bool, decay: float, scale: float,
                bias: float, v_th: float, v_reset: Optional[float], detach_reset: bool,
                kind: int, alpha: float) -> tuple[Tensor, Tensor]:
        ca, cb = _folded(weight, bias_bn, mean, invstd)
        s_seq, v = _kernels.load().lif_forward(x_seq, v0, decay, scale, bias, v_th, v_reset,
                                               ca, cb)
        ctx.save_for_backward(x_seq, v0, weight, mean, invstd, ca, cb)
        ctx.params = (training, decay, scale, bias, v_th, v_reset, detach_reset, kind, alpha,
                      v0 is not None)
        return s_seq, v

    @staticmethod
    def backward(ctx, grad_s: Optional[Tensor], grad_v: Optional[Tensor]):
        x_seq, v0, weight, mean, invstd, ca, cb = ctx.saved_tensors
        training, decay, scale, bias, v_th, v_reset, detach_reset, kind, alpha, has_v0 = ctx.params
        ext = _kernels.load()
        gy, grad_v0, sum_gy, sum_gyx = ext.lif_backward(x_seq, v0, grad_s, grad_v, decay, scale,
                                                         bias, v_th, v_reset, detach_reset,
                                                         kind, alpha, ca, cb)
        invstd64 = invstd.double()
        sum_gy_xmu = sum_gyx - mean.double() * sum_gy      # sum(gy * (x - mean)), float64
        grad_weight = (sum_gy_xmu * invstd64).to(weight.dtype)
        grad_bias = sum_gy.to(weight.dtype)
        if training:  # the batch statistics depend on x too
            rows = x_seq.numel() // mean.numel()
            k1 = (sum_gy / rows).float()
            k2 = (sum_gy_xmu * invstd64 * invstd64 / rows).float()
        else:
            k1 = k2 = torch.zeros_like(mean)
        ext.bn_backward_input(gy, x_seq, mean, ca, k1, k2)
        return (gy, (grad_v0 if has_v0 else None), grad_weight, grad_bias, *([None] * 11))


_KERNEL_SURROGATES = {Sigmoid: 0, ATan: 1}


def memory_order(x: Tensor) -> Optional[list[int]]:
    """The permutation of ``x``'s dimensions, time (dim 0) kept first, under which a dense
    non-contiguous ``x`` is contiguous (e.g. ``[0, 1, 3, 4, 2]`` for a channels-last
    ``[T, B, C, H, W]``); None when ``x`` is contiguous already or has no such order."""
    if x.is_contiguous() or x.dim() < 2:
        return None
    perm = [0, *sorted(range(1, x.dim()), key=lambda d: -x.stride(d))]
    return perm if x.permute(perm).is_contiguous() else None


def _charge(tau: Optional[float], v_reset: Optional[float]) -> tuple[float, float, float]:
    """(decay, input scale, bias) of ``H = V * decay + X * scale + bias`` (IF: tau None)."""
    if tau is None:
        return 1.0, 1.0, 0.0
    return 1.0 - 1.0 / tau, 1.0 / tau, (v_reset or 0.0) / tau


def _folded(weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(ca, cb)``: a BatchNorm with these parameters and statistics as ``x * ca + cb``."""
    ca = weight.detach() * invstd
    return ca, bias.detach() - mean * ca


def _state_order(perm: list[int]) -> list[int]:
    """The permutation of a state ``[...]`` (no time dim) matching ``perm`` of ``[T, ...]``."""
    return [d - 1 for d in perm[1:]]


def _inverse(perm: list[int]) -> list[int]:
    return sorted(range(len(perm)), key=perm.__getitem__)


def lif_multistep(x_seq: Tensor, v0: Optional[Tensor] = None, *, tau: Optional[float] = 2.0,
                  v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                  detach_reset: bool = True, surrogate=Sigmoid()) -> tuple[Tensor, Tensor]:
    """Functional fused LIF (``tau=None``: IF) over ``x_seq[T, ...]``; returns (spikes, last V)."""
    decay, scale, bias = _charge(tau, v_reset)
    if torch.onnx.is_in_onnx_export():
        return _traceable_update(x_seq, v0, decay, scale, bias, float(v_threshold), v_reset)
    kind = _KERNEL_SURROGATES.get(type(surrogate))
    if kind is not None and _kernels.usable(x_seq, v0, dtypes=(torch.float32,), autograd=True):
        # The update is element-wise: run the kernel on the memory order of the input
        # (a channels-last activation is a contiguous [T, B, H, W, C]), not on a copy.
        perm = memory_order(x_seq)
        if perm is not None:
            x_seq = x_seq.permute(perm)
            v0 = None if v0 is None else v0.permute(_state_order(perm))
        s_seq, v = _KernelNeuronFn.apply(x_seq, v0, decay, scale, bias, float(v_threshold),
                                         None if v_reset is None else float(v_reset),
                                         bool(detach_reset), kind, float(surrogate.alpha))
        if perm is not None:
            back = _inverse(perm)
            s_seq, v = s_seq.permute(back), v.permute(_state_order(back))
        return s_seq, v
    return _FusedNeuronFn.apply(x_seq, v0, decay, scale, bias, float(v_threshold),
                                None if v_reset is None else float(v_reset),
                                bool(detach_reset), surrogate)


def lif_bn_multistep(x_seq: Tensor, bn: nn.Module, channel_dim: int, v0: Optional[Tensor] = None,
                     *, tau: Optional[float] = 2.0, v_threshold: float = 1.0,
                     v_reset: Optional[float] = 0.0, detach_reset: bool = True,
                     surrogate=Sigmoid()) -> Optional[tuple[Tensor, Tensor]]:
    """:func:`lif_multistep` of ``bn(x_seq)``, the BatchNorm ``bn`` (its channels at
    ``channel_dim`` of ``x_seq[T, ...]``) folded into the neuron kernel; returns (spikes,
    last V), or None where that kernel does not run (not a CPU float32 input, a surrogate
    without a kernel, or a memory order whose innermost dimension is not the channels), so
    the caller runs the two modules. Training-mode statistics and running-statistics updates
    are the BatchNorm's own (:func:`stas_core.batchnorm.normalization`)."""
    from .batchnorm import normalization

    kind = _KERNEL_SURROGATES.get(type(surrogate))
    if kind is None or torch.onnx.is_in_onnx_export() or not _kernels.usable(
            x_seq, v0, dtypes=(torch.float32,), autograd=True):
        return None
    channel_dim %= x_seq.dim()
    perm = memory_order(x_seq) or list(range(x_seq.dim()))
    if channel_dim == 0 or perm[-1] != channel_dim or x_seq.shape[channel_dim] != bn.num_features:
        return None
    x_mem = x_seq.permute(perm).contiguous()  # channels innermost (no copy when dense)
    v0 = None if v0 is None else v0.permute(_state_order(perm))
    mean, invstd = normalization(bn, x_mem)
    decay, scale, bias = _charge(tau, v_reset)
    s_seq, v = _KernelBNNeuronFn.apply(x_mem, v0, bn.weight, bn.bias, mean, invstd, bn.training,
                                       decay, scale, bias, float(v_threshold),
                                       None if v_reset is None else float(v_reset),
                                       bool(detach_reset), kind, float(surrogate.alpha))
    back = _inverse(perm)
    return s_seq.permute(back), v.permute(_state_order(back))


# --------------------------------------------------------------------------- sinabs backend
@dataclass(frozen=True)
class _SinabsReset:
    """Reset rule for sinabs layers with spikingjelly's soft/hard reset and ``detach_reset``."""

    v_reset: Optional[float] = None
    detach: bool = True

    def __call__(self, spikes: Tensor, state: dict, spike_threshold) -> dict:
        new_state = dict(state)
        s = spikes.detach() if self.detach else spikes
        v = state["v_mem"]
        if self.v_reset is None:
            new_state["v_mem"] = v - s * spike_threshold
        else:
            new_state["v_mem"] = v * (1.0 - s) + self.v_reset * s
        return new_state


def _make_sinabs_layer(tau: Optional[float], v_threshold: float, v_reset: Optional[float],
                       detach_reset: bool, surrogate) -> nn.Module:
    try:
        import sinabs.layers as sl
        from sinabs.activation import SingleSpike
    except ImportError as exc:  # pragma: no cover - sinabs is a declared dependency
        raise ConfigError("backend 'sinabs' needs sinabs: pip install sinabs") from exc
    reset = _SinabsReset(v_reset=v_reset, detach=detach_reset)
    common = dict(spike_threshold=torch.tensor(float(v_threshold)), spike_fn=SingleSpike,
                  reset_fn=reset, surrogate_grad_fn=surrogate)
    if tau is None:
        return sl.IAF(**common)
    if v_reset not in (None, 0.0):
        raise ConfigError(f"backend 'sinabs' supports LIF only with v_reset 0 or None (soft); "
                          f"got v_reset={v_reset}. Use backend='fused'.")
    # sinabs: V = a V + (1 - a) X with a = exp(-1/tau_mem); match a = 1 - 1/tau.
    layer = sl.LIF(tau_mem=-1.0 / math.log(1.0 - 1.0 / tau), norm_input=True, **common)
    layer.tau_mem.requires_grad_(False)
    return layer


# --------------------------------------------------------------------------- modules
class LIF(nn.Module):
    """Leaky integrate-and-fire neuron layer with a surrogate gradient.

    Stateful like spikingjelly's ``activation_based`` neurons: call :meth:`reset` between
    samples. ``step_mode='m'`` takes ``[T, B, ...]``; ``'s'`` takes ``[B, ...]`` and carries
    the membrane across calls. :meth:`single_step` accepts an ``active`` mask: inactive
    elements emit no spike and keep their membrane frozen (token halting).
    """

    def __init__(self, tau: Optional[float] = 2.0, *, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, detach_reset: bool = True, surrogate=None,
                 backend: str = "fused", step_mode: str = "m") -> None:
        super().__init__()
        if tau is not None and not tau > 1.0:
            raise ConfigError(f"tau must be > 1 (decay 1 - 1/tau in (0, 1)); got {tau}")
        if not v_threshold > 0:
            raise ConfigError(f"v_threshold must be > 0; got {v_threshold}")
        self.tau = tau
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.detach_reset = bool(detach_reset)
        if surrogate is None:
            surrogate = Sigmoid()
        elif isinstance(surrogate, str):
            surrogate = make_surrogate(surrogate)
        elif not callable(surrogate):
            raise ConfigError(f"surrogate must be 'sigmoid', 'atan' or a callable "
                              f"(v_mem, threshold) -> dS/dH; got {surrogate!r}")
        self.surrogate = surrogate
        self.backend = check_choice("backend", backend, BACKENDS)
        self.step_mode = step_mode
        self.v: Optional[Tensor] = None
        self._fresh = True  # sinabs backend: state must be (re)initialised at rest
        self.monitor = None  # callable(neuron, spikes, active) set by op counters
        self._sinabs = None
        if backend == "sinabs":  # kept out of the module tree: its buffers are state, not weights
            object.__setattr__(self, "_sinabs", _make_sinabs_layer(
                tau, self.v_threshold, self.v_reset, self.detach_reset, self.surrogate))

    @property
    def step_mode(self) -> str:
        return self._step_mode

    @step_mode.setter
    def step_mode(self, mode: str) -> None:
        self._step_mode = check_choice("step_mode", mode, STEP_MODES)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._sinabs is not None:
            self._sinabs._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        reset = "soft" if self.v_reset is None else f"hard({self.v_reset})"
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, reset={reset}, "
                f"detach_reset={self.detach_reset}, surrogate={self.surrogate}, "
                f"backend={self.backend}, step_mode={self.step_mode}")

    def reset(self) -> None:
        """Forget the membrane potential (start of a new sample)."""
        self.v = None
        self._fresh = True

    def forward(self, x: Tensor) -> Tensor:
        return self.multi_step(x) if self._step_mode == "m" else self.single_step(x)

    def multi_step(self, x_seq: Tensor) -> Tensor:
        """Run ``x_seq[T, ...]`` from the current state; returns spikes ``[T, ...]``."""
        return self._emit(self._run(x_seq), None)

    def multi_step_bn(self, x_seq: Tensor, bn: nn.Module, channel_dim: int) -> Optional[Tensor]:
        """:meth:`multi_step` of ``bn(x_seq)`` in one kernel (:func:`lif_bn_multistep`);
        None where it does not run (the sinabs backend, or see there): the caller then runs
        ``bn`` and :meth:`multi_step`."""
        if self._sinabs is not None:
            return None
        out = lif_bn_multistep(x_seq, bn, channel_dim, self._initial_state(x_seq), tau=self.tau,
                               v_threshold=self.v_threshold, v_reset=self.v_reset,
                               detach_reset=self.detach_reset, surrogate=self.surrogate)
        if out is None:
            return None
        s_seq, self.v = out
        return self._emit(s_seq, None)

    def single_step(self, x: Tensor, active: Optional[Tensor] = None) -> Tensor:
        """One timestep on ``x[B, ...]``; ``active`` (broadcastable bool) freezes the rest."""
        v_old = self._state_tensor(x.shape)
        s = self._run(x.unsqueeze(0)).squeeze(0)
        if active is None:
            return self._emit(s, None)
        active = active.to(torch.bool)
        v_new = self._state_tensor(x.shape)
        if v_old is None:
            v_old = torch.full_like(v_new, self.v_reset or 0.0)
        v_kept = torch.where(active, v_new, v_old)
        self._set_state(v_kept)
        return self._emit(s * active.to(s.dtype), active)

    def rows_step(self, x: Tensor, index: Tensor, total: int, bn: Optional[nn.Module] = None
                  ) -> Tensor:
        """One timestep on gathered rows ``x[M, ...]``: row i is element ``index[i]`` of a
        state of ``total`` rows; the other rows keep their membrane (token halting,
        ``gather`` execution). Same spikes and state as :meth:`single_step` with a mask.

        At inference on the CPU one kernel charges the rows of the dense membrane where
        they lie (no gather or scatter of the state). ``bn`` (an evaluation-mode BatchNorm
        over the channels, the last dim) is applied to ``x`` first, folded into that kernel
        where it runs."""
        full_shape = (total, *x.shape[1:])
        if self._sinabs is not None:
            self._sinabs_sync(full_shape, x)
        v_full = self._state_tensor(full_shape)
        if v_full is None:
            v_full = x.new_full(full_shape, self.v_reset or 0.0)
        elif v_full.shape[0] != total:
            raise ConfigError(f"neuron state has shape {list(v_full.shape)} but gathered rows "
                              f"index {total} tokens; call reset() before a new sample")
        if self._sinabs is None and type(self.surrogate) in _KERNEL_SURROGATES \
                and v_full.is_contiguous() and _kernels.usable(v_full, x, dtypes=(torch.float32,)) \
                and (bn is None or (not bn.training and x.shape[-1] == bn.num_features)):
            fold = (None, None)
            if bn is not None:
                from .batchnorm import normalization

                fold = _folded(bn.weight, bn.bias, *normalization(bn, x))
            decay, scale, bias = _charge(self.tau, self.v_reset)
            s = _kernels.load().lif_rows_step(v_full, index, x, decay, scale, bias,
                                              self.v_threshold, self.v_reset, *fold)
            self.v = v_full
            return self._emit(s, None)
        if bn is not None:
            x = bn(x)
        self._set_state(v_full.index_select(0, index))
        s = self._run(x.unsqueeze(0)).squeeze(0)
        v_rows = self._state_tensor(x.shape)
        if torch.is_grad_enabled() and (v_full.requires_grad or v_rows.requires_grad):
            v_full = v_full.index_copy(0, index, v_rows)  # autograd: a new tensor
        else:
            v_full.index_copy_(0, index, v_rows)  # inference: write M rows, copy nothing
        self._set_state(v_full)
        return self._emit(s, None)

    def _emit(self, spikes: Tensor, active: Optional[Tensor]) -> Tensor:
        if self.monitor is not None:
            self.monitor(self, spikes, active)
        return spikes

    def _run(self, x_seq: Tensor) -> Tensor:
        if self._sinabs is not None:
            self._sinabs_sync(x_seq.shape[1:], x_seq)
            return self._sinabs(x_seq.movedim(0, 1)).movedim(1, 0).to(x_seq.dtype).contiguous()
        s_seq, self.v = lif_multistep(x_seq, self._initial_state(x_seq), tau=self.tau, v_threshold=self.v_threshold,
                                      v_reset=self.v_reset, detach_reset=self.detach_reset,
                                      surrogate=self.surrogate)
        return s_seq

    def _initial_state(self, x_seq: Tensor) -> Optional[Tensor]:
        """The membrane a fused-backend run over ``x_seq[T, ...]`` starts from."""
        v0 = self.v
        if v0 is None and self.v_reset not in (None, 0.0):
            v0 = x_seq.new_full(x_seq.shape[1:], self.v_reset)  # start at rest, as spikingjelly
        elif v0 is not None and v0.shape != x_seq.shape[1:]:
            raise ConfigError(f"neuron state has shape {list(v0.shape)} but the input step has "
                              f"{list(x_seq.shape[1:])}; call reset() before a new sample")
        return v0

    # state access shared by both backends
    def _state_tensor(self, shape) -> Optional[Tensor]:
        """The membrane (None: at rest, or a sinabs state of another ``shape``)."""
        if self._sinabs is None:
            return self.v
        if self._fresh or tuple(self._sinabs.v_mem.shape) != tuple(shape):
            return None
        return self._sinabs.v_mem

    def _set_state(self, v: Tensor) -> None:
        if self._sinabs is None:
            self.v = v
        else:
            self._sinabs.v_mem = v

    def _sinabs_sync(self, shape, like: Tensor) -> None:
        layer = self._sinabs
        if self._fresh or not layer.is_state_initialised() or tuple(layer.v_mem.shape) != tuple(shape):
            layer.v_mem = like.new_full(shape, self.v_reset or 0.0)
            self._fresh = False


class IF(LIF):
    """Integrate-and-fire neuron (no leak): ``H = V + X``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(tau=None, **kwargs)


# --------------------------------------------------------------------------- helpers
def reset_net(module: nn.Module) -> None:
    """Call ``reset()`` on every stateful submodule (neurons and anything with a ``reset``)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset") and callable(m.reset):
            m.reset()


def set_step_mode(module: nn.Module, mode: str) -> None:
    """Set ``step_mode`` ('s' or 'm') on every neuron under ``module``."""
    check_choice("step_mode", mode, STEP_MODES)
    for m in module.modules():
        if isinstance(m, LIF):
            m.step_mode = mode
