"""One energy ledger for every model, so comparisons are fair.

Two figures come out of one pass, kept apart:

**Conventional** (``energy_mj``, what papers report; DESIGN.md "Energy accounting"):

* a layer whose input is real-valued costs MACs: ``Linear``: tokens x in x out;
  ``Conv``: output elements x (in / groups) x k x k;
* a layer whose input is spikes (non-negative integer spike counts) costs ACs, one per
  input spike per synapse it reaches: ``Linear``: spikes x out; ``Conv``: for every
  output position, the spikes in its receptive field, times out channels (exact);
* a spike-by-spike product ``A @ B`` (Q K^T, attn V) costs one AC per coinciding pair,
  ``sum_k (sum_i A_ik)(sum_j B_kj)``; with one real operand, spikes x fan-out.
* ``E = mac_pj * MACs + ac_pj * ACs`` (45 nm figures of Horowitz 2014). Power-of-two
  scalings (attention's 0.125), BatchNorm (folded into the weights at inference), neuron
  updates, nonlinear functions and memory cost nothing here.

**Full ledger** (``energy.full_mj`` and ``energy.terms_mj``), the costs the conventional
figure leaves out, each term on its own (:data:`TERMS`):

* ``synaptic``: the MACs and ACs above, plus a bias add per output element and call (an
  SNN adds its biases at every timestep), plus a shift per synapse of a *graded* event
  (a multi-threshold level ``theta 2^-i`` is a shifted weight, then an add);
* ``nonlinear``: LayerNorm, softmax and GELU of a converted model, per element and step,
  in fp32 adds and multiplies (:data:`NONLINEAR_OPS` says how each is counted);
* ``compensation``: the expectation compensation around them and the rescale of the
  compensated products (running total, divide by the count, times the count, minus what
  was emitted): 2 adds + 2 multiplies per element and step, 1 multiply + 1 add per
  element of a compensated product;
* ``neuron``: one update per *active* site and step (:func:`neuron_ops`: IF 2 adds; LIF
  3 adds and a leak multiply, a shift when tau is a power of two; a multi-threshold
  neuron 2 adds, a multiply and a comparison per level bit, so its work grows with levels);
* ``memory_weights``: every Linear/Conv reads all its weights once per image and timestep
  in which that image has an active token in the layer's block (weights stay in place
  while the image's tokens stream through; nothing is shared across images: batch-1
  inference). Weights live on chip if the model's weights fit in ``on_chip_bytes``, else
  every read comes from DRAM;
* ``memory_state``: membranes (read and written per active site and step) and the
  compensation state (totals, emitted sums), ``state_bits`` each, in an SRAM buffer the
  size of that layer's state for one image;
* ``memory_activations``: every tensor a layer, neuron or nonlinear op produces is
  written once and read once (spikes 1 bit, graded events ``1 + ceil(log2(levels + 1))``
  bits, real values ``activation_bits``), in an SRAM buffer the size of that tensor.

SRAM energy per 64-bit access is interpolated in buffer size between Horowitz's 8 KB,
32 KB and 1 MB figures (from 0 at 0 bytes, as in Lemaire et al.'s model). Not counted in
either ledger: residual additions, control, addressing and leakage.

The **ANN** the SNN is compared with goes through the same hooks (:class:`Ledger` with
``mode="ann"``, one timestep, every layer input real-valued, neurons as free identities,
compensated ops as their plain function); the **QANN** is that ANN with activations of
``b`` bits and integer MACs, where ``b`` is the bit width that carries what an SNN site
carries in ``t`` steps (Yan, Bai and Wong, arXiv 2409.08290): ``ceil(log2(t + 1))`` for
binary spikes (a count of 0..t), ``ceil(log2(t 2^levels + 1))`` for signed graded events
(:func:`equal_information_bits`).

A layer may force its input kind with ``stas_input = 'spike' | 'events' | 'real'``
('events': graded spikes of a multi-threshold neuron, one AC per nonzero input and
synapse); else the input decides. A module with ``count_ops(inputs, output)`` reports its
own ``(MACs, ACs)``. Counts are per layer and per timestep (``counter.t``, set by the
per-timestep runner), and only what is computed is counted: with the ``gather`` execution
halted tokens are not computed, so they cost nothing in any term (the ``mask`` execution
computes them as zeros: no spikes, but their memory traffic is booked).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .layers import SpikeMatMul, is_rows
from .neurons import LIF

#: The full ledger's terms, in report order.
TERMS = ("synaptic", "nonlinear", "compensation", "neuron", "memory_weights", "memory_state",
         "memory_activations")

#: fp32 (adds, multiplies) per element of each nonlinear function, counted as a plain
#: implementation would: LayerNorm: mean (1 add), variance (1 sub, 1 mul, 1 add),
#: normalise (1 sub, 1 mul), affine (1 mul, 1 add); softmax: max (1 compare), subtract
#: (1 add), exp as a degree-6 polynomial after range reduction (6 adds, 6 muls, 1 add and 1
#: mul for the reduction), sum (1 add), divide by the sum (1 mul by its reciprocal); GELU:
#: x * Phi(x) with erf as Abramowitz-Stegun 7.1.26 (5-term polynomial and an exp: 11 adds,
#: 14 muls in all). Per-row reciprocals and square roots (one per D elements) are left out.
NONLINEAR_OPS = {"layernorm": (4, 3), "softmax": (11, 8), "gelu": (11, 14)}


@dataclass(frozen=True)
class EnergyCosts:
    """Energy per operation in picojoules (45 nm, Horowitz ISSCC 2014), and the hardware
    the full ledger assumes. ``mac_pj`` / ``ac_pj`` are the conventional figure's; the
    rest price the full ledger. Load other figures with :meth:`from_file`."""

    mac_pj: float = 4.6          # fp32 multiply-accumulate (3.7 + 0.9)
    ac_pj: float = 0.9           # fp32 add
    fp_add_pj: float = 0.9
    fp_mult_pj: float = 3.7
    int_add_pj: float = 0.1      # int32
    int_mult_pj: float = 3.1     # int32
    shift_pj: float = 0.1        # a barrel shift (an exponent add for fp): an int32 add
    sram_8k_pj: float = 10.0     # per 64-bit access
    sram_32k_pj: float = 20.0
    sram_1m_pj: float = 100.0    # also the price of on-chip buffers larger than 1 MB
    dram_pj: float = 1950.0      # per 64-bit access: midpoint of the quoted 1.3-2.6 nJ
    weight_bits: int = 32
    state_bits: int = 32         # membranes, compensation totals, partial sums
    activation_bits: int = 32    # real-valued activations (the ANN's, and the SNN's own)
    on_chip_bytes: int = 1 << 20  # weights on chip when the model's weights fit

    def energy_pj(self, macs: float, acs: float) -> float:
        """The conventional figure."""
        return self.mac_pj * macs + self.ac_pj * acs

    def sram_pj_per_bit(self, buffer_bytes: float) -> float:
        """Energy per bit of an access to an on-chip buffer of ``buffer_bytes``: piecewise
        linear through (0, 0), (8 KB, sram_8k), (32 KB, sram_32k), (1 MB, sram_1m), flat
        above."""
        points = ((0.0, 0.0), (8192.0, self.sram_8k_pj), (32768.0, self.sram_32k_pj),
                  (1048576.0, self.sram_1m_pj))
        b = max(0.0, float(buffer_bytes))
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if b <= x1:
                return (y0 + (y1 - y0) * (b - x0) / (x1 - x0)) / 64.0
        return self.sram_1m_pj / 64.0

    def weight_pj_per_bit(self, model_weight_bytes: float) -> float:
        """Weights come from an on-chip buffer of the model's size if it fits, else DRAM."""
        if model_weight_bytes <= self.on_chip_bytes:
            return self.sram_pj_per_bit(model_weight_bytes)
        return self.dram_pj / 64.0

    @classmethod
    def load(cls, path: Optional[Union[str, Path]]) -> "EnergyCosts":
        """The defaults, or :meth:`from_file` of ``path`` (``--energy-costs``)."""
        return cls() if path is None else cls.from_file(path)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "EnergyCosts":
        """Costs from a JSON object of field names to numbers (others keep their default);
        an unknown key or a negative value is a ConfigError."""
        from .report import read_json_object

        where = f"--energy-costs {path}"
        return cls.from_dict(read_json_object(path, where, "cost names to numbers"), where)

    @classmethod
    def from_dict(cls, data: dict, where: str = "energy costs") -> "EnergyCosts":
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for key, value in data.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown cost {key!r}; known: {', '.join(fields)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}: {key!r} must be a finite number >= 0, got {value!r}")
            if fields[key] == "int" and (value != int(value) or value == 0):
                raise ConfigError(f"{where}: {key!r} must be a positive integer, got {value!r}")
            values[key] = int(value) if fields[key] == "int" else float(value)
        return cls(**values)


