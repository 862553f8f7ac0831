"""Conversion benchmark: accuracy gap SNN - ANN at t = 1, 2, 4, 8, 16, per-step cost
relative to one ANN forward pass, and memory, on a Fashion-MNIST ViT.

    python bench/convert_bench.py --checkpoint VIT.safetensors --spec VIT.json \\
        [--images 2000] [--calib-images 256] [--levels 8] [--batch-size 128] [--compile]

``--spec`` is a JSON file with ``timm_model`` and ``create_model_kwargs`` (the format of the
workload files that come with the project's reference figures). For an ANN trained by
``stas-convert --train-epochs`` pass its ``ann.safetensors`` with ``--model`` and
``--model-kwargs`` instead of ``--spec``. Prints one JSON object. Run by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset

from convert.calibrate import calibrate
from convert.spiking_vit import SpikingViT
from stas_core.timing import interleaved_seconds
from convert.timm_models import create_vit, parse_model_kwargs
from halting.protocol import run_stepwise
from stas_core.data import build_datasets
from stas_core.provenance import provenance_of_args

MARKS = (1, 2, 4, 8, 16, 32)


def bench_vit(args) -> tuple[str, dict, torch.nn.Module]:
    """``(timm name, model kwargs, ViT)`` from ``--spec`` (a workload's JSON) or ``--model`` /
    ``--model-kwargs`` on 28x28 one-channel images, with ``--checkpoint``'s weights."""
    if args.spec:
        spec = json.load(open(args.spec))
        name, kw = spec["timm_model"], dict(spec["create_model_kwargs"])
    else:
        name, kw = args.model, {"img_size": 28, "in_chans": 1, "num_classes": 10,
                                **parse_model_kwargs(args.model_kwargs)}
    vit = create_vit(name, img_size=kw.pop("img_size"), in_chans=kw.pop("in_chans"),
                     num_classes=kw.pop("num_classes"), checkpoint=args.checkpoint,
                     model_kwargs=kw)
    return name, kw, vit


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of per-sample state (membranes, running sums) held by the SNN's modules."""
    total = 0
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                total += v.numel() * v.element_size()
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--spec")
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--model-kwargs", default="", help="e.g. patch_size=4,depth=6")
    p.add_argument("--images", type=int, default=2000, help="first N test images")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--timesteps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile neurons and compensated ops")
    args = p.parse_args()
    from stas_core.kernels import keep_freed_memory

    keep_freed_memory()  # as the CLIs do; the ANN and the SNN share it

    train, val, _ = build_datasets("fashion-mnist", augment=False)
    name, kw, vit = bench_vit(args)
    snn = SpikingViT(vit, levels=args.levels, timesteps=args.timesteps)
    start = time.perf_counter()
    calibrate(snn, DataLoader(Subset(train, range(args.calib_images)), batch_size=args.batch_size),
              max_images=args.calib_images)
    calib_s = time.perf_counter() - start
    if args.compile:
        snn.compile()

    loader = DataLoader(Subset(val, range(args.images)), batch_size=args.batch_size)
    T = args.timesteps
    correct = torch.zeros(T, dtype=torch.float64)
    agree = torch.zeros(T, dtype=torch.float64)
    ann_correct = total = 0
    eval_start = time.perf_counter()
    with torch.no_grad():
        for x, y in loader:
            a = vit(x)
            cum = run_stepwise(snn, x, T, cumulative=True)
            ann_correct += int((a.argmax(-1) == y).sum())
            correct += (cum.argmax(-1) == y).sum(-1).double()
            agree += (cum.argmax(-1) == a.argmax(-1)).sum(-1).double()
            total += len(y)
    eval_s = time.perf_counter() - eval_start
    held = state_bytes(snn)

    x = next(iter(loader))[0]
    with torch.no_grad():
        vit(x)
        snn.reset()
        snn.tokens(x, 0)

        def one_step():
            tok = snn.tokens(x, 1)
            for blk in snn.blocks:
                tok = blk.step(tok)
            snn.readout(tok)
        for _ in range(2):  # the first steps allocate the state
            one_step()
        times = interleaved_seconds({"ann": lambda: vit(x), "step": one_step},
                                    rounds=args.repeats, warmup=0)
        ann_times, step_times = times["ann"], times["step"]
        ann_s, step_s = statistics.median(ann_times), statistics.median(step_times)
        ratios = [s / a for a, s in zip(ann_times, step_times)]
        # memory bandwidth from a plain copy (256 MiB, far beyond the caches): a step reads
        # and writes every state tensor once, which alone takes 2 * state / bandwidth
        src = torch.empty(64 * 2 ** 20)
        dst = torch.empty_like(src)
        copy_s = statistics.median(interleaved_seconds({"copy": lambda: dst.copy_(src)},
                                                       rounds=7, warmup=0)["copy"])
        bandwidth = 2 * src.numel() * src.element_size() / copy_s

    ann_top1 = ann_correct / total
    marks = [t for t in MARKS if t <= T]
    print(json.dumps({
        "bench": "convert", "model": name, "model_kwargs": kw, "checkpoint": os.path.basename(args.checkpoint or ""),
        "images": total, "calib_images": args.calib_images, "levels": args.levels,
        "ann_top1": ann_top1,
        "snn_top1": {t: float(correct[t - 1] / total) for t in marks},
        "gap_points": {t: round(100 * (float(correct[t - 1] / total) - ann_top1), 2) for t in marks},
        "agreement": {t: float(agree[t - 1] / total) for t in marks},
        "batch_size": args.batch_size, "compiled_kernels": args.compile,
        "ann_forward_s": ann_s, "snn_step_s": step_s,
        "snn_step_cost_vs_ann": step_s / ann_s,
        "copy_gb_per_s": bandwidth / 1e9,
        "state_traffic_s": 2 * held / bandwidth,
        "state_traffic_vs_ann": 2 * held / bandwidth / ann_s,
        "step_vs_ann_per_round": {"median": statistics.median(ratios), "min": min(ratios),
                                  "max": max(ratios), "rounds": len(ratios)},
        "calibration_s": calib_s, "eval_s_all_t": eval_s,
        "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "snn_state_mb_at_T": held / 2 ** 20,
        "timesteps": T, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "provenance": provenance_of_args(args),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
