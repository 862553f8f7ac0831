"""Stateful building blocks of converted spiking transformers (mean framing).

The ANN value of a site is carried by the *mean* over timesteps of what flows there. Every
module below keeps per-sample state, is cleared by ``reset()``, and processes one
timestep per ``step`` call (tensors ``[B, ...]``). An optional ``active`` mask (bool,
broadcastable to the input) freezes the state of halted tokens and silences their output.

* :class:`MultiThresholdNeuron` turns a real-valued stream into graded spikes
  ``s in {0, +-theta 2^-i}`` (one event per step) with a soft reset, so the running mean
  of its output tracks the running mean of its input to within ``theta / t``.
* :class:`Compensated` wraps a nonlinear ``f`` (LayerNorm, GELU, softmax) with expectation
  compensation: after ``t`` steps its outputs add up to exactly ``t * f(mean input)``.
* :class:`CompensatedMatMul` does the same for a product of two spike trains (Q K^T, attn V):
  cumulative output ``t * mean(A) @ mean(B)``.

Row execution (token halting, ``gather``): ``active`` may instead be a
:class:`~stas_core.layers.TokenRows`; the input is then ``[M, ...]``, the active tokens' rows
only, and the module's per-token state is held in the same rows (every row is active, so
there is nothing to mask or freeze). :class:`HeldRows` compacts that state when the active
set changes.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from halting.numeric import exact
from stas_core import kernels
from stas_core.errors import ConfigError
from stas_core.layers import TokenRows, is_rows

from .errors import ConversionError
from stas_core.onnx_float64 import gelu_float64

Count = Union[int, Tensor]


def _advance(count: Count, active: Optional[Tensor], like: Tensor) -> Count:
    if active is None:
        return count + 1
    return count + active.to(like.dtype)


def _freeze(new: Tensor, old: Optional[Tensor], active: Optional[Tensor]) -> Tensor:
    if active is None or old is None:
        return new if active is None else new * active.to(new.dtype)
    return torch.where(active, new, old)


def _add_rows_(dense: Tensor, rows: TokenRows, x: Tensor) -> None:
    """``dense[rows] += x`` in place for the ``[B * N, ...]`` state ``dense``: a whole add
    when every token is a row, else a gather, an add and a copy (on CPU far faster than
    ``index_add_``, which scatters element by element)."""
    if rows.full:
        dense.add_(x)
    else:
        dense.index_copy_(0, rows.index, dense.index_select(0, rows.index).add_(x))


def _pow2_levels(a: Tensor) -> Tensor:
    """Nearest power of two of ``a >= 0`` (mantissa rounding: [0.75, 1.5) 2^k -> 2^k)."""
    if torch.onnx.is_in_onnx_export():  # ONNX has no bit casts: log2, then made exact
        p = torch.exp2(torch.floor(torch.log2(a / 0.75)))
        p = p * (1.0 + (p * 1.5 <= a).to(p.dtype))  # x2 or x1: exact, and a Mul is far
        return p * (1.0 - 0.5 * (p * 0.75 > a).to(p.dtype))  # faster than onnxruntime's Where
    if a.dtype == torch.float32:  # two integer ops on the float bits
        return ((a.view(torch.int32) + 0x00400000) & 0x7F800000).view(torch.float32)
    mant, exp = torch.frexp(a)
    p = torch.ldexp(torch.ones_like(a), exp - (mant < 0.75).to(exp.dtype))
    return torch.where(a > 0, p, 0.0)  # frexp(0) has mantissa 0: not a level


# float64 membranes (in units of theta) are decided on a grid of 2^-40: see integrate_and_fire
TIE_GRID = 2.0 ** 40


def integrate_and_fire(v: Tensor, x: Tensor, theta: Tensor, smallest: float
                       ) -> tuple[Tensor, Tensor]:
    """One step of the multi-threshold neuron: returns (emitted value, new membrane).

    Ties are structural: when an input's running sum returns to an exact value (often 0),
    the membrane is minus a sum of emitted levels, e.g. exactly 1.5 * 2^-6 theta, a level
    boundary, give or take the last bits that summing the per-step increments leaves. In
    float64 the membrane is rounded to a grid of 2^-40 theta before the level is chosen:
    far finer than the smallest level, far coarser than that drift, so the tie is decided
    by the rounding rule in every runtime instead of by the kernels' last bits."""
    v = v + x
    u = v / theta
    if u.dtype == torch.float64:
        u = torch.round(u * TIE_GRID) / TIE_GRID
    a = u.abs()
    p = _pow2_levels(a)
    # in ONNX, masks as products: Where is over half of onnxruntime's time otherwise
    products = torch.onnx.is_in_onnx_export()
    p = p * (p >= smallest).to(p.dtype) if products else torch.where(p < smallest, 0.0, p)
    p = torch.maximum(p, torch.floor(a))  # whole spikes beyond theta: nothing is clipped
    signed = p * torch.sign(u) if products else torch.where(u < 0, -p, p)  # u == 0: p == 0
    s = signed * theta
    return s, v - s


