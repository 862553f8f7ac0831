"""onnxruntime vs PyTorch on CPU: images/s of exported spiking transformers, same batches,
one run.

    python bench/onnx_bench.py --direct S1_OR_S2.safetensors --converted MODEL.safetensors \\
        [-T 8] [--halting] [--batch-size 128] [--batches 4] [--rounds 3] [--out runs/onnx_bench]

Each model is exported with ``stas-export``'s library call (``--check`` parity included),
then PyTorch's fastest inference path (direct, no halting: the multi-step forward; converted:
the per-timestep loop; with halting: the ``gather`` execution) and an onnxruntime session
run the same in-memory batches, interleaved, median of rounds. With ``--precision float64``
the converted model's graph computes in double, and PyTorch's float64 run of the same graph
is timed too and is the parity reference. Prints one JSON object.
Run by hand; not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from convert.loading import load_spiking_model
from halting import HaltingConfig, run_halting
from halting.protocol import run_stepwise
from stas_core.provenance import provenance_of_args
from stas_core.timing import median_rates
from stas_core.data import build_datasets
from stas_core.export import InferenceGraph, export_onnx
from stas_core.onnx_runtime import OnnxModel


def bench_one(path: str, args, out: Path, label: str) -> dict:
    loaded = load_spiking_model(path)
    model = loaded.model
    steps = args.timesteps if (args.timesteps and loaded.kind == "converted") else loaded.timesteps
    halting = None
    if args.halting:
        # score and readout left open: the model's own defaults
        halting = loaded.halting or HaltingConfig(alpha=args.alpha, beta=args.beta, eps=args.eps)
    _, val_ds, _ = build_datasets(loaded.dataset or "fashion-mnist",
                                  val_subset=args.batch_size * args.batches, augment=False)
    batches = [x for x, _ in DataLoader(val_ds, batch_size=args.batch_size, shuffle=False)]
    onnx_path = out / f"{label}.onnx"
    precision = args.precision if loaded.kind == "converted" else "float32"
    exported = export_onnx(model, onnx_path, batches[0][:16], timesteps=steps, halting=halting,
                           check=not args.no_check, precision=precision,
                           metadata={"kind": loaded.kind, "model": loaded.name,
                                     "dataset": loaded.dataset})
    ort_model = OnnxModel(onnx_path, threads=torch.get_num_threads())
    if halting is not None:
        torch_fn = lambda x: run_halting(model, x, halting, timesteps=steps, execution="gather")
    elif loaded.kind == "direct" and steps == model.timesteps:
        torch_fn = model  # the multi-step forward
    else:
        torch_fn = lambda x: run_stepwise(model, x, steps)
    runners = {"pytorch": torch_fn, "onnxruntime": lambda x: ort_model(x.numpy())}
    reference = torch_fn
    if precision == "float64":  # the graph's own precision in PyTorch is the reference
        reference = InferenceGraph(model, steps, halting, precision).eval()
        runners["pytorch_float64"] = reference
    logits = lambda out: (out[0] if isinstance(out, tuple)
                          else out.logits if hasattr(out, "logits") else out).numpy()
    with torch.no_grad():
        images = sum(len(x) for x in batches)
        rates = median_rates({k: (lambda fn=fn: [fn(x) for x in batches]) for k, fn in
                              runners.items()}, images, rounds=args.rounds)
        diffs, agree, vs32 = [], [], []  # parity on every timed image, not only the check's
        for x in batches:
            ref = logits(reference(x))
            got = ort_model(x.numpy())["logits"]
            diffs.append(float(abs(got - ref).max()))
            agree.append((got.argmax(-1) == ref.argmax(-1)).mean())
            if precision == "float64":  # how far float32 PyTorch is from the same model
                vs32.append(float(abs(logits(torch_fn(x)) - ref).max()))
    return {"checkpoint": path, "kind": loaded.kind, "model": loaded.name, "timesteps": steps,
            "halting": None if halting is None else halting.__dict__,
            "export_s": exported["export_s"], "onnx_bytes": exported["bytes"],
            "onnx_nodes": exported["nodes"], "checked_at_export": not args.no_check,
            "precision": precision,
            "max_abs_logit_diff": max(diffs), "top1_identical": float(sum(agree) / len(agree)),
            **({"pytorch_float32_vs_float64_max_abs_logit_diff": max(vs32)} if vs32 else {}),
            "images_per_s": rates, "onnxruntime_vs_pytorch": rates["onnxruntime"] / rates["pytorch"],
            "timed_images": sum(len(x) for x in batches), "batch_size": args.batch_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--direct", default=None, help="stas-train checkpoint")
    p.add_argument("--converted", default=None, help="stas-convert model")
    p.add_argument("-T", "--timesteps", type=int, default=8, help="converted model's T")
    p.add_argument("--halting", action="store_true",
                   help="export with halting (trained knobs, else --alpha/--beta/--eps)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=-2.0)
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", choices=["float32", "float64"], default="float32",
                   help="arithmetic in the converted model's graph (direct: always float32)")
    p.add_argument("--no-check", action="store_true",
                   help="export without the parity check (parity is still measured)")
    p.add_argument("--out", default="runs/onnx_bench")
    args = p.parse_args()
    if not (args.direct or args.converted):
        p.error("give --direct and/or --converted")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"bench": "onnx", "models": {}}
    for label, path in (("direct", args.direct), ("converted", args.converted)):
        if path:
            result["models"][label] = bench_one(path, args, out, label)
    result.update({"wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "machine": platform.machine(), "load_average_1m_end": os.getloadavg()[0]})
    result["provenance"] = provenance_of_args(args)
    text = json.dumps(result, indent=2)
    (out / "onnx_bench.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
