"""``stas-infer``: evaluate an exported ONNX model with onnxruntime (no PyTorch model code).

Reports top-1, images/s and, for halting graphs, the token ratio, with the field names of
the other commands' reports; writes ``OUT/report.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import check_positive_int
from .common import HelpFormatter, add_data_args, add_output_args, run
from .config import add_config_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stas-infer", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="a graph written by stas-export")
    add_data_args(p)
    p.set_defaults(dataset=None)
    p.add_argument("--batch-size", type=int, default=128, help="images per onnxruntime run")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--out", default=None, help="directory for report.json (default: none)")
    p.add_argument("--device", default="auto",
                   help="auto (onnxruntime's CUDA provider when installed), cpu, cuda, cuda:N")
    add_output_args(p)
    add_config_arg(p)
    return p


def _main(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..checkpoint import atomic_write_text
    from ..data import build_datasets
    from ..onnx_runtime import OnnxModel, evaluate_onnx
    from ..train import progress_bar

    check_positive_int("batch_size", args.batch_size)
    model = OnnxModel(args.model, threads=args.threads, device=args.device)
    dataset = args.dataset or model.meta.get("dataset") or "fashion-mnist"
    shape = model.meta.get("input_shape") or []
    frames = shape[0] if len(shape) == 4 else None  # [T, C, H, W]: the graph's event frames
    _, val_ds, info = build_datasets(dataset, data_dir=args.data_dir,
                                     val_subset=args.val_subset, augment=False, frames=frames)
    loader = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False)
    bar = progress_bar(args.progress, len(loader), "onnxruntime", True)
    try:
        ev = evaluate_onnx(model, loader, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    report = {"model_path": str(args.model), "runtime": "onnxruntime", "dataset": info.name,
              "model": model.meta.get("model"), "kind": model.meta.get("kind"),
              "timesteps": model.meta.get("timesteps"), "halting": model.meta.get("halting"),
              "precision": model.meta.get("precision", "float32"),
              "providers": model.providers,
              "batch_size": args.batch_size, **ev}
    if args.out:
        atomic_write_text(Path(args.out) / "report.json", json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
