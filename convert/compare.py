"""Converted (ANN -> SNN) vs direct-trained spiking models, across timesteps.

Inputs are the run reports the project's commands write (``stas_core.report``, schema
``stas-run/1``): ``report.json`` of ``stas-convert`` and ``summary.json`` of ``stas-train``.
Both list ``per_t`` rows ``{t, top1, energy_mj, full_energy_mj}`` (t from 1, energies
cumulative per image: the model stopped after t); a converted report's ``reference`` is the
source ANN.

:func:`load_run` reads either file as a :class:`Run`, :func:`compare` tabulates runs
(JSON-able), :func:`to_markdown` renders the table, :func:`plot` writes a two-panel PNG.
Accuracies are fractions in [0, 1] throughout; they are shown as percentages.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from stas_core.report import read_run_report

from .errors import ConfigError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

CONVERTED = "converted"
DIRECT = "direct"
DEFAULT_TOLERANCE_PTS = 0.5

@dataclass
class Run:
    """One model's accuracy and cumulative energy per image at each evaluated timestep count.

    ``timesteps`` is ascending; ``top1[i]`` / ``energy_mj[i]`` belong to ``timesteps[i]``
    (``energy_mj[i]`` is ``None`` where the input does not give it). ``reference_*`` are the
    source ANN's figures of a converted run (``None`` for a direct run).
    """

    label: str
    kind: str
    dataset: Optional[str]
    model: Optional[str]
    timesteps: list[int]
    top1: list[float]
    energy_mj: list[Optional[float]]
    reference_top1: Optional[float] = None
    reference_energy_mj: Optional[float] = None
    images_per_s: Optional[float] = None
    reference_images_per_s: Optional[float] = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    #: the full ledger (stas_core.energy), per timestep when the input carries it
    full_energy_mj: list[Optional[float]] = field(default_factory=list)
    qann_full_energy_mj: list[Optional[float]] = field(default_factory=list)
    reference_full_energy_mj: Optional[float] = None

    def energy_at(self, t: int) -> Optional[float]:
        return self.energy_mj[self.timesteps.index(t)]


# ----------------------------------------------------------------------------- loading
def _number(p: Path, name: str, value: Any, *, optional: bool = False,
            unit_interval: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{p}: {name} must be a finite number, got {value!r}")
    value = float(value)
    if unit_interval and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{p}: {name} is a top-1 accuracy, a fraction in [0, 1]; got {value!r}")
    if not unit_interval and value < 0:
        raise ConfigError(f"{p}: {name} must be >= 0, got {value!r}")
    return value


def _rows(p: Path, rows: list) -> list[dict]:
    """``per_t`` rows checked: t an integer >= 1, once each; top-1 in [0, 1]; energies >= 0."""
    out, seen = [], set()
    for i, r in enumerate(rows):
        t = r.get("t") if isinstance(r, dict) else None
        if isinstance(t, bool) or not isinstance(t, int) or t < 1 or t in seen:
            raise ConfigError(f"{p}: per_t[{i}] must be an object with t an integer >= 1 "
                              f"(each t once), got {r!r}")
        seen.add(t)
        out.append({"t": t, "top1": _number(p, f"per_t[{i}].top1", r.get("top1"),
                                             unit_interval=True),
                    **{k: _number(p, f"per_t[{i}].{k}", r.get(k), optional=True)
                       for k in ("energy_mj", "full_energy_mj", "qann_full_energy_mj")}})
    return sorted(out, key=lambda r: r["t"])


def default_label(path: PathLike) -> str:
    """The run directory's name (``runs/direct/summary.json`` -> ``direct``), else the stem."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name or str(p)
    parent = p.resolve().parent.name
    return parent or p.stem


def load_run(path: PathLike, label: Optional[str] = None) -> Run:
    """Read a run report (``stas-convert``'s ``report.json`` or ``stas-train``'s
    ``summary.json``, or a run directory holding one) as a :class:`Run`.

    ``label`` defaults to :func:`default_label`. Raises :class:`ConfigError` for a missing or
    unreadable file, invalid JSON, a file of another schema, or a field of the wrong type.
    """
    p, data = read_run_report(path)
    rows = _rows(p, data["per_t"])
    ref = data.get("reference") or {}
    notes = []
    missing = [r["t"] for r in rows if r["energy_mj"] is None]
    if missing:
        notes.append(f"no energy for t={','.join(map(str, missing))}")
    ds, model = data.get("dataset"), data.get("model")
    return Run(label=label or default_label(path), kind=data["kind"],
               dataset=None if ds is None else str(ds),
               model=None if model is None else str(model),
               timesteps=[r["t"] for r in rows], top1=[r["top1"] for r in rows],
               energy_mj=[r["energy_mj"] for r in rows],
               full_energy_mj=[r["full_energy_mj"] for r in rows],
               qann_full_energy_mj=[r["qann_full_energy_mj"] for r in rows],
               reference_top1=_number(p, "reference.top1", ref.get("top1"), optional=True,
                                      unit_interval=True),
               reference_energy_mj=_number(p, "reference.energy_mj", ref.get("energy_mj"),
                                           optional=True),
               reference_full_energy_mj=_number(p, "reference.full_energy_mj",
                                                ref.get("full_energy_mj"), optional=True),
               reference_images_per_s=_number(p, "reference.images_per_s",
                                              ref.get("images_per_s"), optional=True),
               images_per_s=_number(p, "images_per_s", data.get("images_per_s"), optional=True),
               source=str(p), notes=notes)


