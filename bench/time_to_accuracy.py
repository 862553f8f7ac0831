"""Time-to-accuracy of the recommended CPU recipe on Fashion-MNIST (full 10k test set).

    python bench/time_to_accuracy.py [--epochs 7] [--target 0.90] [--out runs/tta]

Runs ``stas-train --direct`` in-process with the recipe below and prints one JSON object:
validation top-1 after every epoch with the wall-clock time elapsed since the start (data
loading, training and evaluation included), and when the target was first reached.
Run by hand (about an hour on a 2-core CPU); not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from stas_core.provenance import provenance_of_args
from stas_core.train import TrainConfig, train

RECIPE = dict(model="spikformer-2-128", timesteps=4, sps="integrated", batch_size=128, lr=3e-3,
              weight_decay=0.05, warmup_epochs=0.2, label_smoothing=0.1, augment=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--budget-s", type=float, default=3600.0)
    p.add_argument("--out", default="runs/tta")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    summary = train(TrainConfig(**RECIPE, epochs=args.epochs, out=args.out, seed=args.seed,
                                progress=False, energy_images=512))
    curve = [{"epoch": h["epoch"], "elapsed_s": round(h["elapsed_s"], 1),
              "val_top1": h["val_top1"], "train_top1": h["train_top1"]} for h in summary["history"]]
    reached = next((c for c in curve if c["val_top1"] >= args.target), None)
    print(json.dumps({
        "bench": "time_to_accuracy", "recipe": RECIPE, "epochs": args.epochs,
        "dataset": "fashion-mnist", "test_images": summary["test_images"],
        "target_top1": args.target, "budget_s": args.budget_s,
        "reached_target": reached is not None,
        "time_to_target_s": reached["elapsed_s"] if reached else None,
        "within_budget": bool(reached and reached["elapsed_s"] <= args.budget_s),
        "final_top1": summary["top1"], "total_wall_s": round(time.perf_counter() - start, 1),
        "curve": curve, "energy_mj": summary["energy_mj"],
        "train_images_per_s": [h["train_images_per_s"] for h in summary["history"]],
        "eval_images_per_s": summary["images_per_s"],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average_1m_end": os.getloadavg()[0],
        "provenance": provenance_of_args(args),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