def equal_information_bits(timesteps: int, levels: Optional[int] = None) -> int:
    """Activation bits of the quantized ANN that carries what an SNN site carries in
    ``timesteps`` steps (Yan, Bai and Wong): a spike count 0..T for binary spikes; for a
    signed multi-threshold neuron with ``levels`` levels, the sums of T events, multiples
    of its smallest level 2^(1-levels) theta in [-T theta, T theta]."""
    if levels is None:
        return max(1, math.ceil(math.log2(timesteps + 1)))
    return max(1, math.ceil(math.log2(timesteps * 2 ** levels + 1)))


def neuron_ops(neuron: nn.Module) -> tuple[int, int, int]:
    """(fp adds, fp multiplies, shifts) of one neuron update at one site: integrate,
    leak, compare with the threshold(s), reset."""
    levels = getattr(neuron, "levels", None)
    if levels is not None:  # multi-threshold: v += x, u = v / theta, a level per bit, v -= s
        return 2 + math.ceil(math.log2(2 * levels + 1)), 1, 0
    tau = getattr(neuron, "tau", None)
    if tau is None:  # IF: integrate, compare
        return 2, 0, 0
    pow2 = float(tau) > 0 and math.log2(float(tau)).is_integer()
    return 3, 0 if pow2 else 1, 1 if pow2 else 0  # v + (x - v) / tau, compare