# ----------------------------------------------------------------------------- table
def _point(run: Run, i: int) -> dict:
    full = run.full_energy_mj[i] if i < len(run.full_energy_mj) else None
    qann = run.qann_full_energy_mj[i] if i < len(run.qann_full_energy_mj) else None
    return {"t": run.timesteps[i], "top1": run.top1[i], "energy_mj": run.energy_mj[i],
            "full_energy_mj": full, "qann_full_energy_mj": qann}


def summarise_run(run: Run, tolerance_pts: float = DEFAULT_TOLERANCE_PTS) -> dict:
    """Points, final / best point, and the smallest ``t`` within ``tolerance_pts`` of final."""
    if not run.timesteps:
        raise ConfigError(f"run {run.label!r} has no timesteps")
    if not (len(run.timesteps) == len(run.top1) == len(run.energy_mj)):
        raise ConfigError(f"run {run.label!r}: timesteps, top1 and energy_mj differ in length")
    order = sorted(range(len(run.timesteps)), key=lambda i: run.timesteps[i])

    def pick(values: list) -> list:
        return [values[i] for i in order] if len(values) == len(order) else []

    run = dataclasses.replace(run, timesteps=[run.timesteps[i] for i in order],
                              top1=[run.top1[i] for i in order],
                              energy_mj=[run.energy_mj[i] for i in order],
                              full_energy_mj=pick(run.full_energy_mj),
                              qann_full_energy_mj=pick(run.qann_full_energy_mj))
    last = len(run.timesteps) - 1
    final = run.top1[last]
    best = max(range(last + 1), key=lambda i: (run.top1[i], -i))  # ties: the smallest t
    bar = final - tolerance_pts / 100.0 - 1e-12
    knee = next(i for i in range(last + 1) if run.top1[i] >= bar)
    ref = None
    if run.reference_top1 is not None or run.reference_energy_mj is not None:
        ref = {"top1": run.reference_top1, "energy_mj": run.reference_energy_mj,
               "full_energy_mj": run.reference_full_energy_mj,
               "images_per_s": run.reference_images_per_s}
    return {
        "label": run.label, "kind": run.kind, "dataset": run.dataset, "model": run.model,
        "source": run.source, "images_per_s": run.images_per_s,
        "points": [_point(run, i) for i in range(last + 1)],
        "final": _point(run, last),
        "best": _point(run, best),
        "within_tolerance": _point(run, knee),
        "reference": ref,
        "notes": list(run.notes),
    }


def compare(runs: Sequence[Run], tolerance_pts: float = DEFAULT_TOLERANCE_PTS) -> dict:
    """A JSON-able table of ``runs``: per run every ``(t, top1, energy_mj)`` point, the final
    and best top-1, and ``within_tolerance``: the smallest ``t`` whose top-1 is within
    ``tolerance_pts`` percentage points of the run's own final top-1, with its energy.

    Logs a warning when the runs were evaluated on different datasets.
    """
    if not runs:
        raise ConfigError("nothing to compare: no runs given")
    if not (isinstance(tolerance_pts, (int, float)) and math.isfinite(tolerance_pts)
            and tolerance_pts >= 0):
        raise ConfigError(f"tolerance must be a number of percentage points >= 0, "
                          f"got {tolerance_pts!r}")
    labels = [r.label for r in runs]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ConfigError(f"run labels must be unique; repeated: {', '.join(dup)}")
    datasets = sorted({r.dataset for r in runs if r.dataset is not None})
    if len(datasets) > 1:
        logger.warning("the runs are on different datasets (%s): their accuracies are not "
                       "comparable", ", ".join(f"{r.label}={r.dataset}" for r in runs))
    return {
        "dataset": datasets[0] if len(datasets) == 1 else None,
        "datasets": datasets,
        "tolerance_pts": float(tolerance_pts),
        "runs": [summarise_run(r, tolerance_pts) for r in runs],
    }


# ----------------------------------------------------------------------------- markdown
def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}"


