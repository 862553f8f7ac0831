"""Ablation: token halting with vs without I-SPS (paper: token ratio x0.70 vs x0.95).

    python bench/isps_ablation.py [--model spikformer-2-64] [--train-subset 10000]
        [--stage1-epochs 2] [--stage2-epochs 1] [--out runs/isps_ablation]

For each patch splitting (integrated, vanilla) it trains stage 1 (no halting) and then
stage 2 (halting, same knobs, same budget) on the same seeded Fashion-MNIST subset, and
reports top-1, token ratio and energy of both stages. Prints one JSON object; run by hand.
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

from stas_core.train import TrainConfig, train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="spikformer-2-64")
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--stage1-epochs", type=int, default=2)
    p.add_argument("--stage2-epochs", type=int, default=1)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=-1.0)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--delta-p", type=float, default=1e-2)
    p.add_argument("--out", default="runs/isps_ablation")
    args = p.parse_args()
    common = dict(model=args.model, timesteps=args.timesteps, batch_size=128,
                  train_subset=args.train_subset, val_subset=args.val_subset,
                  energy_images=256, progress=False, warmup_epochs=0.1)
    start = time.perf_counter()
    result = {"bench": "isps_ablation", "settings": {**common, **vars(args)}, "runs": {}}
    for sps in ("integrated", "vanilla"):
        out = Path(args.out) / sps
        s1 = train(TrainConfig(**common, sps=sps, epochs=args.stage1_epochs, lr=3e-3,
                               out=str(out / "stage1")))
        s2 = train(TrainConfig(**common, sps=sps, epochs=args.stage2_epochs, lr=5e-4,
                               out=str(out / "stage2"), halting=True,
                               init_from=s1["checkpoint"], alpha=args.alpha, beta=args.beta,
                               eps=args.eps, delta_p=args.delta_p))
        result["runs"][sps] = {
            "stage1_top1": s1["top1"], "stage1_energy_mj": s1["energy_mj"],
            "stage2_top1": s2["top1"], "stage2_energy_mj": s2["energy_mj"],
            "token_ratio": s2["token_ratio"], "active_fraction": s2["active_fraction"],
            "energy_reduction": 1 - s2["energy_mj"] / s1["energy_mj"]}
        print(json.dumps({sps: result["runs"][sps]}), file=sys.stderr, flush=True)
    result.update({"wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "machine": platform.machine()})
    text = json.dumps(result, indent=2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "isps_ablation.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
