"""Converted (ANN -> SNN) vs direct-trained spiking models, across timesteps.

Inputs are the JSON files the project's commands write:

* ``report.json`` of ``stas-convert`` (kind ``"converted"``): ``snn_top1`` and ``energy_mj``
  map ``t`` (a string key) to the top-1 / the *cumulative* energy per image after ``t``
  timesteps; ``ann_top1`` / ``ann_energy_mj`` are the source ANN's figures (the reference).
* ``summary.json`` of ``stas-train --direct`` (kind ``"direct"``): ``top1`` at ``timesteps``,
  optionally ``top1_per_t`` (``t`` -> top-1); ``energy_per_timestep`` lists the energy of each
  step alone (0-based ``t``; an entry with ``t: null`` is work not tied to a step and counts
  from the first step on), so the cumulative energy after ``t`` steps is a running sum. An
  older summary without ``top1_per_t`` gives the single point ``(timesteps, top1, energy_mj)``.

:func:`load_run` normalises either file to a :class:`Run`, :func:`compare` tabulates runs
(JSON-able), :func:`to_markdown` renders the table, :func:`plot` writes a two-panel PNG.
Accuracies are fractions in [0, 1] throughout; they are shown as percentages.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import ConfigError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

CONVERTED = "converted"
DIRECT = "direct"
REPORT_NAMES = ("report.json", "summary.json")  # looked up when a run directory is given
DEFAULT_TOLERANCE_PTS = 0.5

_EXPECTED = ("a stas-convert report (fields: snn_top1 {t: top-1}, energy_mj {t: mJ}, "
             "ann_top1, ann_energy_mj, timesteps) or a stas-train --direct summary (fields: "
             "top1, timesteps, energy_mj, optional top1_per_t {t: top-1}, energy_per_timestep "
             "[{t, energy_mj}])")


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
def _resolve(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in REPORT_NAMES if (p / n).is_file()]
        if len(found) != 1:
            raise ConfigError(f"{p} is a directory; expected exactly one of "
                              f"{' / '.join(REPORT_NAMES)} in it, found "
                              f"{len(found) and ' and '.join(f.name for f in found) or 'none'}")
        return found[0]
    if not p.exists():
        raise ConfigError(f"{p}: no such file (expected a stas-convert report.json or a "
                          f"stas-train summary.json)")
    return p


def _read_json(p: Path) -> dict:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}); expected {_EXPECTED}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the JSON is a {type(data).__name__}, not an object; "
                          f"expected {_EXPECTED}")
    return data


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


def _t_key(p: Path, name: str, key: Any) -> int:
    try:
        t = int(str(key).strip())
    except ValueError:
        t = 0
    if t < 1 or str(t) != str(key).strip():
        raise ConfigError(f"{p}: {name} keys are timestep counts (integers >= 1), got {key!r}")
    return t


def _per_t(p: Path, name: str, value: Any, *, unit_interval: bool) -> dict[int, float]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{p}: {name} must be a non-empty object {{t: value}}, got "
                          f"{type(value).__name__}")
    return {_t_key(p, name, k): _number(p, f"{name}[{k!r}]", v, unit_interval=unit_interval)
            for k, v in value.items()}


def _timesteps(p: Path, data: dict) -> Optional[int]:
    t = data.get("timesteps")
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ConfigError(f"{p}: timesteps must be an integer >= 1, got {t!r}")
    return t


def _cumulative_steps(p: Path, steps: Any) -> dict[int, float]:
    """``energy_per_timestep`` (per-step, 0-based ``t``) -> ``{t (1-based): cumulative mJ}``."""
    if not isinstance(steps, list):
        raise ConfigError(f"{p}: energy_per_timestep must be a list of {{t, energy_mj}}, got "
                          f"{type(steps).__name__}")
    once = 0.0
    per: dict[int, float] = {}
    for i, e in enumerate(steps):
        if not isinstance(e, dict) or "energy_mj" not in e:
            raise ConfigError(f"{p}: energy_per_timestep[{i}] must be an object with t and "
                              f"energy_mj, got {e!r}")
        mj = _number(p, f"energy_per_timestep[{i}].energy_mj", e["energy_mj"])
        t = e.get("t")
        if t is None:
            once += mj
            continue
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ConfigError(f"{p}: energy_per_timestep[{i}].t must be a 0-based step index "
                              f"(integer >= 0) or null, got {t!r}")
        per[t] = per.get(t, 0.0) + mj
    out: dict[int, float] = {}
    total = once
    for t in range(max(per, default=-1) + 1):  # a missing step spends nothing
        total += per.get(t, 0.0)
        out[t + 1] = total
    return out


def _full_ledger(p: Path, data: dict, ts: list[int]) -> dict:
    """The full-ledger fields of a report with an ``energy`` block (else none)."""
    block = data.get("energy")
    if not isinstance(block, dict) or not isinstance(block.get("per_t"), list):
        return {}
    per_t = {}
    for entry in block["per_t"]:
        if isinstance(entry, dict) and "t" in entry:
            per_t[_t_key(p, "energy.per_t", entry["t"])] = entry
    full = [_number(p, "energy.per_t.full_mj", per_t[t].get("full_mj"), optional=True)
            if t in per_t else None for t in ts]
    qann = [_number(p, "energy.per_t.qann_full_mj", per_t[t].get("qann_full_mj"), optional=True)
            if t in per_t else None for t in ts]
    return dict(full_energy_mj=full, qann_full_energy_mj=qann,
                reference_full_energy_mj=_number(p, "energy.ann_full_mj",
                                                 block.get("ann_full_mj"), optional=True))


def _load_converted(p: Path, data: dict) -> dict:
    top1 = _per_t(p, "snn_top1", data["snn_top1"], unit_interval=True)
    energy: dict[int, float] = {}
    if isinstance(data.get("energy_mj"), dict):
        energy = _per_t(p, "energy_mj", data["energy_mj"], unit_interval=False)
    elif data.get("energy_mj") is not None:  # a single figure: the energy at the largest t
        energy = {max(top1): _number(p, "energy_mj", data["energy_mj"])}
    ts = sorted(top1)
    notes = []
    missing = [t for t in ts if t not in energy]
    if missing:
        notes.append(f"no energy for t={','.join(map(str, missing))}")
    return dict(
        kind=CONVERTED, timesteps=ts, top1=[top1[t] for t in ts],
        energy_mj=[energy.get(t) for t in ts],
        reference_top1=_number(p, "ann_top1", data.get("ann_top1"), optional=True,
                               unit_interval=True),
        reference_energy_mj=_number(p, "ann_energy_mj", data.get("ann_energy_mj"),
                                    optional=True),
        images_per_s=_number(p, "snn_images_per_s", data.get("snn_images_per_s"),
                             optional=True),
        reference_images_per_s=_number(p, "ann_images_per_s", data.get("ann_images_per_s"),
                                       optional=True),
        notes=notes, **_full_ledger(p, data, ts))


def _load_direct(p: Path, data: dict) -> dict:
    final_t = _timesteps(p, data)
    final_top1 = _number(p, "top1", data["top1"], unit_interval=True)
    total = _number(p, "energy_mj", data.get("energy_mj"), optional=True)
    notes = []
    if data.get("top1_per_t") is not None:
        top1 = _per_t(p, "top1_per_t", data["top1_per_t"], unit_interval=True)
        if final_t is not None and final_t not in top1:
            top1[final_t] = final_top1
    else:
        if final_t is None:
            raise ConfigError(f"{p}: a direct-training summary without top1_per_t needs "
                              f"timesteps (the T its top1 was measured at)")
        top1 = {final_t: final_top1}
        notes.append("no top1_per_t: only the final timestep is known")
    energy: dict[int, float] = {}
    if data.get("energy_per_timestep") is not None:
        energy = _cumulative_steps(p, data["energy_per_timestep"])
    if total is not None and final_t is not None and final_t not in energy:
        energy[final_t] = total
    ts = sorted(top1)
    missing = [t for t in ts if t not in energy]
    if missing:
        notes.append(f"no energy for t={','.join(map(str, missing))}")
    return dict(kind=DIRECT, timesteps=ts, top1=[top1[t] for t in ts],
                energy_mj=[energy.get(t) for t in ts],
                images_per_s=_number(p, "images_per_s", data.get("images_per_s"),
                                     optional=True),
                notes=notes, **_full_ledger(p, data, ts))


def detect_kind(data: Mapping) -> Optional[str]:
    """``"converted"`` (has ``snn_top1``), ``"direct"`` (has ``top1``), else ``None``."""
    if "snn_top1" in data:
        return CONVERTED
    if "top1" in data:
        return DIRECT
    return None


def default_label(path: PathLike) -> str:
    """The run directory's name (``runs/direct/summary.json`` -> ``direct``), else the stem."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name or str(p)
    parent = p.resolve().parent.name
    return parent or p.stem


def load_run(path: PathLike, label: Optional[str] = None) -> Run:
    """Read a ``stas-convert`` report or a ``stas-train --direct`` summary as a :class:`Run`.

    ``path`` may also be a run directory holding one of ``report.json`` / ``summary.json``.
    ``label`` defaults to :func:`default_label`. Raises :class:`ConfigError` for a missing or
    unreadable file, invalid JSON, a JSON of neither kind, or a field of the wrong type.
    """
    p = _resolve(path)
    data = _read_json(p)
    kind = detect_kind(data)
    if kind is None:
        fields = ", ".join(sorted(data)[:12]) or "none"
        raise ConfigError(f"{p}: not a known result file (its fields: {fields}); expected "
                          f"{_EXPECTED}")
    fields = _load_converted(p, data) if kind == CONVERTED else _load_direct(p, data)
    ds, model = data.get("dataset"), data.get("model")
    return Run(label=label or default_label(path),
               dataset=None if ds is None else str(ds),
               model=None if model is None else str(model),
               source=str(p), **fields)


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


__all__ = ["Run", "load_run", "detect_kind", "default_label", "compare", "summarise_run",
           "to_markdown", "render_png", "plot", "CONVERTED", "DIRECT"]
