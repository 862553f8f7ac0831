"""``stas-train --direct``: train a spiking transformer with surrogate gradients."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..models import list_models
from ..train import MODEL_DEFAULTS, NEURON_DEFAULTS, TrainConfig
from .common import (HelpFormatter, add_data_args, add_energy_args, add_halting_knobs,
                     add_output_args, run)
from .config import add_config_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stas-train", description=__doc__,
        formatter_class=HelpFormatter)
    p.add_argument("--direct", action="store_true", required=True,
                   help="direct training with surrogate gradients (the only mode so far)")
    inherited = "; with --init-from: the stage-1 checkpoint's"
    p.add_argument("--model", default=None,
                   help=f"<family>-<blocks>-<dim> (default: {MODEL_DEFAULTS['model']}"
                        f"{inherited}); registered: {', '.join(list_models())}")
    add_data_args(p)
    p.add_argument("--timesteps", "-T", type=int, default=None,
                   help=f"timesteps, and the frame count of an event set (default: {MODEL_DEFAULTS['timesteps']}{inherited})")
    p.add_argument("--sps", choices=["integrated", "vanilla"], default=None,
                   help=f"I-SPS (one patch-splitting pass) or per-timestep SPS (default: "
                        f"{MODEL_DEFAULTS['sps']}{inherited})")
    p.add_argument("--integrate", choices=["max", "mean", "learned"], default=None,
                   help=f"how I-SPS merges a time-varying input's frames (learned: a "
                        f"trained softmax-weighted sum) (default: "
                        f"{MODEL_DEFAULTS['integrate']}{inherited})")
    p.add_argument("--epochs", type=int, default=1, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over ranks)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=float, default=0.2,
                   help="linear warmup (epochs, fractions allowed), then cosine decay")
    p.add_argument("--label-smoothing", type=float, default=0.1,
                   help="label smoothing of the cross-entropy loss")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop/flip during training")
    p.add_argument("--tau", type=float, default=None,
                   help=f"LIF time constant (default: {NEURON_DEFAULTS['tau']}{inherited})")
    p.add_argument("--surrogate", choices=["sigmoid", "atan"], default=None,
                   help=f"surrogate gradient (default: {NEURON_DEFAULTS['surrogate']}{inherited})")
    p.add_argument("--backend", choices=["fused", "sinabs"], default=None,
                   help=f"neuron implementation (default: {NEURON_DEFAULTS['backend']}"
                        f"{inherited})")
    p.add_argument("--bn-images", type=int, default=TrainConfig.bn_images, metavar="N",
                   help="training images (not augmented) that recompute the BatchNorm "
                        "statistics after every epoch, so the evaluated and saved model "
                        "matches its final weights (0: keep the running averages)")
    p.add_argument("--amp", dest="amp", action="store_const", const=True, default=None,
                   help="mixed precision (default: on CUDA only; bfloat16 on the CPU)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False,
                   help="full float32 precision on CUDA too")
    h = p.add_argument_group("token halting (STAS stage 2)")
    h.add_argument("--halting", action="store_true",
                   help="train with 2-D token halting (mean-field task loss + ponder loss)")
    h.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from a stage-1 (I-SPS, no halting) checkpoint; its model, "
                        "timesteps, SPS, integration and neuron settings are used")
    add_halting_knobs(h)
    h.add_argument("--delta-p", type=float, default=TrainConfig.delta_p,
                   help="ponder loss weight")
    h.add_argument("--halting-output", choices=["mean_field", "last"], default=None,
                   help="train on the mean-field readout (STAS) or the last block's "
                        "(default: the model's, mean_field)")
    p.add_argument("--out", default="runs/direct", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of weights, data order, subsets and augmentation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    add_energy_args(p)
    add_config_arg(p)
    add_output_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` parsed options describe (unset model settings stay None:
    defaults or the --init-from checkpoint's, see :meth:`TrainConfig.resolved`)."""
    neuron = {k: getattr(args, k) for k in NEURON_DEFAULTS if getattr(args, k) is not None}
    return TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir,
        timesteps=args.timesteps, sps=args.sps, integrate=args.integrate, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        train_subset=args.train_subset, val_subset=args.val_subset, augment=args.augment,
        out=args.out, resume=args.resume, seed=args.seed, device=args.device,
        workers=args.workers, energy_images=args.energy_images, energy_costs=args.energy_costs,
        progress=args.progress,
        neuron=neuron, bn_images=args.bn_images, amp=args.amp,
        halting=args.halting, init_from=args.init_from, alpha=args.alpha, beta=args.beta,
        eps=args.eps, delta_p=args.delta_p, accumulate=args.accumulate, execution=args.execution,
        halting_output=args.halting_output)


def _main(args: argparse.Namespace) -> int:
    from ..train import train

    summary = train(config_from_args(args))
    if summary is not None:
        keys = ("checkpoint", "top1", "timesteps", "energy_mj", "sops", "macs", "wall_s",
                "images_per_s", "token_ratio")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
