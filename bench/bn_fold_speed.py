"""Time BatchNorm folded into the LIF kernel against BatchNorm then LIF, side by side.

``stas_core.layers.bn_fire`` runs a BatchNorm and the LIF that reads it as one kernel on
the multi-step path: the batch moments in one read, the normalisation inside the neuron's
pass, the BatchNorm backward's reductions accumulated while the neuron's backward writes its
gradient. Compared here with the two modules (ATen's BatchNorm, then the same LIF kernel),
on the activation shapes of spikformer-2-128 at T=4, batch 128, 28 x 28 input: the patch
splitting's channels-last images ``[T, B, C, H, W]`` and the blocks' tokens ``[T, B, N, C]``.

Per shape: training-mode forward + backward (input and BatchNorm parameters require grad,
backward of ``sum(spikes * w)``), training-mode forward without autograd, and evaluation
forward; the folded and two-module runs alternate repeat by repeat, medians reported.

    python bench/bn_fold_speed.py [--repeats 7] [--warmup 2] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

SHAPES = {  # name: (shape, channel dim); spikformer-2-128, T=4, B=128, 28 x 28
    "sps_conv2 [4,128,32,28,28]": ((4, 128, 32, 28, 28), 2),
    "sps_conv3 [4,128,64,28,28]": ((4, 128, 64, 28, 28), 2),
    "sps_conv4 [4,128,128,14,14]": ((4, 128, 128, 14, 14), 2),
    "block_q/k/v/proj [4,128,49,128]": ((4, 128, 49, 128), -1),
    "block_fc1 [4,128,49,512]": ((4, 128, 49, 512), -1),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--repeats must be >= 1, --warmup >= 0, --threads >= 1")
    from stas_core import kernels
    from stas_core.layers import TokenBN, bn_fire
    from stas_core.neurons import LIF

    malloc_tuned = kernels.keep_freed_memory()  # as the CLIs do; both rows share it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    rows = {}
    for name, (shape, channel_dim) in SHAPES.items():
        x = torch.randn(shape, generator=g) * 1.5 + 0.3
        if channel_dim == 2:  # the patch splitting's layout
            x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, shape[:2])
        w = torch.randn(shape, generator=g)
        channels = shape[channel_dim]
        bn = TokenBN(channels) if channel_dim == -1 else nn.BatchNorm2d(channels)
        lif = LIF(2.0)

        def two_modules(xi):
            y = bn(xi) if channel_dim == -1 else bn(xi.flatten(0, 1)).unflatten(0, shape[:2])
            return lif.multi_step(y)

        def folded(xi):
            return bn_fire(lif, bn, xi, channel_dim)

        def task(run, kind):
            def go():
                lif.reset()
                bn.train(kind != "eval")
                if kind == "train_fwd_bwd":
                    xi = x.detach().requires_grad_(True)
                    (run(xi) * w).sum().backward()
                else:
                    with torch.no_grad():
                        run(x)
            return go

        times: dict = {}
        for kind in ("train_fwd_bwd", "train_fwd", "eval"):
            fns = {"folded": task(folded, kind), "two_modules": task(two_modules, kind)}
            for fn in fns.values():
                for _ in range(args.warmup):
                    fn()
            samples = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[k].append(time.perf_counter() - t0)
            med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
            times[kind] = {"folded_ms": med["folded"] * 1e3,
                           "two_modules_ms": med["two_modules"] * 1e3,
                           "speedup": med["two_modules"] / med["folded"]}
        rows[name] = {"numel": x.numel(), **times}
    result = {"bench": "bn_fold_speed", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "warmup": args.warmup, "kernel": kernels.load() is not None,
              "malloc_keeps_freed_memory": malloc_tuned,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