def _mj(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _cell(s: Any) -> str:
    return "n/a" if s is None else str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Mapping) -> str:
    """Markdown: one row per run and ``t`` (plus an ``ANN`` row for a converted run's
    reference), then a per-run summary (best top-1, smallest ``t`` within tolerance)."""
    tol = table.get("tolerance_pts", DEFAULT_TOLERANCE_PTS)
    lines = ["| run | t | top-1 % | energy mJ/image (conventional) | full ledger mJ | "
             "equal-information QANN, full mJ |", "|---|---:|---:|---:|---:|---:|"]
    for r in table["runs"]:
        for pt in r["points"]:
            lines.append(f"| {_cell(r['label'])} | {pt['t']} | {_pct(pt['top1'])} | "
                         f"{_mj(pt['energy_mj'])} | {_mj(pt.get('full_energy_mj'))} | "
                         f"{_mj(pt.get('qann_full_energy_mj'))} |")
        ref = r.get("reference")
        if ref:
            lines.append(f"| {_cell(r['label'])} | ANN | {_pct(ref.get('top1'))} | "
                         f"{_mj(ref.get('energy_mj'))} | {_mj(ref.get('full_energy_mj'))} | |")
    lines += ["", f"| run | kind | model | dataset | best top-1 % (t) | final top-1 % (t) | "
                  f"t within {tol:g} pt of final | top-1 % there | energy mJ/image there |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in table["runs"]:
        b, f, k = r["best"], r["final"], r["within_tolerance"]
        lines.append(f"| {_cell(r['label'])} | {r['kind']} | {_cell(r['model'])} | "
                     f"{_cell(r['dataset'])} | {_pct(b['top1'])} ({b['t']}) | "
                     f"{_pct(f['top1'])} ({f['t']}) | {k['t']} | {_pct(k['top1'])} | "
                     f"{_mj(k['energy_mj'])} |")
    if len(table.get("datasets") or []) > 1:
        lines += ["", f"**Warning:** different datasets ({', '.join(table['datasets'])}); "
                      f"accuracies are not comparable."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot
def render_png(runs: Sequence[Run], *, title: Optional[str] = None) -> bytes:
    """The three-panel figure (top-1 vs t | conventional energy per image vs t | full
    ledger vs t, with the ANN dashed and the equal-information QANN dotted; log y) as PNG
    bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not runs:
        raise ConfigError("nothing to plot: no runs given")
    fig = Figure(figsize=(15.0, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax_acc, ax_e, ax_f = fig.subplots(1, 3)
    any_energy = any_full = False
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        name = f"{r.label} ({r.kind})"
        ax_acc.plot(r.timesteps, [100.0 * v for v in r.top1], marker="o", color=color,
                    label=name)
        pts = [(t, e) for t, e in zip(r.timesteps, r.energy_mj) if e is not None and e > 0]
        if pts:
            any_energy = True
            ax_e.plot([t for t, _ in pts], [e for _, e in pts], marker="o", color=color,
                      label=name)
        if r.reference_top1 is not None:
            ax_acc.axhline(100.0 * r.reference_top1, linestyle="--", color=color, alpha=0.8,
                           label=f"{r.label} ANN")
        if r.reference_energy_mj is not None and r.reference_energy_mj > 0:
            any_energy = True
            ax_e.axhline(r.reference_energy_mj, linestyle="--", color=color, alpha=0.8,
                         label=f"{r.label} ANN")
        full = [(t, e) for t, e in zip(r.timesteps, r.full_energy_mj) if e]
        if full:
            any_full = True
            ax_f.plot([t for t, _ in full], [e for _, e in full], marker="o", color=color,
                      label=name)
            qann = [(t, e) for t, e in zip(r.timesteps, r.qann_full_energy_mj) if e]
            if qann:
                ax_f.plot([t for t, _ in qann], [e for _, e in qann], ls=":", color=color,
                          label=f"{r.label} QANN, equal information")
            if r.reference_full_energy_mj:
                ax_f.axhline(r.reference_full_energy_mj, linestyle="--", color=color,
                             alpha=0.8, label=f"{r.label} ANN")
    ax_f.set_title("Full ledger (memory, neurons, nonlinear ops)", fontsize=10)
    ax_f.set_ylabel("energy per image (mJ)")
    if any_full:
        ax_f.set_yscale("log")
        ax_f.legend(loc="best", fontsize=7)
    else:
        ax_f.text(0.5, 0.5, "no full-ledger figures in the inputs", ha="center",
                  va="center", transform=ax_f.transAxes)
    for ax in (ax_acc, ax_e, ax_f):
        ax.set_xlabel("timesteps T")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    ax_acc.set_ylabel("top-1 accuracy (%)")
    ax_acc.set_title("Top-1 vs timesteps", fontsize=10)
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_e.set_title("Energy per image vs timesteps (cumulative)", fontsize=10)
    ax_e.set_ylabel("energy per image (mJ)")
    if any_energy:
        ax_e.set_yscale("log")
        ax_e.grid(True, which="minor", alpha=0.1)
        ax_e.legend(loc="best", fontsize=8)
    else:
        ax_e.text(0.5, 0.5, "no energy figures in the inputs", ha="center", va="center",
                  transform=ax_e.transAxes)
    datasets = sorted({r.dataset for r in runs if r.dataset})
    fig.suptitle(title or ("Converted vs direct-trained SNNs"
                           + (f" ({', '.join(datasets)})" if datasets else "")), fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot(runs: Sequence[Run], path: PathLike, *, title: Optional[str] = None) -> Path:
    """Write :func:`render_png` to ``path`` atomically (temp file in its dir, then rename)."""
    from stas_core.checkpoint import atomic_write

    png = render_png(runs, title=title)
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))
    return path


__all__ = ["Run", "load_run", "default_label", "compare", "summarise_run",
           "to_markdown", "render_png", "plot", "CONVERTED", "DIRECT"]
