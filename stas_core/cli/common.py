"""What every command shares: logging set-up, error handling, dataset flags."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from ..errors import StasError
from .config import apply_config_file

PACKAGES = ("stas_core", "halting", "convert", "tuning")


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help: the description as written, and each option's default,
    except None (an option whose default is decided later, e.g. by the model or a
    checkpoint, says so in its own help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be swapped, e.g. by tests)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Log the project's packages to stderr (the root logger is left alone). Idempotent."""
    for name in PACKAGES:
        log = logging.getLogger(name)
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
        if not any(isinstance(h, _StderrHandler) for h in log.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                                   "%H:%M:%S"))
            log.addHandler(handler)
        log.propagate = False


def add_output_args(p: argparse.ArgumentParser, *, progress: bool = True) -> None:
    """``--no-progress`` (where the command shows a bar) and ``--verbose``, worded alike
    on every command."""
    if progress:
        p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                       default=None, help="plain log lines instead of a progress bar "
                                          "(default: a bar when stderr is a terminal)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug-level log lines")


def add_energy_args(p, *, objective: bool = False) -> None:
    """``--energy-images`` and ``--energy-costs`` (``objective``: also ``--energy-model``,
    the figure a study minimises), worded alike on every command."""
    p.add_argument("--energy-images", type=int, default=256,
                   help="validation images used to count ops and energy")
    p.add_argument("--energy-costs", default=None, metavar="FILE",
                   help="JSON object of energy costs (pJ per op and per 64-bit access, bit "
                        "widths, on-chip bytes) replacing the 45 nm defaults of "
                        "stas_core.energy.EnergyCosts; unset keys keep them")
    if objective:
        p.add_argument("--energy-model", choices=["conventional", "full"],
                       default="conventional",
                       help="energy the study minimises: the conventional AC/MAC figure, or "
                            "the full ledger (memory, neuron updates, nonlinear ops)")


def add_halting_knobs(group, defaults=None) -> None:
    """``--alpha``, ``--beta``, ``--eps``, ``--accumulate`` and ``--execution`` with the
    library's defaults: the model kind's :class:`halting.HaltingDefaults` when given (a
    converted ViT's), else :class:`halting.HaltingConfig`'s; :data:`halting.DEFAULT_EXECUTION`."""
    from halting import DEFAULT_EXECUTION, HaltingConfig

    d = defaults if defaults is not None else HaltingConfig()
    group.add_argument("--alpha", type=float, default=d.alpha, help="halting score slope")
    group.add_argument("--beta", type=float, default=d.beta, help="halting score offset")
    group.add_argument("--eps", type=float, default=d.eps, help="halt once H >= 1 - eps")
    group.add_argument("--accumulate", choices=["both", "block", "time"], default=HaltingConfig().accumulate,
                       help="halting scores accumulate over blocks and timesteps (STAS T+B), "
                            "per timestep (A-ViT), or once per timestep")
    group.add_argument("--execution", choices=["gather", "mask"], default=DEFAULT_EXECUTION,
                       help="compute active tokens only, or all tokens with a mask (same "
                            "result)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--data-dir``, ``--train-subset``, ``--val-subset``."""
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist (default, offline), cifar10, cifar100, imagenet; "
                        "event sets (frames [T, 2, H, W], T = --timesteps where the command "
                        "has it): fashion-mnist-dvs (simulated offline from Fashion-MNIST), "
                        "nmnist, dvs-gesture, cifar10-dvs (64x64; -128: full resolution)")
    p.add_argument("--data-dir", default=None, help="dataset root (IDX files, CIFAR, ImageFolder, the event "
                        "sets' tonic folders, the fashion-mnist-dvs cache)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a subset of N training images (seeded by --seed; the "
                        "held-out validation images are never among them)")
    p.add_argument("--val-subset", type=int, default=None, metavar="N",
                   help="evaluate on N images of each split: held-out training images where "
                        "a choice is made, test images where figures are reported (the same "
                        "images for every --seed)")


def _command_parser(parser: argparse.ArgumentParser,
                    argv: Optional[Sequence[str]]) -> argparse.ArgumentParser:
    """The sub-command's parser when ``argv`` names one (``stas-analyze similarity``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in words:
                if word in action.choices:
                    return action.choices[word]
    return parser


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (with ``--config FILE`` defaults when the parser offers that option),
    run ``main``; a user error prints one line and exits non-zero."""
    try:
        apply_config_file(_command_parser(parser, argv), argv)
    except StasError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    from stas_core.kernels import keep_freed_memory

    keep_freed_memory()  # large tensors reuse the process's pages (see its docstring)
    try:
        return main(args)
    except StasError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
