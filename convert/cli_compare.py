"""``stas-compare``: converted vs direct-trained spiking models across timesteps.

Reads ``stas-convert`` reports (``report.json``) and ``stas-train --direct`` summaries
(``summary.json``; a run directory holding one of them also works), and writes to ``--out``:
``compare.json`` (the table), ``compare.md`` (Markdown, also printed) and ``compare.png``
(top-1 and cumulative energy per image vs timesteps, the ANN reference dashed).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from stas_core.cli.common import HelpFormatter, add_output_args, run

from .compare import (DEFAULT_TOLERANCE_PTS, compare, default_label, load_run, render_png,
                      to_markdown)
from .errors import ConfigError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stas-compare", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="REPORT_OR_SUMMARY",
                   help="report.json of stas-convert or summary.json of stas-train --direct "
                        "(or a run directory holding one)")
    p.add_argument("--labels", default=None, metavar="A,B",
                   help="comma-separated run labels, one per input (default: the run "
                        "directory names)")
    p.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="output directory (default: runs/compare)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_PTS, metavar="PTS",
                   help="report the smallest t within PTS percentage points of each run's "
                        "final top-1 (default: %(default)s)")
    add_output_args(p, progress=False)
    return p


def _labels(args: argparse.Namespace) -> list[str]:
    if args.labels is None:
        out: list[str] = []
        for path in args.inputs:
            base = label = default_label(path)
            n = 2
            while label in out:
                label, n = f"{base}-{n}", n + 1
            out.append(label)
        return out
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != len(args.inputs) or not all(labels):
        raise ConfigError(f"--labels needs one non-empty label per input ({len(args.inputs)}), "
                          f"comma-separated; got {args.labels!r}")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--labels must be unique; got {args.labels!r}")
    return labels


def _main(args: argparse.Namespace) -> int:
    from stas_core.checkpoint import atomic_write, atomic_write_text

    runs = [load_run(path, label) for path, label in zip(args.inputs, _labels(args))]
    table = compare(runs, tolerance_pts=args.tolerance)
    md = to_markdown(table)
    text = json.dumps(table, indent=2, allow_nan=False) + "\n"
    png = render_png(runs)  # everything is computed before anything is written
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.json", text)
        atomic_write_text(out / "compare.md", md)
        atomic_write(out / "compare.png", lambda tmp: Path(tmp).write_bytes(png))
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    logger.info("wrote %s, %s, %s", out / "compare.json", out / "compare.md",
                out / "compare.png")
    print(md, end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
