"""``stas-export``: write a direct-trained or converted model as an ONNX graph.

All T timesteps are unrolled in the graph (see ``stas_core.export``): input ``images``
``[B, C, H, W]`` (dynamic batch, normalised as for training), output ``logits``; with
halting also ``token_ratio [B]`` and ``depth [B, N]``. ``--precision float64`` computes in
double inside the graph: a converted ViT then reproduces PyTorch exactly, which float32
kernels cannot promise for its spikes (see ``stas_core.onnx_float64``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from stas_core.cli.common import HelpFormatter, add_output_args, run
from stas_core.cli.config import add_config_arg
from stas_core.errors import ConfigError, DataError, check_positive_int
from halting import HaltingDefaults
from stas_core.train import halting_config_of

logger = logging.getLogger("convert.export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stas-export", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                   help="last.safetensors of stas-train, or model.safetensors of stas-convert "
                        "(or give it as --checkpoint, as stas-tune and stas-analyze take it)")
    p.add_argument("--checkpoint", dest="checkpoint_opt", metavar="CKPT", default=None,
                   help="the same as the positional CKPT")
    p.add_argument("--out", required=True,
                   help="output directory (writes OUT/model.onnx), or a file name ending in .onnx")
    p.add_argument("-T", "--timesteps", type=int, default=None,
                   help="timesteps unrolled in the graph (default: the checkpoint's)")
    h = p.add_argument_group("token halting (default: on for a model trained with halting)")
    h.add_argument("--halting", dest="halting", action="store_true", default=None,
                   help="halting inside the graph (default: on for a model trained with it)")
    h.add_argument("--no-halting", dest="halting", action="store_false",
                   help="no halting, also for a model trained with it")
    h.add_argument("--alpha", type=float, default=None,
                   help="default: the trained value, else the model kind's (converted 0.5, "
                        "direct 1.0)")
    h.add_argument("--beta", type=float, default=None,
                   help="default: the trained value, else the model kind's (converted -4, "
                        "direct -2)")
    h.add_argument("--eps", type=float, default=None,
                   help="default: the trained value, else the model kind's (0.01)")
    h.add_argument("--accumulate", choices=["both", "block", "time"], default=None,
                   help="default: trained value or both")
    h.add_argument("--halting-score", choices=["current", "mean", "convergence"], default=None,
                   help="default: the trained value, else the model's ('convergence' for converted "
                        "models, 'current' for direct ones)")
    h.add_argument("--halting-output", choices=["last", "mean_field"], default=None,
                   help="default: the trained value, else the model's ('last' for converted "
                        "models, 'mean_field' for direct ones)")
    h.add_argument("--halted-kv", choices=["frozen", "drop"], default="frozen",
                   help="converted models: a halted token's key/value kept or dropped")
    p.add_argument("--precision", choices=["float32", "float64"], default="float32",
                   help="arithmetic inside the graph (images in and logits out stay float32). "
                        "float64 makes a converted ViT reproduce PyTorch to ~1e-12; in float32 "
                        "its spikes flip on last-bit kernel differences (about 0.1 on logits)")
    c = p.add_argument_group("tracing and checking")
    c.add_argument("--check", action="store_true",
                   help="compare PyTorch and onnxruntime on the sample batch; fail unless "
                        "logits agree within --atol and every top-1 is identical")
    c.add_argument("--atol", type=float, default=1e-4,
                   help="--check: largest logit difference accepted")
    c.add_argument("--sample-images", type=int, default=16,
                   help="validation images used to trace and check")
    c.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    c.add_argument("--data-dir", default=None, help="dataset root of the --check images")
    c.add_argument("--device", default="auto",
                   help="onnxruntime provider of --check: auto (CUDA when onnxruntime's CUDA "
                        "provider is installed), cpu, cuda, cuda:N")
    add_output_args(p, progress=False)
    add_config_arg(p)
    return p


def _sample(loaded, args) -> torch.Tensor:
    """The first validation images of the model's dataset (random images if it is absent)."""
    from stas_core.data import build_datasets

    name = args.dataset or loaded.dataset or "fashion-mnist"
    frames = args.timesteps or loaded.timesteps  # an event set: one frame per timestep
    try:
        _, val_ds, _ = build_datasets(name, data_dir=args.data_dir, augment=False,
                                      frames=frames)
        return torch.stack([val_ds[i][0] for i in range(min(args.sample_images, len(val_ds)))])
    except DataError as exc:
        logger.warning("%s; tracing and checking on random inputs instead", exc)
        shape = _input_shape(loaded.model, frames)
        return torch.randn(args.sample_images, *shape, generator=torch.Generator().manual_seed(0))


def _input_shape(model, frames: int) -> tuple:
    """One sample's shape: ``[C, H, W]``, or ``[T, C, H, W]`` for a model that takes event
    frames (built batch-first)."""
    size = model.img_size if isinstance(model.img_size, tuple) else (model.img_size,) * 2
    lead = (frames,) if getattr(model, "batch_first", False) else ()
    return (*lead, model.in_chans, *size)


def _halting(loaded, args):
    trained = loaded.halting
    on = args.halting if args.halting is not None else trained is not None
    if not on:
        return None
    # not given: what the model was trained with, else its kind's operating point
    start = trained or getattr(loaded.model, "halting_defaults", None) or HaltingDefaults()
    knobs = argparse.Namespace(
        halting=True, execution="mask",
        alpha=args.alpha if args.alpha is not None else start.alpha,
        beta=args.beta if args.beta is not None else start.beta,
        eps=args.eps if args.eps is not None else start.eps,
        accumulate=args.accumulate or (trained.accumulate if trained else "both"))
    # None: what the model was trained with, else the model's own default (export_onnx)
    score = args.halting_score or (trained.score if trained else None)
    output = args.halting_output or (trained.output if trained else None)
    return halting_config_of(knobs, score=score, output=output)


def _checkpoint(args: argparse.Namespace) -> str:
    given = [c for c in (args.checkpoint, args.checkpoint_opt) if c is not None]
    if not given:
        raise ConfigError("no checkpoint given: pass CKPT or --checkpoint CKPT (last.safetensors "
                          "of stas-train or model.safetensors of stas-convert)")
    if len(given) == 2 and given[0] != given[1]:
        raise ConfigError(f"two checkpoints given ({given[0]} and --checkpoint {given[1]}); "
                          "pass one")
    return given[0]


def _onnx_path(out: str) -> Path:
    """``--out``: a ``.onnx`` file name, or a directory that receives ``model.onnx``."""
    path = Path(out)
    return path if path.suffix.lower() == ".onnx" else path / "model.onnx"


def _main(args: argparse.Namespace) -> int:
    from stas_core.export import export_onnx

    from .loading import load_spiking_model

    check_positive_int("sample_images", args.sample_images)
    if args.timesteps is not None:
        check_positive_int("timesteps", args.timesteps)
    checkpoint = _checkpoint(args)
    loaded = load_spiking_model(checkpoint)
    halting = _halting(loaded, args)
    if loaded.kind == "converted":
        loaded.model.set_halted_kv(args.halted_kv)
    result = export_onnx(
        loaded.model, _onnx_path(args.out), _sample(loaded, args), timesteps=args.timesteps or loaded.timesteps,
        halting=halting, check=args.check, atol=args.atol, precision=args.precision,
        device=args.device,
        metadata={"kind": loaded.kind, "model": loaded.name, "dataset": loaded.dataset,
                  "checkpoint": str(checkpoint)})
    print(json.dumps(result, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