def is_spike_tensor(x: Tensor) -> bool:
    """True if ``x`` holds non-negative integer spike counts."""
    if x.numel() == 0:
        return True
    return bool(x.min() >= 0) and bool(torch.equal(x, torch.round(x)))


def _kind(module: nn.Module, x: Tensor) -> str:
    """'real', 'spike' (integer spike counts) or 'events' (one event per nonzero value)."""
    forced = getattr(module, "stas_input", None)
    if forced is not None:
        return forced
    return "spike" if is_spike_tensor(x) else "real"


def _events(kind: str, x: Tensor, module: Optional[nn.Module] = None) -> float:
    """Number of input spikes: spike counts add up; graded events count once each (or as
    their source neuron says, ``module.stas_source.events(x)``, e.g. for bursts)."""
    if kind == "spike":
        return float(x.sum())
    source = getattr(module, "stas_source", None)
    if source is not None:
        return float(source.events(x).sum())
    return float(torch.count_nonzero(x))


@torch.no_grad()
def linear_ops(module: nn.Linear, x: Tensor) -> tuple[float, float]:
    """(MACs, ACs) of one Linear call."""
    kind = _kind(module, x)
    if kind == "real":
        return float(x.numel()) * module.out_features, 0.0
    return 0.0, _events(kind, x, module) * module.out_features