def compensated_update(fn: Callable[[Tensor], Tensor], total: Tensor, x: Tensor, count: Tensor,
                       emitted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step of expectation compensation: (new total, new cumulative output, output)."""
    total = total + x
    cumulative = fn(total / count) * count
    return total, cumulative, cumulative - emitted


def compensated_product(sum_a: Tensor, a: Tensor, sum_b: Tensor, b: Tensor, count: Tensor,
                        emitted: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of a compensated product: (sum A, sum B, cumulative output, output)."""
    sum_a = sum_a + a
    sum_b = sum_b + b
    cumulative = sum_a @ (sum_b / count)
    return sum_a, sum_b, cumulative, cumulative - emitted


_COMPILED: dict = {}


def compiled(fn: Callable) -> Callable:
    """``fn`` through ``torch.compile`` with dynamic shapes (one graph serves every batch
    and every row count of the halted row execution), made once per process and shared by
    every model that asks (see :meth:`convert.spiking_vit.SpikingViT.compile`)."""
    if fn not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        # graphs are also specialised per compensated function (LayerNorm, softmax, GELU of
        # each block): allow that many
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 256))
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class _Compilable:
    """Mixin: ``compiled=True`` runs the module's per-step element-wise work compiled."""

    compiled = False

    def _fn(self, fn: Callable) -> Callable:
        return compiled(fn) if self.compiled else fn


