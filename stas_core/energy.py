"""One op counter for every model, so energy comparisons are fair.

Rules (DESIGN.md, "Energy accounting"):

* a layer whose input is real-valued costs MACs: ``Linear``: tokens x in x out;
  ``Conv``: output elements x (in / groups) x k x k;
* a layer whose input is spikes (non-negative integer spike counts) costs ACs, one per
  input spike per synapse it reaches: ``Linear``: spikes x out; ``Conv``: for every
  output position, the spikes in its receptive field, times out channels (exact);
* a spike-by-spike product ``A @ B`` (Q K^T, attn V) costs one AC per coinciding pair,
  ``sum_k (sum_i A_ik)(sum_j B_kj)``; with one real operand, spikes x fan-out.

A layer may force its kind with the attribute ``stas_input = 'spike' | 'events' | 'real'``
('events': graded spikes of a multi-threshold neuron, one AC per nonzero input and
synapse); else the input decides. A module with a ``count_ops(inputs, output)`` method
reports its own ``(MACs, ACs)``. Counts are per layer and per timestep (``counter.t``, set by the per-timestep
runner), and only what is computed is counted: halted tokens send no spikes, so they add
nothing. Energy: ``E = mac_pj * MACs + ac_pj * ACs`` (45 nm figures of Horowitz 2014).
Scalings by powers of two (attention's 0.125) and BatchNorm, folded into the weights at
inference, are not counted.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import SpikeMatMul
from .neurons import LIF


@dataclass(frozen=True)
class EnergyCosts:
    """Energy per operation in picojoules."""

    mac_pj: float = 4.6
    ac_pj: float = 0.9

    def energy_pj(self, macs: float, acs: float) -> float:
        return self.mac_pj * macs + self.ac_pj * acs


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


class OpCounter:
    """Count MACs/ACs per layer and timestep, and firing rates per neuron layer.

    Use as a context manager around inference; set ``counter.t`` before each timestep
    (``run_stepwise(..., on_timestep=counter.set_timestep)``) and call
    :meth:`add_images` with each batch size. Multi-step calls are booked as timestep None.
    """

    def __init__(self, model: nn.Module, costs: Optional[EnergyCosts] = None) -> None:
        self.model = model
        self.costs = costs or EnergyCosts()
        self.t: Optional[int] = None
        self.images = 0
        self.macs: dict[str, dict[Optional[int], float]] = defaultdict(lambda: defaultdict(float))
        self.acs: dict[str, dict[Optional[int], float]] = defaultdict(lambda: defaultdict(float))
        self.spikes: dict[str, float] = defaultdict(float)
        self.sites: dict[str, float] = defaultdict(float)
        self._handles: list = []
        self._neurons: list[nn.Module] = []

    def set_timestep(self, t: Optional[int]) -> None:
        self.t = t

    def add_images(self, n: int) -> None:
        self.images += int(n)

    # -------------------------------------------------------------- hooks
    def _book(self, name: str, ops: tuple[float, float]) -> None:
        self.macs[name][self.t] += ops[0]
        self.acs[name][self.t] += ops[1]

    def __enter__(self) -> "OpCounter":
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(
                    lambda mod, inp, out, n=name: self._book(n, linear_ops(mod, inp[0]))))
            elif isinstance(m, nn.Conv2d):
                self._handles.append(m.register_forward_hook(
                    lambda mod, inp, out, n=name: self._book(n, conv_ops(mod, inp[0], out))))
            elif hasattr(m, "count_ops"):  # modules that know their own cost
                self._handles.append(m.register_forward_hook(
                    lambda mod, inp, out, n=name: self._book(n, mod.count_ops(inp, out))))
            elif isinstance(m, SpikeMatMul):
                self._handles.append(m.register_forward_hook(
                    lambda mod, inp, out, n=name: self._book(n, matmul_ops(mod, *inp))))
            elif isinstance(m, LIF) or hasattr(m, "monitor"):
                m.monitor = lambda neuron, s, active, n=name: self._fired(n, s, active)
                self._neurons.append(m)
        return self

    def _fired(self, name: str, spikes: Tensor, active: Optional[Tensor]) -> None:
        self.spikes[name] += float(spikes.detach().sum())
        sites = spikes.numel() if active is None else float(active.expand_as(spikes).sum())
        self.sites[name] += sites

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for m in self._neurons:
            m.monitor = None
        self._handles, self._neurons = [], []

    # -------------------------------------------------------------- results
    def _per_image(self, value: float) -> float:
        return value / max(self.images, 1)

    def summary(self) -> dict:
        """Per-image figures: ``macs``, ``sops`` (ACs), ``energy_mj``, per layer and timestep."""
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
        per_t = [{"t": t, "macs": self._per_image(m), "sops": self._per_image(a),
                  "energy_mj": self._per_image(self.costs.energy_pj(m, a)) * 1e-9}
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
        }
