"""Side by side in one process: one unhalted converted timestep with this round's element-wise
kernels on and off (the GELU compensation as one pass; the multi-threshold kernel reading
Q/K/V views in place and writing its membrane over itself), against the ANN pass.

    python bench/converted_step_ab.py --checkpoint vit_fmnist_d6.safetensors --spec vit_fmnist_d6.json

Rounds are interleaved (ANN, kernels on, kernels off, ...); prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

from convert import ops
from convert.calibrate import calibrate
from convert.spiking_vit import SpikingViT
from stas_core.data import build_datasets
from stas_core.kernels import keep_freed_memory

from convert_bench import bench_vit  # bench/ is on the path when run as a script


@contextlib.contextmanager
def round4_kernels():
    """The element-wise path as it was before: compensation through the ops, and the
    neuron kernel on a contiguous copy of its input, writing a new membrane."""
    update, fire = ops.Compensated._kernel_update, ops.MultiThresholdNeuron._fire
    ops.Compensated._kernel_update = lambda self, x, count: None
    ops.MultiThresholdNeuron._fire = lambda self, v, x, in_place=False: fire(self, v, x.contiguous())
    try:
        yield
    finally:
        ops.Compensated._kernel_update, ops.MultiThresholdNeuron._fire = update, fire


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--spec")
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--model-kwargs", default="patch_size=4,depth=6,embed_dim=192,num_heads=3")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    keep_freed_memory()
    train, val, _ = build_datasets("fashion-mnist", augment=False)
    name, _, vit = bench_vit(args)
    vit.eval()
    snn = SpikingViT(vit, levels=8)
    calibrate(snn, DataLoader(Subset(train, range(256)), batch_size=args.batch_size), max_images=256)
    x = next(iter(DataLoader(Subset(val, range(args.batch_size)), batch_size=args.batch_size)))[0]

    twin = copy.deepcopy(snn)  # its own state: each variant keeps the buffers it owns

    def stepper(model):
        def step() -> None:
            tok = model.tokens(x, 1)
            for blk in model.blocks:
                tok = blk.step(tok)
            model.readout(tok)
        return step
    step, step_off = stepper(snn), stepper(twin)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    rows = {"ann": [], "kernels_on": [], "kernels_off": []}
    with torch.no_grad():
        for model in (snn, twin):
            model.reset()
            model.tokens(x, 0)
        for _ in range(2):
            vit(x), step()
            with round4_kernels():
                step_off()
        for _ in range(args.rounds):
            rows["ann"].append(timed(lambda: vit(x)))
            rows["kernels_on"].append(timed(step))
            with round4_kernels():
                rows["kernels_off"].append(timed(step_off))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(json.dumps({
        "bench": "converted_step_ab", "model": name, "batch_size": args.batch_size,
        "rounds": args.rounds, "median_s": med,
        "step_vs_ann": {k: med[k] / med["ann"] for k in ("kernels_on", "kernels_off")},
        "kernels_on_speedup": med["kernels_off"] / med["kernels_on"],
        "per_round_on_vs_off": [b / a for a, b in zip(rows["kernels_on"], rows["kernels_off"])],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
