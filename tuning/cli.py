"""``stas-tune``: Optuna search over the halting knobs alpha, beta, eps (and delta_p on the
direct path) for top-1 against energy per image."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from stas_core.cli.common import (HelpFormatter, add_data_args, add_energy_args, add_output_args,
                                  run)
from stas_core.cli.config import add_config_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stas-tune", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--path", choices=["direct", "converted"], default=None,
                   help="direct: short halting fine-tunes (STAS stage 2) from a stas-train "
                        "stage-1 checkpoint; converted: inference on a stas-convert model "
                        "(default: detected from the checkpoint)")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="stage-1 last.safetensors (--path direct) or model.safetensors "
                        "(--path converted)")
    add_data_args(p)
    p.set_defaults(dataset=None)  # None: the checkpoint's (direct), fashion-mnist (converted)
    p.add_argument("--n-trials", type=int, default=30,
                   help="finished trials the study should hold (a resumed or shared study "
                        "runs only the missing ones)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="start no new trial after S seconds")
    p.add_argument("--study-name", default="stas-tune",
                   help="Optuna study name (workers with the same name and storage share it)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna RDB URL, e.g. postgresql://user:pw@host/db for several workers; "
                        "None: sqlite:///OUT/study.db")
    p.add_argument("--out", default="runs/tune", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (and data subsets)")
    p.add_argument("--trial-epochs", type=int, default=1,
                   help="direct path: halting fine-tune epochs per trial")
    p.add_argument("--trial-lr", type=float, default=None,
                   help="direct path: learning rate of each trial's fine-tune (default: the "
                        "stage-1 run's; STAS's stage 2 uses a lower one, e.g. 5e-4)")
    p.add_argument("--timesteps", "-T", type=int, default=None,
                   help="timesteps; None: the checkpoint's / converted model's T")
    p.add_argument("--batch-size", type=int, default=None,
                   help="None: the checkpoint's (direct), 128 (converted)")
    add_energy_args(p, objective=True)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s = p.add_argument_group("search space and objectives")
    s.add_argument("--range", dest="ranges", action="append", default=[],
                   metavar="KNOB=LOW:HIGH[:log]",
                   help="override a range, e.g. --range alpha=-2:2 --range delta_p=1e-5:1e-3:log "
                        "(defaults: alpha=-4:4 beta=-6:2 eps=0:0.3 delta_p=1e-5:1e-2:log; "
                        "converted: alpha=0:2 beta=-8:-1; its first trial is the measured operating "
                        "point alpha 0.5 beta -4 eps 0.01)")
    s.add_argument("--space", dest="space_file", default=None, metavar="FILE",
                   help='JSON ranges, e.g. {"alpha": [-2, 2], "delta_p": [1e-5, 1e-2, "log"]} '
                        "(--range wins)")
    s.add_argument("--objective", choices=["pareto", "energy"], default="pareto",
                   help="pareto: maximise top-1 and minimise energy (a Pareto front); energy: "
                        "minimise energy subject to top-1 >= --min-top1")
    s.add_argument("--min-top1", type=float, default=None, metavar="F",
                   help="top-1 floor (fraction); --objective pareto: best.json is the cheapest "
                        "Pareto point above it (default: within 0.01 of the best top-1)")
    s.add_argument("--halting-score", choices=["mean", "current", "convergence"], default=None,
                   help="converted path: the halting score the knobs act on (default: the "
                        "model's, convergence: how settled each token's running mean is)")
    s.add_argument("--sampler", choices=["tpe", "nsgaii", "random"], default="tpe",
                   help="Optuna sampler (seeded with --seed)")
    w = p.add_argument_group("workers")
    w.add_argument("--heartbeat-interval", type=int, default=60, metavar="S",
                   help="a running trial beats every S seconds")
    w.add_argument("--grace-period", type=int, default=None, metavar="S",
                   help="a trial silent for S seconds (its worker died) is failed and re-queued "
                        "(default: 2 x heartbeat interval)")
    w.add_argument("--max-retry", type=int, default=3,
                   help="re-queue a dead worker's trial at most this often")
    add_output_args(p)
    add_config_arg(p)
    return p


def _main(args: argparse.Namespace) -> int:
    from .errors import require_optuna

    optuna = require_optuna()
    optuna.logging.set_verbosity(logging.INFO if args.verbose else logging.ERROR)
    from .study import TuneConfig, run_study

    cfg = TuneConfig(
        path=args.path, checkpoint=args.checkpoint, dataset=args.dataset,
        data_dir=args.data_dir, train_subset=args.train_subset, val_subset=args.val_subset,
        n_trials=args.n_trials, timeout=args.timeout, study_name=args.study_name,
        storage=args.storage, out=args.out, seed=args.seed, trial_epochs=args.trial_epochs,
        trial_lr=args.trial_lr,
        timesteps=args.timesteps, batch_size=args.batch_size, energy_images=args.energy_images,
        energy_costs=args.energy_costs, energy_model=args.energy_model,
        device=args.device, objective=args.objective, min_top1=args.min_top1,
        sampler=args.sampler, ranges=tuple(args.ranges), space_file=args.space_file,
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        max_retry=args.max_retry, progress=args.progress, halting_score=args.halting_score)
    summary = run_study(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
