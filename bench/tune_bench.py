"""Tuned halting knobs against hand-set ones: a stas-tune study (30 trials by default) on a
converted model and/or a direct STAS stage-1 checkpoint, then the cheapest Pareto point
whose top-1 is at least that of the hand-set knobs, and the energy it saves. Prints JSON.

    python bench/tune_bench.py --converted runs/convert/model.safetensors --val-subset 1000
    python bench/tune_bench.py --direct runs/direct/last.safetensors --train-subset 6000 \\
        --val-subset 1000 --trial-epochs 1

Run by hand (minutes to hours on a CPU); never part of the test run. The study lives in
OUT/<path>/study.db, so a rerun continues it instead of starting over.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stas_core.provenance import provenance_of_args
from stas_core.cli.common import setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--converted", metavar="MODEL", help="model.safetensors of stas-convert")
    p.add_argument("--direct", metavar="CKPT", help="stage-1 last.safetensors of stas-train")
    p.add_argument("--n-trials", type=int, default=30)
    p.add_argument("--alpha", type=float, default=1.0, help="hand-set knobs to compare with")
    p.add_argument("--beta", type=float, default=-2.0)
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--delta-p", type=float, default=5e-4, help="hand-set delta_p (direct)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-subset", type=int, default=1000)
    p.add_argument("--trial-epochs", type=int, default=1)
    p.add_argument("--timesteps", "-T", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--energy-images", type=int, default=256)
    p.add_argument("--bn-images", type=int, default=None,
                   help="direct: BatchNorm recalibration images per trial epoch (default: "
                        "the stage-1 checkpoint's; 0 measures the study without it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/tune_bench")
    args = p.parse_args(argv)
    if not (args.converted or args.direct):
        p.error("give --converted MODEL and/or --direct CKPT")
    return args


def bench_path(path: str, checkpoint: str, args: argparse.Namespace) -> dict:
    """Hand-set knobs once, then the study; the cheapest point at equal-or-better top-1."""
    from tuning.export import pareto_front
    from tuning.objectives import check_kind
    from tuning.storage import open_storage
    from tuning.study import TuneConfig, build_trial, run_study, trial_record

    cfg = TuneConfig(path=path, checkpoint=checkpoint, dataset=args.dataset,
                     data_dir=args.data_dir, train_subset=args.train_subset,
                     val_subset=args.val_subset, n_trials=args.n_trials,
                     study_name=f"tune-bench-{path}", out=str(Path(args.out) / path),
                     seed=args.seed, trial_epochs=args.trial_epochs, timesteps=args.timesteps,
                     batch_size=args.batch_size, energy_images=args.energy_images,
                     device=args.device).validate()
    hand = {"alpha": args.alpha, "beta": args.beta, "eps": args.eps}
    if path == "direct":
        hand["delta_p"] = args.delta_p
    start = time.perf_counter()
    trial = build_trial(cfg, check_kind(checkpoint, path))
    if path == "direct" and args.bn_images is not None:
        import dataclasses

        trial.base = dataclasses.replace(trial.base, bn_images=args.bn_images)
    reference = trial(hand, "hand-set", None)
    hand_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = run_study(cfg, evaluate=trial)
    study_s = time.perf_counter() - start

    import optuna

    study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg.storage_url))
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    front = pareto_front(records)
    ok = [r for r in front if r["top1"] >= reference["top1"]]
    best = min(ok, key=lambda r: r["energy_mj"]) if ok else None
    point = (lambda r: None if r is None else {
        "trial": r["number"], "params": r["params"], "top1": r["top1"],
        "energy_mj": r["energy_mj"], "token_ratio": r["token_ratio"]})
    return {
        "checkpoint": checkpoint, "n_trials": summary["complete_trials"],
        **({"bn_images": trial.base.bn_images} if path == "direct" else {}),
        "hand_set": {"params": hand, **{k: reference[k] for k in ("top1", "energy_mj",
                                                                 "token_ratio")}},
        "best_at_equal_or_better_top1": point(best),
        "energy_saving": None if best is None else 1.0 - best["energy_mj"] / reference["energy_mj"],
        "most_accurate": point(max(front, key=lambda r: r["top1"]) if front else None),
        "pareto_points": len(front),
        # the points above were chosen and compared on the validation split; the study's
        # chosen trial measured once on the test split, against its baselines:
        "compared_on": "val", "best_on_test": summary.get("best_on_test"),
        "hand_set_s": hand_s, "study_s": study_s,
        "files": summary["files"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    result = {"n_trials": args.n_trials, "val_subset": args.val_subset}
    if args.converted:
        result["converted"] = bench_path("converted", args.converted, args)
    if args.direct:
        result["direct"] = bench_path("direct", args.direct, args)
    result["provenance"] = provenance_of_args(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
