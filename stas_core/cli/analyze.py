"""``stas-analyze``: analyses of trained spiking transformers.

``stas-analyze similarity``: how much each block's input tokens change between consecutive
timesteps (mean cosine similarity), the paper's argument for I-SPS. ``--compare-sps``
evaluates the same trained weights with vanilla and integrated SPS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError, check_positive_int
from .common import HelpFormatter, add_data_args, add_output_args, run
from .config import add_config_arg


def _labelled(specs: Sequence[str]) -> dict[str, str]:
    """``LABEL=PATH`` or ``PATH`` (label: the run directory's name) -> ``{label: path}``."""
    out: dict[str, str] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            path = spec
            p = Path(spec)
            label = p.parent.name or p.stem
        if not label or not path:
            raise ConfigError(f"--checkpoints entries are PATH or LABEL=PATH; got {spec!r}")
        base, n = label, 2
        while label in out:
            label, n = f"{base}-{n}", n + 1
        out[label] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stas-analyze", description=__doc__,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("similarity", formatter_class=HelpFormatter,
                       help="temporal similarity of block input tokens (vanilla SPS vs I-SPS)",
                       description="Mean cosine similarity of each block's input tokens between "
                                   "consecutive timesteps (identical vectors, also two zero "
                                   "vectors: 1; one zero vector: 0). Writes OUT/similarity.json "
                                   "and OUT/similarity.png and prints the JSON.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="a stas-train checkpoint")
    src.add_argument("--checkpoints", nargs="+", metavar="[LABEL=]CKPT",
                     help="several checkpoints, one line each (label: run directory name)")
    s.add_argument("--compare-sps", action="store_true",
                   help="with --checkpoint: the same weights with sps=vanilla and sps=integrated")
    add_data_args(s)
    for action in s._actions:  # default to the dataset the checkpoint was trained on
        if action.dest == "dataset":
            action.default = None
            action.help = ("fashion-mnist, cifar10, cifar100, imagenet (None: the first "
                           "checkpoint's dataset); the validation split is used")
        elif action.dest == "train_subset":  # only the validation split is read
            action.help = argparse.SUPPRESS
    s.add_argument("--images", type=int, default=256, metavar="N",
                   help="validation images to average over")
    s.add_argument("--timesteps", "-T", type=int, default=None,
                   help="override the checkpoint's timesteps (default: as trained)")
    s.add_argument("--batch-size", type=int, default=64, help="images per batch")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--out", default="runs/analysis", help="output directory")
    add_output_args(s)
    add_config_arg(s)
    s.set_defaults(func=_similarity)
    return p


def _similarity(args: argparse.Namespace) -> int:
    from ..analysis import plot_similarity, similarity_report, sps_variants
    from ..checkpoint import atomic_write_text
    from ..train import resolve_device

    if args.compare_sps and not args.checkpoint:
        raise ConfigError("--compare-sps needs --checkpoint (one checkpoint evaluated both ways)")
    check_positive_int("--images", args.images)
    check_positive_int("--batch-size", args.batch_size)
    if args.checkpoint:
        models = (sps_variants(args.checkpoint) if args.compare_sps
                  else {Path(args.checkpoint).parent.name or "run": args.checkpoint})
    else:
        models = _labelled(args.checkpoints)
    report = similarity_report(
        models, device=resolve_device(args.device), max_images=args.images,
        batch_size=args.batch_size, dataset=args.dataset, data_dir=args.data_dir,
        val_subset=args.val_subset, timesteps=args.timesteps, progress=args.progress)
    out = Path(args.out)
    report["json"], report["png"] = str(out / "similarity.json"), str(out / "similarity.png")
    text = json.dumps(report, indent=2)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "similarity.json", text + "\n")
        plot_similarity(report, out / "similarity.png")
    except OSError as exc:
        raise ConfigError(f"cannot write results to --out {out}: {exc}") from None
    print(text)
    return 0


def _main(args: argparse.Namespace) -> int:
    return args.func(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
