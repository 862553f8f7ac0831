"""Time the fused LIF backend against sinabs, side by side in one run.

Compared, on the same input ``[T, B, N, D]`` (tau=2, threshold 1):

* ``fused``: ``stas_core.neurons.LIF(backend='fused')`` (hard reset, detach_reset, Sigmoid),
  which runs the single-pass kernel of ``stas_core.kernels`` on CPU;
* ``fused_torch_ops``: the same backend with ``STAS_KERNELS=0`` (its PyTorch-op form, one
  loop over T with several passes over memory per step);
* ``stas_sinabs``: ``LIF(backend='sinabs')``: sinabs ``LIF`` layer driven with our surrogate
  and reset (identical spikes and gradients to ``fused``);
* ``sinabs_direct``: ``sinabs.layers.LIF`` used directly on ``[B, T, N, D]`` with its defaults
  (MultiSpike, MembraneSubtract, SingleExponential surrogate); same decay ``exp(-1/tau_mem)
  = 1 - 1/tau`` with ``norm_input=True``, ``tau_mem`` frozen so every variant computes only the
  input gradient.

For each: forward only (``no_grad``) and forward + backward (input requires grad, backward of
``sum(spikes * w)`` with a fixed random ``w``); neuron state is reset before every repeat.
Prints one JSON object with shapes, versions, thread count, median seconds, speedups
(``other / fused``), and the machine's memory bandwidth from a plain tensor copy of the same
size (``copy_gb_per_s``) with the least time the kernel's own traffic allows at that rate.

    python bench/neuron_speed.py --T 4 --B 128 --N 49 --D 512 --repeats 5 --warmup 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics

import torch

from stas_core.provenance import provenance_of_args
from stas_core.timing import interleaved_seconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=4, help="timesteps")
    p.add_argument("--B", type=int, default=128, help="batch size")
    p.add_argument("--N", type=int, default=49, help="tokens")
    p.add_argument("--D", type=int, default=512, help="channels")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up repeats")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's current setting)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("T", "B", "N", "D", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--warmup must be >= 0 and --threads >= 1")
    return args


def _median_time(fn, repeats: int, warmup: int) -> float:
    return statistics.median(interleaved_seconds({"fn": fn}, rounds=repeats,
                                                 warmup=warmup)["fn"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    from stas_core.kernels import keep_freed_memory

    malloc_tuned = keep_freed_memory()  # as the CLIs do; every row below shares it
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import sinabs
    import sinabs.layers as sl
    from stas_core.neurons import LIF

    tau = 2.0
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.T, args.B, args.N, args.D)
    x = torch.randn(shape, generator=g) * 2.0 + 1.0  # a good share of neurons fire
    w = torch.randn(shape, generator=g)
    x_bt, w_bt = x.transpose(0, 1).contiguous(), w.transpose(0, 1).contiguous()

    fused = LIF(tau, backend="fused")
    ours_sinabs = LIF(tau, backend="sinabs")
    direct = sl.LIF(tau_mem=-1.0 / math.log(1.0 - 1.0 / tau), norm_input=True)
    direct.tau_mem.requires_grad_(False)

    def ours(neuron, kernels: str = "1"):
        def fwd():
            os.environ["STAS_KERNELS"] = kernels
            neuron.reset()
            with torch.no_grad():
                return neuron(x)

        def fwd_bwd():
            os.environ["STAS_KERNELS"] = kernels
            neuron.reset()
            xi = x.detach().requires_grad_(True)
            (neuron(xi) * w).sum().backward()
            return xi.grad
        return fwd, fwd_bwd

    def direct_fns():
        def fwd():
            direct.reset_states()
            with torch.no_grad():
                return direct(x_bt)

        def fwd_bwd():
            direct.reset_states()
            for name, buf in list(direct.named_buffers()):  # drop the last sample's graph
                setattr(direct, name, buf.detach())
            xi = x_bt.detach().requires_grad_(True)
            (direct(xi) * w_bt).sum().backward()
            return xi.grad
        return fwd, fwd_bwd

    from stas_core import kernels

    runners = {"fused": ours(fused), "fused_torch_ops": ours(fused, "0"),
               "stas_sinabs": ours(ours_sinabs), "sinabs_direct": direct_fns()}

    # sanity: our two backends agree (spikes exactly, gradients closely)
    s_f, s_s = runners["fused"][0](), runners["stas_sinabs"][0]()
    g_f, g_s = runners["fused"][1](), runners["stas_sinabs"][1]()
    agree = {"spikes_equal": bool(torch.equal(s_f, s_s)),
             "grad_max_abs_diff": float((g_f - g_s).abs().max()),
             "fused_firing_rate": float(s_f.mean())}
    del s_f, s_s, g_f, g_s

    medians = {}
    for name, (fwd, fwd_bwd) in runners.items():
        medians[name] = {
            "forward_s": _median_time(fwd, args.repeats, args.warmup),
            "forward_backward_s": _median_time(fwd_bwd, args.repeats, args.warmup),
        }

    os.environ["STAS_KERNELS"] = "1"
    copy_dst = torch.empty_like(x)
    copy_s = _median_time(lambda: copy_dst.copy_(x), args.repeats, args.warmup)
    bandwidth = 2 * x.numel() * x.element_size() / copy_s  # bytes read + written per second
    nbytes = x.numel() * x.element_size()
    # the kernel's traffic: forward reads x, writes spikes; with a backward it also writes H,
    # then reads H and the spikes' gradient and writes the input's
    floor = {"forward_s": 2 * nbytes / bandwidth, "forward_backward_s": 6 * nbytes / bandwidth}

    def ratio(other: str, key: str) -> float:
        return medians[other][key] / medians["fused"][key]

    result = {
        "shape_TBND": list(shape),
        "numel": x.numel(),
        "dtype": str(x.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "sinabs": sinabs.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "kernel": kernels.load() is not None,
        "malloc_keeps_freed_memory": malloc_tuned,
        "copy_gb_per_s": bandwidth / 1e9,
        "bandwidth_floor_seconds": floor,
        "fused_vs_floor": {k: medians["fused"][k] / v for k, v in floor.items()},
        "median_seconds": medians,
        "speedup_vs_fused": {
            "fused_torch_ops_forward": ratio("fused_torch_ops", "forward_s"),
            "fused_torch_ops_forward_backward": ratio("fused_torch_ops", "forward_backward_s"),
            "stas_sinabs_forward": ratio("stas_sinabs", "forward_s"),
            "stas_sinabs_forward_backward": ratio("stas_sinabs", "forward_backward_s"),
            "sinabs_direct_forward": ratio("sinabs_direct", "forward_s"),
            "sinabs_direct_forward_backward": ratio("sinabs_direct", "forward_backward_s"),
        },
        "backends_agree": agree,
    }
    result["provenance"] = provenance_of_args(args)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