class MultiThresholdNeuron(_Compilable, nn.Module):
    """Signed multi-threshold integrate-and-fire neuron with soft reset.

    Levels ``theta * 2^-i`` for ``i = 0 .. levels-1`` (and their negatives); each step the
    neuron emits the level nearest to its membrane (or nothing, under the smallest level)
    and subtracts what it emitted. Powers of two keep every event an addition (a shifted
    weight) on hardware. A membrane of several ``theta`` fires ``floor(|v| / theta)`` full
    spikes at once, so no input is ever clipped and the running mean of the output
    converges to the input's. ``threshold`` is a buffer set by calibration.
    """

    held_state = ("v",)  # per-row state under the row execution

    def __init__(self, levels: int = 8, threshold: float = 1.0) -> None:
        super().__init__()
        if levels < 1:
            raise ConfigError(f"levels must be >= 1; got {levels}")
        self.levels = int(levels)
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.v: Optional[Tensor] = None
        self._owned = None
        self.monitor = None  # callable(neuron, spike counts, active) set by op counters

    @property
    def smallest(self) -> float:
        return 2.0 ** (1 - self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, threshold={float(self.threshold):.4g}"

    def reset(self) -> None:
        self.v = None
        self._owned = None  # a weak ref to the membrane the kernel may update in place

    def quantize(self, v: Tensor, *, burst: bool = True) -> Tensor:
        """What one step emits from membrane ``v`` (``burst=False``: at most one spike, as
        threshold calibration assumes)."""
        if burst:
            return integrate_and_fire(torch.zeros_like(v), v, self.threshold, self.smallest)[0]
        u = v / self.threshold
        p = _pow2_levels(u.abs())
        p = torch.where(p < self.smallest, 0.0, p).clamp(max=1.0)
        return torch.copysign(p, u) * self.threshold

    def events(self, s: Tensor) -> Tensor:
        """Number of spikes in emitted values ``s`` (a burst of k full spikes counts k)."""
        full = torch.floor(s.abs() / self.threshold.to(s.dtype))
        return (s != 0).to(s.dtype) + (full - 1).clamp(min=0)

    def _fire(self, v: Optional[Tensor], x: Tensor, in_place: bool = False
              ) -> tuple[Tensor, Tensor]:
        """(emitted, new membrane): the single-pass kernel where it runs (CPU; compiling
        cannot beat one pass, so a compiled model uses it too), else the PyTorch ops,
        compiled when asked; the same values."""
        if kernels.usable(v, x):
            # the membrane is overwritten in place once it is the kernel's own (not a
            # tensor a masked step or a compaction made, which is replaced once)
            owned = in_place and v is not None and self._owned is not None \
                and self._owned() is v
            s, v = kernels.load().multi_threshold_fire(v, x, float(self.threshold),
                                                       self.smallest, owned)
            self._owned = weakref.ref(v)
            return s, v
        v = v if v is not None else torch.zeros_like(x)
        return self._fn(integrate_and_fire)(v, x, self.threshold.to(x.dtype), self.smallest)

    def step(self, x: Tensor, active: Union[None, Tensor, TokenRows] = None) -> Tensor:
        masked = active is not None and not is_rows(active)
        s, v = self._fire(self.v, x, in_place=not masked)  # masked: the old one is read below
        if masked:
            s = s * active.to(s.dtype)
            v_old = self.v if self.v is not None else torch.zeros_like(x)
            v = torch.where(active, v_old + x - s, v_old)
        self.v = v
        if self.monitor is not None:
            self.monitor(self, self.events(s), active)
        return s

    forward = step


def _device_count(previous: Optional[tuple[Tensor, int]], count: int,
                  like: Tensor) -> tuple[Tensor, int]:
    """``(count as a 0-d tensor on like's device, count)``: copied from the host once per
    run, then advanced by a device op, so no host value is sent per op and step (and a
    compiled kernel sees a tensor, not a new constant per step)."""
    if previous is not None and previous[1] == count - 1 and previous[0].dtype == like.dtype \
            and previous[0].device == like.device:
        return previous[0] + 1, count
    return torch.full((), float(count), dtype=like.dtype, device=like.device), count


class Compensated(_Compilable, nn.Module):
    """Expectation compensation of ``fn``: outputs sum to ``t * fn(mean of inputs)``.

    ``kind`` names ``fn`` for the energy ledger ('layernorm', 'softmax', 'gelu'; a
    LayerNorm module is recognised)."""

    stas_ledger = "compensated"

    def __init__(self, fn: Callable[[Tensor], Tensor], kind: Optional[str] = None) -> None:
        super().__init__()
        self.fn = fn
        self.kind = kind or ("layernorm" if isinstance(fn, nn.LayerNorm) else "other")
        self.reset()

    def reset(self) -> None:
        self.total: Optional[Tensor] = None
        self.count: Count = 0
        self.emitted: Optional[Tensor] = None
        self._count_t: Optional[tuple[Tensor, int]] = None  # the step count on the device
        self._owned: Optional[tuple] = None  # weak refs to the sums the kernel may update in place

    held_state = ("total", "emitted", "count")  # per-row state under the row execution

    def step(self, x: Tensor, active: Union[None, Tensor, TokenRows] = None) -> Tensor:
        if is_rows(active):
            return self._rows_step(x)
        if active is None and self.total is not None and not isinstance(self.count, Tensor):
            self.count += 1  # common case: every token active
            self._count_t = _device_count(self._count_t, self.count, x)
            count = self._count_t[0]
            out = self._kernel_update(x, count)
            if out is not None:
                return out
            update = self._fn(compensated_update)
            self.total, self.emitted, out = update(self.fn, self.total, x, count, self.emitted)
            return out
        total = x if self.total is None else self.total + x
        count = _advance(self.count, active, x)
        if isinstance(count, Tensor):
            cumulative = count * self.fn(total / count.clamp(min=1))
        else:
            cumulative = count * self.fn(total / count)
        out = cumulative if self.emitted is None else cumulative - self.emitted
        self.total = _freeze(total, self.total, active)
        self.emitted = _freeze(cumulative, self.emitted, active)
        self.count = count
        return out if active is None else out * active.to(out.dtype)

    def _kernel_update(self, x: Tensor, count: Tensor) -> Optional[Tensor]:
        """The step of :func:`compensated_update` as one pass of the CPU kernel, where ``fn``
        is the converted GELU, LayerNorm or softmax and the kernel runs (a compiled model
        uses it too: nothing beats one pass); None otherwise. Bit for bit the ops form's
        values (``fn`` runs the kernel's row function there too). The sums are updated in
        place once they are the kernel's own (not, e.g., an input kept as the first total,
        nor rows a compaction made: those are copied once)."""
        gelu = getattr(self.fn, "erf_kernel", False)
        row = getattr(self.fn, "row_kernel", None)
        row = row(x) if row is not None else None
        if not (gelu or row) or x.numel() == 0 or not kernels.usable(
                self.total, x, self.emitted, count, dtypes=(torch.float32,)):
            return None
        owned = self._owned is not None and self._owned[0]() is self.total \
            and self._owned[1]() is self.emitted
        if gelu:
            self.total, self.emitted, out = kernels.load().compensated_gelu(
                self.total, x, self.emitted, count, owned)
        else:
            self.total, self.emitted, out = kernels.load().compensated_rows(
                self.total, x, self.emitted, count, owned, *row)
        self._owned = (weakref.ref(self.total), weakref.ref(self.emitted))
        return out

    def _rows_step(self, x: Tensor) -> Tensor:
        """Every row active; ``count`` is a per-row tensor (rows may have joined late)."""
        if self.total is None:
            self.count = x.new_ones((x.shape[0],) + (1,) * (x.dim() - 1))
            out = self._kernel_update(x, self.count)
            if out is not None:
                return out
            self.total = x
            self.emitted = self.fn(x)
            return self.emitted
        self.count = self.count + 1
        out = self._kernel_update(x, self.count)
        if out is not None:
            return out
        update = self._fn(compensated_update)
        self.total, self.emitted, out = update(self.fn, self.total, x, self.count, self.emitted)
        return out

    forward = step


class CompensatedMatMul(_Compilable, nn.Module):
    """Product of two spike trains: cumulative output ``sum(A) @ (sum(B) / count_B)``.

    ``b_count`` gives how many steps each element of B has been fed (a broadcastable tensor
    under halting, else the step number); with every token active it is ``t``, so the
    outputs sum to ``t * mean(A) @ mean(B)``.
    """

    stas_ledger = "compensated_product"

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.sum_a: Optional[Tensor] = None
        self.sum_b: Optional[Tensor] = None
        self.emitted: Optional[Tensor] = None
        self.steps = 0
        self._count_t: Optional[tuple[Tensor, int]] = None  # the step count on the device
        self.mean_b: Optional[Tensor] = None  # row execution: mean(B) per head [B, H, N, d]

    def step(self, a: Tensor, b: Tensor, b_count: Optional[Tensor] = None,
             a_active: Optional[Tensor] = None) -> Tensor:
        """One step; ``a_active`` (broadcastable to the output) marks the rows of A (the
        queries) that are active: the others' outputs are not used, so what they have
        emitted stays as it was (a token that resumes continues its own sum)."""
        if b_count is None and self.sum_a is not None:  # common case: every token active
            self.steps += 1
            self._count_t = _device_count(self._count_t, self.steps, a)
            count = self._count_t[0]
            product = self._fn(compensated_product)
            self.sum_a, self.sum_b, self.emitted, out = product(self.sum_a, a, self.sum_b, b,
                                                                count, self.emitted)
            return out
        self.sum_a = a if self.sum_a is None else self.sum_a + a
        self.sum_b = b if self.sum_b is None else self.sum_b + b
        self.steps += 1
        count = b_count.clamp(min=1) if b_count is not None else self.steps
        cumulative = self.sum_a @ (self.sum_b / count)
        out = cumulative if self.emitted is None else cumulative - self.emitted
        self.emitted = _freeze(cumulative, self.emitted, a_active)
        return out

    def forward(self, a: Tensor, b: Tensor, b_count: Union[None, Tensor, "ProductRows"] = None,
                a_active: Optional[Tensor] = None) -> Tensor:
        if isinstance(b_count, ProductRows):
            return self._rows_step(a, b, b_count)
        return self.step(a, b, b_count, a_active)

    held_state = ("emitted",)  # per-row state under the row execution (sums stay dense)

    def _rows_step(self, a: Tensor, b: Tensor, ctx: "ProductRows") -> Tensor:
        """Row execution: ``a`` and ``b`` are the active tokens' rows (queries' Q and keys'
        K for Q K^T; attention rows and V for attn V). The running sums stay dense per image
        and are updated in place on the active rows only; the product runs per image (a
        matmul, cheap next to the element-wise work) and the active query rows are kept."""
        rows, total = ctx.rows, ctx.rows.batch * ctx.rows.tokens
        if self.sum_a is None:
            self.sum_a = a.new_zeros((total,) + tuple(a.shape[1:]))
            self.sum_b = b.new_zeros((total,) + tuple(b.shape[1:]))
        _add_rows_(self.sum_a, rows, a)
        _add_rows_(self.sum_b, rows, b)
        self.steps += 1
        self.mean_b = ctx.mean(self.sum_b, self.mean_b)
        cumulative = ctx.product(self.sum_a, self.mean_b)
        out = cumulative if self.emitted is None else cumulative - self.emitted
        self.emitted = cumulative
        return out

    @torch.no_grad()
    def count_ops(self, inputs, output) -> tuple[float, float]:
        """Incremental cost: each new event of A adds a row of sum(B), each event of B a
        column of sum(A): ``nnz(a) * M + nnz(b) * N`` ACs (the rescale by 1/t is a shift
        when t is a power of two, and is not counted, as for BatchNorm)."""
        a, b = inputs[0], inputs[1]
        ctx = inputs[2] if len(inputs) > 2 else None
        if isinstance(ctx, ProductRows):
            return 0.0, float(torch.count_nonzero(a)) * ctx.a_fanout + \
                float(torch.count_nonzero(b)) * ctx.rows.tokens
        return 0.0, float(torch.count_nonzero(a)) * b.shape[-1] + \
            float(torch.count_nonzero(b)) * a.shape[-2]


#: fewer rows than this take another matmul path (a GEMV), rounded differently from the
#: dense products; padded layouts have at least this many rows per image
_MIN_PADDED_ROWS = 4


def padded_slots(rows: TokenRows) -> Optional[tuple[int, Tensor]]:
    """``(P, slot)``: a ``[B * P]`` layout of the active rows, ``P`` the most active tokens
    of any image (at least :data:`_MIN_PADDED_ROWS`), row i at ``slot[i]``; None when it
    would save little over the dense per-image products (``P > N / 2``). Late in a halted
    run often only the class token is active: the products then cost P/N of dense."""
    b, n, idx = rows.batch, rows.tokens, rows.index
    if rows.full or idx.numel() == 0:
        return None
    image = idx // n
    counts = torch.bincount(image, minlength=b)
    p = max(int(counts.max()), _MIN_PADDED_ROWS)
    if 2 * p > n:
        return None
    first = torch.cumsum(counts, 0) - counts  # the index is sorted: an image's rows are consecutive
    return p, image * p + (torch.arange(idx.numel(), device=idx.device) - first[image])


@dataclass(frozen=True)
class ProductRows:
    """How a :class:`CompensatedMatMul` runs on rows: Q K^T (``kind='qk'``: A and B are
    ``[M, D]`` rows of Q and K, output ``[M, H, N]``) or attn V (``'av'``: A is ``[M, H, N]``
    attention rows, B ``[M, D]`` rows of V, output ``[M, D]``). ``key_count`` ``[B * N, 1]``
    says how many steps each key has fed (frozen keys of halted tokens keep their mean).
    ``padded`` (:func:`padded_slots`) runs the products on the active query rows only."""

    kind: str
    rows: TokenRows
    heads: int
    dim: int
    key_count: Tensor
    padded: Optional[tuple[int, Tensor]] = None

    @property
    def a_fanout(self) -> int:
        """Output elements one event of A reaches: N keys (Q K^T) or a head's dim (attn V)."""
        return self.rows.tokens if self.kind == "qk" else self.dim // self.heads

    @property
    def dense_b(self) -> int:
        """Elements of B in the dense execution (every token's K or V)."""
        return self.rows.batch * self.rows.tokens * self.dim

    def _heads(self, flat: Tensor) -> Tensor:  # [B * N, D] -> [B, H, N, d]
        b, n = self.rows.batch, self.rows.tokens
        return flat.view(b, n, self.heads, -1).transpose(1, 2)

    def mean(self, sum_b: Tensor, previous: Optional[Tensor]) -> Tensor:
        """``sum(B) / count`` per head, ``[B, H, N, d]`` contiguous (the products read it
        without a copy). Only the active tokens' sums and counts change in a step, so
        ``previous`` is updated on their rows alone, to the values a dense division gives."""
        if previous is None or self.rows.full:
            return self._heads(sum_b / self.key_count).contiguous()
        idx, n = self.rows.index, self.rows.tokens
        rows = sum_b.index_select(0, idx) / self.key_count.index_select(0, idx)
        previous[idx // n, :, idx % n] = rows.view(idx.numel(), self.heads, -1)
        return previous

    def product(self, sum_a: Tensor, mean_b: Tensor) -> Tensor:
        """Cumulative output rows ``sum(A) @ mean(B)`` of the active tokens (``mean_b``
        from :meth:`mean`)."""
        b, n, idx = self.rows.batch, self.rows.tokens, self.rows.index
        if self.padded is not None:  # each output element is the dense one, bit for bit
            p, slot = self.padded
            a = sum_a.index_select(0, idx)
            pad = a.new_zeros((b * p,) + tuple(a.shape[1:])).index_copy_(0, slot, a)
            if self.kind == "qk":
                part = pad.view(b, p, self.heads, -1).transpose(1, 2) @ mean_b.transpose(-2, -1)
                return part.transpose(1, 2).reshape(b * p, self.heads, n).index_select(0, slot)
            part = pad.view(b, p, self.heads, n).transpose(1, 2) @ mean_b      # [B, H, P, d]
            return part.transpose(1, 2).reshape(b * p, -1).index_select(0, slot)
        if self.kind == "qk":
            out = self._heads(sum_a) @ mean_b.transpose(-2, -1)         # [B, H, N, N]
            out = out.transpose(1, 2).reshape(b * n, self.heads, n)
        else:
            attn = sum_a.view(b, n, self.heads, n).transpose(1, 2)      # [B, H, N, N]
            out = (attn @ mean_b).transpose(1, 2).reshape(b * n, -1)    # [B * N, D]
        return out if self.rows.full else out.index_select(0, idx)


class HeldRows:
    """The tokens whose per-token state a block holds in rows, under the row execution.

    When the active set changes the state is compacted to the new rows: a token that stops
    has its rows parked (kept, unread); a token that becomes active again (``block``
    accumulation refills every timestep) gets its parked rows back, and a token never held
    starts from zero, as under the masked execution. In the ``both`` and ``time`` modes the
    active set only shrinks, so the state only shrinks: nothing is ever computed for a
    halted token again."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = [m for m in modules if getattr(m, "held_state", None)]
        self.reset()

    def reset(self) -> None:
        self.mask: Optional[Tensor] = None   # [B * N] bool: the held tokens
        self.rows: Optional[TokenRows] = None
        self.padded: Optional[tuple[int, Tensor]] = None  # padded_slots(rows), made once
        self.parked: dict = {}               # (module index, attr) -> [(flat index, rows)]
        #: False: the caller promised that no stopped token becomes active again in this
        #: sample (see ``SpikingViT.set_halting_refills``), so stopped rows are dropped, not
        #: parked: a compaction copies the staying rows only
        self.refills = True

    def _states(self):
        for i, m in enumerate(self.modules):
            for attr in m.held_state:
                value = getattr(m, attr)
                if isinstance(value, Tensor):
                    yield i, m, attr, value

    def update(self, active: Tensor) -> TokenRows:
        """The rows of ``active`` ``[B, N]``, with every module's state compacted to them
        (and :attr:`padded`, their :func:`padded_slots`)."""
        flat = active.reshape(-1)
        if self.mask is not None and torch.equal(flat, self.mask):
            return self.rows
        batch, tokens = active.shape
        new = TokenRows.from_mask(active)
        if self.mask is not None:
            old = self.rows.index
            if bool((flat & ~self.mask).any()):
                if not self.refills:
                    raise ConversionError(
                        "a stopped token became active again after set_halting_refills(False) "
                        "promised it would not; call set_halting_refills(True) (the default "
                        "after reset()) for runs whose active set can grow")
                self._refill(old, new.index, batch * tokens)
            else:
                keep = flat.index_select(0, old)
                stay = keep.nonzero().squeeze(1)
                gone = (~keep).nonzero().squeeze(1) if self.refills else stay[:0]
                for i, m, attr, value in self._states():
                    if gone.numel():
                        self.parked.setdefault((i, attr), []).append(
                            (old.index_select(0, gone), value.index_select(0, gone)))
                    setattr(m, attr, value.index_select(0, stay))
        self.mask, self.rows, self.padded = flat, new, padded_slots(new)
        return new

    def _refill(self, old: Tensor, new: Tensor, total: int) -> None:
        everything = torch.arange(total, device=old.device)
        for i, m, attr, value in list(self._states()):
            full = value.new_zeros((total,) + tuple(value.shape[1:]))
            for index, rows in self.parked.get((i, attr), []):
                full.index_copy_(0, index, rows)
            full.index_copy_(0, old, value)
            self.parked[(i, attr)] = [(everything, full)]
            setattr(m, attr, full.index_select(0, new))


_LAYER_NORM, _SOFTMAX = 0, 1  # the CPU kernel's row functions (csrc: RowOp)


def softmax_fn(scale: float) -> Callable[[Tensor], Tensor]:
    """``softmax(scale * x)`` over the last dim. As with :func:`gelu_fn`, float32 CPU
    inputs without autograd run the kernel's row softmax in every execution, so the fused
    compensation step gives the ops form's bits; it differs from ``torch.softmax`` by float32
    rounding."""
    def softmax(x: Tensor) -> Tensor:
        if kernels.usable(x, dtypes=(torch.float32,)):
            return kernels.load().row_function(x, _SOFTMAX, None, None, float(scale))
        return torch.softmax(x * exact(scale, x), dim=-1)
    softmax.row_kernel = lambda x: (_SOFTMAX, None, None, float(scale))
    return softmax


class KernelLayerNorm(nn.LayerNorm):
    """The LayerNorm of a converted block: ``nn.LayerNorm`` (same parameters and keys) whose
    float32 CPU rows without autograd run the kernel's row LayerNorm, in every execution,
    so that the fused compensation step (:meth:`Compensated._kernel_update`) gives the ops
    form's bits; it differs from ``F.layer_norm`` by float32 rounding."""

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> "KernelLayerNorm":
        """A copy of ``norm`` (its shape, eps, affine and values)."""
        new = cls(norm.normalized_shape, eps=norm.eps,
                  elementwise_affine=norm.elementwise_affine, bias=norm.bias is not None,
                  device=norm.weight.device if norm.weight is not None else None,
                  dtype=norm.weight.dtype if norm.weight is not None else None)
        new.load_state_dict(norm.state_dict())
        return new

    @staticmethod
    def converted(norm: nn.Module) -> nn.Module:
        """A LayerNorm as :class:`KernelLayerNorm`; any other norm copied as it is."""
        return KernelLayerNorm.of(norm) if isinstance(norm, nn.LayerNorm) else copy.deepcopy(norm)

    def row_kernel(self, x: Tensor) -> Optional[tuple]:
        """``(op, weight, bias, eps)`` for the kernel on ``x``, or None (a multi-dim shape,
        rows of another width, which ``F.layer_norm`` refuses, or parameters that need their
        gradient)."""
        if len(self.normalized_shape) != 1 or x.dim() == 0 \
                or x.shape[-1] != self.normalized_shape[0]:
            return None
        if self.weight is None:
            return _LAYER_NORM, None, None, float(self.eps)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return None
        bias = self.bias if self.bias is not None else torch.zeros_like(self.weight)
        return _LAYER_NORM, self.weight.detach(), bias.detach(), float(self.eps)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        row = self.row_kernel(x)
        if row is not None and kernels.usable(x, dtypes=(torch.float32,)):
            return kernels.load().row_function(x, *row)
        return super().forward(x)


def gelu_fn(approximate: str = "none") -> Callable[[Tensor], Tensor]:
    """The GELU of a converted block. The erf form runs as the CPU kernel's vectorised GELU
    where it can (float32, no autograd, not traced or compiled), in every execution, so the
    fused compensation step (:meth:`Compensated._kernel_update`) gives the same bits as
    the ops; it differs from ``F.gelu`` by a few ulp (float32 rounding)."""
    def gelu(x: Tensor) -> Tensor:
        if approximate == "none":
            if x.dtype == torch.float64 and torch.onnx.is_in_onnx_export():
                return gelu_float64(x)  # onnxruntime has no float64 Erf
            if kernels.usable(x, dtypes=(torch.float32,)):
                return kernels.load().gelu_erf(x)
        return torch.nn.functional.gelu(x, approximate=approximate)
    gelu.erf_kernel = approximate == "none"
    return gelu
