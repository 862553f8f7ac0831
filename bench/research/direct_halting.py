"""Direct-trained STAS against the baselines a reviewer names, over seeds.

    python bench/research/direct_halting.py [--seeds 0 1 2] [--model spikformer-2-64] [-T 4]
        [--train-subset 10000] [--val-subset 2000] [--stage1-epochs 3] [--stage2-epochs 1]
        [--out runs/direct_halting]

Per seed, on the same training subset and the same test images (``--val-subset`` of the
test split, fixed for every seed):

* ``stage1``: the I-SPS backbone, ``--stage1-epochs`` epochs;
* ``stas``: STAS stage 2 from it, ``--stage2-epochs`` epochs, with the hand-set knobs of
  ``bench/research/ablations.py`` (fixed before any measurement: nothing is chosen on the test
  split); its report carries the stage-1 model's fewer-timesteps hull, per-image early exit
  and early exit on top of token halting (:func:`stas_core.baselines.halting_baselines`);
* ``matched``: the same backbone trained from scratch with as many epochs as stage 1 +
  stage 2 at ``T' = max(1, round(r T))`` timesteps, where ``r`` is STAS's token ratio on the
  *validation* split: a smaller model at matched compute;
* token halting + early exit, its threshold chosen on the validation split.

Each comparison is a paired difference over the test images with a bootstrap 95% interval,
then a Student-t interval over the seeds' differences. Resumable (``ablations.Runs``:
finished runs are read back). Writes ``direct_halting.json`` to ``--out`` and prints it.
Run by hand, never in CI.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ablations import HAND, Runs, STAGE1_LR  # bench/ sibling
from stas_core.baselines import (choose_combination_threshold, collect_anytime,
                                 halting_baselines, load_runs)
from stas_core.checkpoint import atomic_write_text
from stas_core.data import build_datasets
from stas_core.provenance import provenance
from stas_core.stats import mcnemar_exact, paired_bootstrap, seed_interval
from stas_core.train import load_trained_model

logger = logging.getLogger("bench.direct_halting")


def _predictions(summary: dict) -> np.lib.npyio.NpzFile:
    return np.load(Path(summary["checkpoint"]).parent / "predictions.npz")


def on_validation(stage1: dict, stas: dict, args) -> tuple[float, float]:
    """On the validation split: STAS's share of computed token-steps (what the matched
    model is sized by) and the early-exit threshold of token halting + early exit."""
    cpu = torch.device("cpu")
    s1_model, _ = load_trained_model(stage1["checkpoint"])
    model, cfg = load_trained_model(stas["checkpoint"])
    _, val, _ = build_datasets("fashion-mnist", split="val", val_subset=args.val_subset,
                               augment=False)
    loader = DataLoader(val, batch_size=256)
    unhalted = collect_anytime(s1_model, loader, cpu, energy_images=args.energy_images)
    halted = collect_anytime(model, loader, cpu, halting=cfg.halting_config(),
                             energy_images=args.energy_images)
    ratio = float(halted.depth.mean()) / (halted.timesteps * len(model.blocks))
    return ratio, choose_combination_threshold(unhalted, halted)


def one_seed(runs: Runs, seed: int, args) -> dict:
    s1 = runs.stage1("integrated", seed)
    stas = runs.stage2("stas", "integrated", seed, halting=True, **HAND)
    ratio, threshold = on_validation(s1, stas, args)
    t_matched = max(1, round(ratio * args.timesteps))
    matched = runs._train(f"integrated/matched_T{t_matched}/seed{seed}", sps="integrated",
                          seed=seed, timesteps=t_matched,
                          epochs=args.stage1_epochs + args.stage2_epochs, lr=STAGE1_LR)
    stas_correct = (_predictions(stas)["halted.pred"][-1] == _predictions(stas)["labels"])
    m = _predictions(matched)
    matched_correct = m["model.pred"][-1] == m["labels"]
    if not np.array_equal(m["labels"], _predictions(stas)["labels"]):
        raise RuntimeError("the matched model and STAS were not measured on the same images")
    runs = load_runs(Path(stas["checkpoint"]).parent / "predictions.npz")
    b = halting_baselines(runs["unhalted"], runs["halted"], combination_threshold=threshold)
    return {
        "seed": seed, "test_images": stas["test_images"],
        "stage1": {"top1": s1["top1"], "energy_mj": s1["energy_mj"],
                   "full_energy_mj": s1["energy"]["full_mj"], "per_t": s1["per_t"]},
        "stas": {"top1": stas["top1"], "energy_mj": stas["energy_mj"],
                 "full_energy_mj": stas["energy"]["full_mj"],
                 "token_ratio": stas["token_ratio"], "val_token_ratio": ratio, "knobs": HAND},
        "matched": {"timesteps": t_matched, "top1": matched["top1"],
                    "energy_mj": matched["energy_mj"],
                    "full_energy_mj": matched["energy"]["full_mj"]},
        "vs": {ledger: {name: {k: v.get(k) for k in ("difference", "ci95", "curve_top1_at_energy",
                                                     "mixture")}
                        for name, v in vs.items()} for ledger, vs in b["vs"].items()},
        "vs_matched": {**paired_bootstrap(stas_correct.astype(float),
                                          matched_correct.astype(float)),
                       "mcnemar": mcnemar_exact(stas_correct, matched_correct)},
        "combination": {ledger: {"threshold_chosen_on_val": threshold, **{
            k: v for k, v in c["chosen"].items()}} for ledger, c in b["combination"].items()},
        "checkpoints": [stas["checkpoint"], s1["checkpoint"], matched["checkpoint"]],
    }


def _named(path: str) -> str:
    """A run's checkpoint by its run folder and file name (no path of this machine)."""
    p = Path(path)
    return f"{p.parent.parent.parent.name}/{p.parent.parent.name}/{p.parent.name}/{p.name}"


