"""``stas-convert MODEL``: convert a timm ViT into a spiking transformer and report its
accuracy, energy and speed at every timestep."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from stas_core.cli.common import (HelpFormatter, add_data_args, add_energy_args, add_halting_knobs,
                                  add_output_args, run)
from stas_core.cli.config import add_config_arg

from .timm_models import parse_model_kwargs, supported_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stas-convert", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("model", help=f"timm ViT name; supported: {'; '.join(supported_models())}")
    add_data_args(p)
    p.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                   help="extra timm.create_model keywords, e.g. patch_size=4,depth=6")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true",
                     help="timm's pretrained weights (needs network)")
    src.add_argument("--pretrained-file", default=None, metavar="FILE",
                     help="timm's pretrained loading from a local file (adapts in_chans/classes)")
    src.add_argument("--checkpoint", default=None, metavar="FILE",
                     help="state dict of the ViT (.safetensors, or a weights-only torch file)")
    src.add_argument("--random-init", action="store_true",
                     help="convert randomly initialised weights (experiments; without any "
                          "weight source the conversion is refused)")
    p.add_argument("--train-epochs", type=int, default=0,
                   help="train / fine-tune the ANN on the dataset first (offline path)")
    p.add_argument("--train-lr", type=float, default=1e-3,
                   help="peak learning rate of --train-epochs")
    p.add_argument("--halting-finetune", type=int, default=0, metavar="N",
                   help="epochs of A-ViT halting fine-tune of the ANN before conversion: "
                        "channel 0 learns when a token is done, and the SNN's halting score "
                        "reads it (convert.halting_finetune)")
    p.add_argument("--halting-finetune-lr", type=float, default=1e-4,
                   help="peak learning rate of --halting-finetune")
    p.add_argument("--halting-finetune-delta-p", type=float, default=5e-4,
                   help="weight of the ANN's ponder loss in --halting-finetune")
    p.add_argument("--timesteps", "-T", type=int, default=16,
                   help="evaluate every t = 1..T in one pass")
    p.add_argument("--levels", type=int, default=8, help="thresholds per neuron (theta 2^-i)")
    p.add_argument("--calib-images", type=int, default=256,
                   help="training images that calibrate the neuron thresholds")
    p.add_argument("--calib-method", choices=["mse", "percentile"], default="mse",
                   help="threshold per site: least quantisation error, or a percentile")
    p.add_argument("--calib-percentile", type=float, default=99.99,
                   help="percentile of |activation| for --calib-method percentile")
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per batch (calibration, evaluation, ANN training)")
    add_energy_args(p)
    p.add_argument("--out", default="runs/convert",
                   help="output directory (model.safetensors, report.json, report.png)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of subsets and ANN training")
    p.add_argument("--compile", action="store_true",
                   help="fuse the element-wise work of neurons and compensated ops with "
                        "torch.compile (needs a C++ compiler; compiles for 10-60 s first)")
    h = p.add_argument_group("token halting at inference")
    h.add_argument("--halting", action="store_true",
                   help="also evaluate with 2-D token halting (report.json's halted rows: top-1, "
                        "energy and token ratio per t)")
    from .spiking_vit import SpikingViT

    add_halting_knobs(h, SpikingViT.halting_defaults)
    h.add_argument("--halting-score", choices=["mean", "current", "convergence"], default=None,
                   help="score from the running mean of channel 0 (mean), the current step's "
                        "channel 0 (current), or how settled the token's running mean is "
                        "(convergence: -log of its relative change between timesteps); "
                        "default: the model's, convergence")
    h.add_argument("--halting-output", choices=["last", "mean_field"], default=None,
                   help="read out the last block every timestep (default: the model's; a "
                        "converted ViT's stateful readout supports only this)")
    h.add_argument("--halted-kv", choices=["frozen", "drop"], default="frozen",
                   help="a halted token's key/value: kept (running mean) or dropped")
    add_config_arg(p)
    add_output_args(p)
    return p


def _main(args: argparse.Namespace) -> int:
    from .pipeline import ConvertConfig, convert

    cfg = ConvertConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir,
        model_kwargs=parse_model_kwargs(args.model_kwargs), pretrained=args.pretrained,
        pretrained_file=args.pretrained_file, checkpoint=args.checkpoint,
        train_epochs=args.train_epochs, train_lr=args.train_lr, random_init=args.random_init,
        train_subset=args.train_subset, val_subset=args.val_subset, timesteps=args.timesteps,
        levels=args.levels, calib_images=args.calib_images, calib_method=args.calib_method,
        calib_percentile=args.calib_percentile, batch_size=args.batch_size,
        energy_images=args.energy_images, energy_costs=args.energy_costs, out=args.out,
        halting_finetune=args.halting_finetune, halting_finetune_lr=args.halting_finetune_lr,
        halting_finetune_delta_p=args.halting_finetune_delta_p, device=args.device, seed=args.seed,
        compile=args.compile, halting=args.halting, alpha=args.alpha, beta=args.beta,
        eps=args.eps, accumulate=args.accumulate, halting_score=args.halting_score, execution=args.execution,
        halting_output=args.halting_output, halted_kv=args.halted_kv,
        progress=args.progress)
    report = convert(cfg)
    keep = ("t", "top1", "energy_mj", "full_energy_mj", "token_ratio", "images_per_s")
    brief = {**{k: report[k] for k in ("model_path", "top1", "energy_mj", "full_energy_mj",
                                       "images_per_s", "snn_step_cost_vs_ann", "reference",
                                       "plot")},
             "per_t": [{k: r[k] for k in keep if k in r} for r in report["per_t"]],
             **({"halted": report["halted"]} if "halted" in report else {})}
    print(json.dumps(brief, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