@torch.no_grad()
def conv_ops(module: nn.Conv2d, x: Tensor, out: Tensor) -> tuple[float, float]:
    """(MACs, ACs) of one Conv2d call."""
    kh, kw = module.kernel_size
    kind = _kind(module, x)
    if kind == "real":
        return float(out.numel()) * (module.in_channels // module.groups) * kh * kw, 0.0
    spikes = x if kind == "spike" else (x != 0).to(x.dtype)
    ones = x.new_ones(1, 1, kh, kw)
    reach = F.conv2d(spikes.sum(1, keepdim=True), ones, stride=module.stride,
                     padding=module.padding, dilation=module.dilation)
    return 0.0, float(reach.sum()) * module.out_channels / module.groups


@torch.no_grad()
def matmul_ops(module: nn.Module, a: Tensor, b: Tensor) -> tuple[float, float]:
    """(MACs, ACs) of one ``a @ b``."""
    a_kind, b_kind = _kind(module, a), _kind(module, b)
    if a_kind == "spike" and b_kind == "spike":
        return 0.0, float((a.sum(-2) * b.sum(-1)).sum())
    if a_kind != "real":
        return 0.0, _events(a_kind, a) * b.shape[-1]
    if b_kind != "real":
        return 0.0, _events(b_kind, b) * a.shape[-2]
    return float(a.numel()) * b.shape[-1], 0.0


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


@torch.no_grad()
def ann_macs(model: nn.Module, x: Tensor) -> dict:
    """Per-image MACs of a real-valued network on batch ``x``, by
    :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2). Its registry
    covers matmuls, convolutions and the CUDA attention kernels; the CPU flash-attention
    kernel is added here with torch's own SDPA formula. Returns ``{"macs", "per_op"}``."""
    import torch.utils.flop_counter as fc

    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in fc.flop_registry:
        extra[cpu_sdpa] = _cpu_sdpa_flops
    with fc.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        model(x)
    n = max(int(x.shape[0]), 1)
    per_op = {str(op): flops / 2 / n for op, flops in counter.get_flop_counts()["Global"].items()}
    return {"macs": counter.get_total_flops() / 2 / n, "per_op": per_op}


def _bits_of(kind: str, module: Optional[nn.Module], costs: EnergyCosts) -> int:
    """Bits per element of an input of this kind."""
    if kind == "spike":
        return 1
    if kind == "events":
        levels = getattr(getattr(module, "stas_source", None), "levels", 8)
        return 1 + math.ceil(math.log2(levels + 1))
    return costs.activation_bits


class OpCounter:
    """The energy ledger: MACs/ACs per layer and timestep (the conventional figure), the
    full ledger's terms (module docstring), and firing rates per neuron layer.

    Use as a context manager around inference; set ``counter.t`` before each timestep
    (``run_stepwise(..., on_timestep=counter.set_timestep)``) and call
    :meth:`add_images` with each batch size. Multi-step calls are booked as timestep None.

    ``mode="ann"`` books the network as the ANN it stands for (run it for one timestep):
    every layer input real-valued, neurons free identities, compensated ops their plain
    function. ``activation_bits`` (default: ``costs.activation_bits``) and ``int_macs``
    (integer instead of fp32 MACs) make it the quantized ANN.
    """

    def __init__(self, model: nn.Module, costs: Optional[EnergyCosts] = None, *,
                 mode: str = "snn", activation_bits: Optional[int] = None,
                 int_macs: bool = False) -> None:
        if mode not in ("snn", "ann"):
            raise ConfigError(f"mode must be 'snn' or 'ann'; got {mode!r}")
        self.model = model
        self.costs = costs or EnergyCosts()
        self.mode = mode
        self.activation_bits = int(activation_bits or self.costs.activation_bits)
        self.int_macs = bool(int_macs)
        self.t: Optional[int] = None
        self.images = 0
        self.macs: dict[str, dict[Optional[int], float]] = defaultdict(lambda: defaultdict(float))
        self.acs: dict[str, dict[Optional[int], float]] = defaultdict(lambda: defaultdict(float))
        self.terms: dict[Optional[int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.traffic_bits: dict[str, float] = defaultdict(float)  # per memory term
        self.updates = 0.0  # neuron updates (active sites x steps)
        self.spikes: dict[str, float] = defaultdict(float)
        self.sites: dict[str, float] = defaultdict(float)
        self._handles: list = []
        self._neurons: list[nn.Module] = []
        self._blocks: list[nn.Module] = []
        self._served: Optional[int] = None  # images with an active token in this block
        self._active_share = 1.0  # share of this block's tokens that are active
        weights = sum(m.weight.numel() for m in model.modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d)))
        self.weight_bytes = weights * self.costs.weight_bits / 8

    def set_timestep(self, t: Optional[int]) -> None:
        self.t = t

    def add_images(self, n: int) -> None:
        self.images += int(n)

    # -------------------------------------------------------------- booking
    def _book(self, name: str, ops: tuple[float, float]) -> None:
        self.macs[name][self.t] += ops[0]
        self.acs[name][self.t] += ops[1]

    def _term(self, term: str, pj: float) -> None:
        self.terms[self.t][term] += pj

    def _traffic(self, term: str, elements: float, bits: int, buffer_elements: float) -> None:
        """``elements`` accesses of ``bits`` each to an SRAM buffer of ``buffer_elements``."""
        if elements:
            per_bit = self.costs.sram_pj_per_bit(buffer_elements * bits / 8)
            self._term(term, elements * bits * per_bit)
            self.traffic_bits[term] += elements * bits

    def _images(self, x: Tensor) -> int:
        """Images a call serves: the block's images with an active token, else the batch."""
        return self._served if self._served is not None else int(x.shape[0])

    def _produced(self, out: Tensor, bits: int, images: int, elements: Optional[float] = None,
                  per_image: Optional[float] = None) -> None:
        """A tensor written once and read once (``elements``: the active part of ``out``;
        ``per_image``: one image's elements, when ``out`` holds active rows only)."""
        n = float(out.numel()) if elements is None else float(elements)
        buffer = out.numel() / max(images, 1) if per_image is None else per_image
        self._traffic("memory_activations", 2 * n, bits, buffer)

    def _synapses(self, name: str, module: nn.Module, x: Tensor, out: Tensor,
                  ops: tuple[float, float], kind: str) -> None:
        self._book(name, ops)
        c = self.costs
        mac_pj = (c.int_mult_pj + c.int_add_pj) if self.int_macs else (c.fp_mult_pj + c.fp_add_pj)
        pj = ops[0] * mac_pj + ops[1] * c.fp_add_pj
        if kind == "events":
            pj += ops[1] * c.shift_pj
        if getattr(module, "bias", None) is not None:
            pj += out.numel() * c.fp_add_pj
        self._term("synaptic", pj)
        images = self._images(x)
        bits = images * module.weight.numel() * c.weight_bits
        self._term("memory_weights", bits * c.weight_pj_per_bit(self.weight_bytes))
        self.traffic_bits["memory_weights"] += bits
        self._produced(out, c.state_bits if self.mode == "snn" else self.activation_bits, images)

    def _layer_hook(self, name: str, ops_fn):
        def hook(mod, inp, out):
            x = inp[0]
            kind = "real" if self.mode == "ann" else _kind(mod, x)
            if self.mode == "ann":
                ops = (float(x.numel()) * mod.out_features if isinstance(mod, nn.Linear) else
                       float(out.numel()) * (mod.in_channels // mod.groups)
                       * mod.kernel_size[0] * mod.kernel_size[1], 0.0)
            else:
                ops = ops_fn(mod, x, out)
            self._synapses(name, mod, x, out, ops, kind)
        return hook

    def _product_hook(self, name: str):
        """Spike products (SpikeMatMul) and compensated products (``count_ops``)."""
        def hook(mod, inp, out):
            a, b = inp[0], inp[1]
            images, f = self._images(a), self._active_share
            if self.mode == "ann":
                self._book(name, (float(a.numel()) * b.shape[-1], 0.0))
                self._term("synaptic", float(a.numel()) * b.shape[-1] * (
                    self.costs.int_mult_pj + self.costs.int_add_pj if self.int_macs
                    else self.costs.fp_mult_pj + self.costs.fp_add_pj))
                self._produced(out, self.activation_bits, images)
                return
            ops = mod.count_ops(inp, out) if hasattr(mod, "count_ops") else matmul_ops(mod, a, b)
            self._book(name, ops)
            c = self.costs
            pj = ops[0] * c.mac_pj + ops[1] * c.fp_add_pj
            # dense sizes, and the active parts of A and of the output
            rows = inp[2] if len(inp) > 2 and hasattr(inp[2], "dense_b") else None
            if rows is None:
                a_all, b_all, out_all = a.numel(), b.numel(), out.numel()
                a_active, out_active = f * a_all, f * out_all
            else:  # the row execution: A and the output hold the active tokens' rows
                held = max(int(rows.rows.index.numel()), 1)
                dense = rows.rows.batch * rows.rows.tokens / held
                a_all, b_all, out_all = a.numel() * dense, rows.dense_b, out.numel() * dense
                a_active, out_active = a.numel(), out.numel()
            if getattr(mod, "stas_ledger", None) == "compensated_product":
                # events of graded spikes are shifted rows; rescale sum(B) / count and
                # subtract what was emitted; state sum(A), sum(B), emitted read and written
                # (active rows of A and of the output; every key of B is read, the active
                # ones written: halted tokens keep frozen K/V that active queries read)
                pj += ops[1] * c.shift_pj
                self._term("compensation", f * (b_all * c.fp_mult_pj + out_all * c.fp_add_pj))
                per_image = (a_all + b_all + out_all) / max(images, 1)
                self._traffic("memory_state", 2 * (a_active + out_active) + (1 + f) * b_all,
                              c.state_bits, per_image)
            self._term("synaptic", pj)
            self._produced(out, c.state_bits, images, out_active, out_all / max(images, 1))
        return hook

    def _sites(self, x: Tensor, active) -> tuple[float, float]:
        """(active elements of ``x``, elements of one image's dense tensor) for a call with
        ``active`` None, a broadcastable mask, or :class:`TokenRows` (``x`` is then the
        active tokens' rows: the buffer is sized as under the masked execution)."""
        if is_rows(active):
            held = max(int(active.index.numel()), 1)
            return float(x.numel()), x.numel() / held * active.tokens
        n = float(x.numel()) if active is None else float(active.expand_as(x).sum())
        return n, x.numel() / max(self._images(x), 1)

    def _compensated_hook(self, name: str):
        def hook(mod, inp, out):
            x = inp[0]
            n, per_image = self._sites(x, inp[1] if len(inp) > 1 else None)
            adds, mults = NONLINEAR_OPS.get(mod.kind, (0, 0))
            c = self.costs
            self._term("nonlinear", n * (adds * c.fp_add_pj + mults * c.fp_mult_pj))
            images = self._images(x)
            if self.mode == "snn":  # total += x; f(total / count) * count - emitted
                self._term("compensation", n * 2 * (c.fp_add_pj + c.fp_mult_pj))
                self._traffic("memory_state", 4 * n, c.state_bits, per_image)
            self._produced(out, c.state_bits if self.mode == "snn" else self.activation_bits,
                           images, n, per_image)
        return hook

    def _block_step(self, blk: nn.Module):
        step = blk.step

        def wrapped(x, active=None, **kw):
            outer = self._served, self._active_share
            if active is None:
                self._served, self._active_share = int(x.shape[0]), 1.0
            else:
                self._served = int(active.any(-1).sum())
                self._active_share = float(active.float().mean())
            try:
                return step(x, active, **kw)
            finally:
                self._served, self._active_share = outer
        return wrapped

    def __enter__(self) -> "OpCounter":
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(
                    self._layer_hook(name, lambda mod, x, out: linear_ops(mod, x))))
            elif isinstance(m, nn.Conv2d):
                self._handles.append(m.register_forward_hook(self._layer_hook(name, conv_ops)))
            elif hasattr(m, "count_ops") or isinstance(m, SpikeMatMul):
                self._handles.append(m.register_forward_hook(self._product_hook(name)))
            elif getattr(m, "stas_ledger", None) == "compensated":
                self._handles.append(m.register_forward_hook(self._compensated_hook(name)))
            elif isinstance(m, LIF) or hasattr(m, "monitor"):
                m.monitor = lambda neuron, s, active, n=name: self._fired(n, neuron, s, active)
                self._neurons.append(m)
        for blk in getattr(self.model, "blocks", []):
            if hasattr(blk, "step"):
                blk.step = self._block_step(blk)
                self._blocks.append(blk)
        return self

    def _fired(self, name: str, neuron: nn.Module, spikes: Tensor,
               active: Optional[Tensor]) -> None:
        self.spikes[name] += float(spikes.detach().sum())
        sites, per_image = self._sites(spikes, active)
        self.sites[name] += sites
        images = self._images(spikes)
        c = self.costs
        if self.mode == "ann":  # the ANN's activation: its output is an activation tensor
            self._produced(spikes, self.activation_bits, images, sites, per_image)
            return
        self.updates += sites
        adds, mults, shifts = neuron_ops(neuron)
        self._term("neuron", sites * (adds * c.fp_add_pj + mults * c.fp_mult_pj
                                      + shifts * c.shift_pj))
        self._traffic("memory_state", 2 * sites, c.state_bits, per_image)
        levels = getattr(neuron, "levels", None)
        bits = 1 if levels is None else 1 + math.ceil(math.log2(levels + 1))
        self._produced(spikes, bits, images, sites, per_image)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for m in self._neurons:
            m.monitor = None
        for blk in self._blocks:
            del blk.step  # the class's method again
        self._handles, self._neurons, self._blocks = [], [], []

    # -------------------------------------------------------------- results
    def _per_image(self, value: float) -> float:
        return value / max(self.images, 1)

    def ledger(self) -> dict:
        """Per-image full ledger: ``full_mj``, ``terms_mj`` and ``per_timestep``."""
        steps = sorted(self.terms, key=lambda t: (t is None, t or 0))
        per_t = []
        totals = dict.fromkeys(TERMS, 0.0)
        for t in steps:
            terms = {k: self._per_image(self.terms[t].get(k, 0.0)) * 1e-9 for k in TERMS}
            for k, v in terms.items():
                totals[k] += v
            per_t.append({"t": t, "full_mj": sum(terms.values()), "terms_mj": terms})
        traffic = {k: self._per_image(v) / 8 for k, v in self.traffic_bits.items()}
        return {"full_mj": sum(totals.values()), "terms_mj": totals, "per_timestep": per_t,
                "traffic_bytes": traffic, "neuron_updates": self._per_image(self.updates),
                "weight_bytes": self.weight_bytes,
                "weights_on_chip": self.weight_bytes <= self.costs.on_chip_bytes,
                "activation_bits": self.activation_bits, "mode": self.mode}

    def summary(self) -> dict:
        """Per-image figures: ``macs``, ``sops`` (ACs), ``energy_mj`` (conventional), per
        layer and timestep; ``ledger``: the full ledger (:meth:`ledger`)."""
        layers = {}
        steps: dict[Optional[int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for name in sorted(set(self.macs) | set(self.acs)):
            macs = sum(self.macs[name].values())
            acs = sum(self.acs[name].values())
            layers[name] = {"macs": self._per_image(macs), "sops": self._per_image(acs)}
            for t, v in self.macs[name].items():
                steps[t][0] += v
            for t, v in self.acs[name].items():
                steps[t][1] += v
        total_macs = sum(v[0] for v in steps.values())
        total_acs = sum(v[1] for v in steps.values())
        ledger = self.ledger()
        full_t = {e["t"]: e for e in ledger["per_timestep"]}
        per_t = [{"t": t, "macs": self._per_image(m), "sops": self._per_image(a),
                  "energy_mj": self._per_image(self.costs.energy_pj(m, a)) * 1e-9,
                  "full_mj": full_t.get(t, {}).get("full_mj", 0.0)}
                 for t, (m, a) in sorted(steps.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
        return {
            "images": self.images,
            "macs": self._per_image(total_macs),
            "sops": self._per_image(total_acs),
            "energy_mj": self._per_image(self.costs.energy_pj(total_macs, total_acs)) * 1e-9,
            "costs_pj": {"mac": self.costs.mac_pj, "ac": self.costs.ac_pj},
            "per_timestep": per_t,
            "per_layer": layers,
            "firing_rates": {n: self.spikes[n] / self.sites[n] for n in self.spikes if self.sites[n]},
            "ledger": ledger,
        }