def over_seeds(rows: list[dict]) -> dict:
    """Student-t intervals over the seeds' paired differences."""
    out = {}
    for ledger in ("conventional", "full"):
        for name in ("fewer_timesteps", "early_exit"):
            d = [r["vs"][ledger][name]["difference"] for r in rows]
            out[f"{ledger}/vs_{name}"] = None if None in d else seed_interval(d)
    out["vs_matched"] = seed_interval([r["vs_matched"]["difference"] for r in rows])
    for ledger in ("conventional", "full"):
        for name in ("early_exit", "token_halting", "fewer_timesteps"):
            d = [r["combination"][ledger][f"vs_{name}"]["difference"] for r in rows]
            out[f"{ledger}/combination_vs_{name}"] = None if None in d else seed_interval(d)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="spikformer-2-64")
    p.add_argument("-T", "--timesteps", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--stage1-epochs", type=int, default=3)
    p.add_argument("--stage2-epochs", type=int, default=1)
    p.add_argument("--energy-images", type=int, default=256)
    p.add_argument("--out", default="runs/direct_halting")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    runs = Runs(args)
    rows, checkpoints = [], []
    for seed in args.seeds:
        row = one_seed(runs, seed, args)
        checkpoints += row["checkpoints"]
        row["checkpoints"] = [_named(c) for c in row["checkpoints"]]
        rows.append(row)
        result = {"bench": "direct_halting", "model": args.model, "timesteps": args.timesteps,
                  "train_subset": args.train_subset, "stage1_epochs": args.stage1_epochs,
                  "stage2_epochs": args.stage2_epochs, "seeds": rows,
                  "over_seeds": over_seeds(rows) if len(rows) > 1 else None,
                  "provenance": provenance(
                      seeds=[r["seed"] for r in rows],
                      checkpoints=checkpoints,
                      images={"test": build_datasets("fashion-mnist", val_subset=args.val_subset,
                                                     augment=False)[1]},
                      chose="val", reported="test"),
                  "wall_s": round(time.perf_counter() - start, 1)}
        atomic_write_text(Path(args.out) / "direct_halting.json",
                          json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
