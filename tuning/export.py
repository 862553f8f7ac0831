"""What a study leaves in ``--out``: ``trials.jsonl``, ``pareto.json`` / ``pareto.csv``,
``best.json`` (options for ``stas-train`` / ``stas-convert --config``) and ``trials.png``.
Every file is written atomically; these functions take plain trial records (dicts), so they
need no Optuna."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from stas_core.checkpoint import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

#: Multi-objective best.json: the cheapest Pareto point within this much top-1 of the
#: front's most accurate one (when no --min-top1 floor is given).
TOP1_SLACK = 0.01
#: The energy a study minimises (conventional or full ledger, by the study's
#: ``energy_model``); ``energy_mj`` stays the conventional figure.
OBJ = "objective_energy_mj"


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One JSON line per finished trial."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def pareto_front(records: Sequence[dict]) -> list[dict]:
    """The complete trials no other complete trial beats on both top-1 (higher) and energy
    (lower), cheapest first."""
    done = [r for r in records if r.get("state") == "COMPLETE" and r.get("top1") is not None
            and r.get(OBJ) is not None]

    def dominated(r: dict) -> bool:
        return any(o["top1"] >= r["top1"] and o[OBJ] <= r[OBJ]
                   and (o["top1"] > r["top1"] or o[OBJ] < r[OBJ]) for o in done)

    return sorted((r for r in done if not dominated(r)),
                  key=lambda r: (r[OBJ], -r["top1"], r["number"]))


def choose_best(records: Sequence[dict], objective: str,
                min_top1: Optional[float] = None) -> Optional[dict]:
    """The trial best.json describes.

    ``energy`` objective: the lowest objective value (lowest energy among trials meeting the
    top-1 floor). ``pareto``: the cheapest Pareto point with top-1 >= ``min_top1`` (default:
    within :data:`TOP1_SLACK` of the front's best top-1); if none reaches the floor, the
    most accurate point.
    """
    front = pareto_front(records)
    if not front:
        return None
    if objective == "energy":
        done = [r for r in records if r.get("state") == "COMPLETE" and r.get("values")]
        return min(done, key=lambda r: (r["values"][0], r["number"])) if done else None
    floor = max(r["top1"] for r in front) - TOP1_SLACK if min_top1 is None else min_top1
    ok = [r for r in front if r["top1"] >= floor]
    if not ok:
        logger.warning("no trial reached top-1 %.4f; best.json holds the most accurate one",
                       floor)
        return max(front, key=lambda r: (r["top1"], -r[OBJ]))
    return min(ok, key=lambda r: (r[OBJ], -r["top1"]))


def _row(r: dict, knobs: Sequence[str]) -> dict:
    return {"number": r["number"], **{k: r["params"].get(k) for k in knobs},
            "top1": r["top1"], OBJ: r[OBJ], "energy_mj": r.get("energy_mj"),
            "token_ratio": r.get("token_ratio")}


def write_pareto(out: Path, front: Sequence[dict], knobs: Sequence[str], meta: dict) -> None:
    """``pareto.json`` (``meta`` plus the front) and ``pareto.csv`` (one row per point)."""
    rows = [_row(r, knobs) for r in front]
    doc = {**meta, "pareto": [{"number": r["number"], "params": r["params"], "top1": r["top1"],
                               OBJ: r[OBJ], "energy_mj": r.get("energy_mj"),
                               "full_energy_mj": r.get("full_energy_mj"),
                               "token_ratio": r.get("token_ratio")} for r in front]}
    atomic_write_text(out / "pareto.json", json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["number", *knobs, "top1", OBJ, "energy_mj",
                                             "token_ratio"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "pareto.csv", buf.getvalue())


def write_best(out: Path, best: dict, defaults: dict) -> dict:
    """``best.json``: option names -> values, as ``--config`` of stas-train / stas-convert
    reads them (``defaults`` are path-specific options such as ``halting`` and ``init_from``)."""
    options = {**defaults, **best["params"]}
    atomic_write_text(out / "best.json", json.dumps(options, indent=2) + "\n")
    return options


def plot_trials(path: Path, records: Sequence[dict], front: Sequence[dict],
                best: Optional[dict] = None, title: str = "", *,
                baseline: Optional[dict] = None, energy_key: str = "energy_mj") -> None:
    """Energy per image against top-1 for every complete trial, the Pareto front marked,
    and (``baseline``) the model without halting stopped after t = 1..T."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in records if r.get("state") == "COMPLETE" and r.get("top1") is not None]
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter([r[OBJ] for r in done], [100 * r["top1"] for r in done], s=18,
               color="0.6", label=f"trials ({len(done)})")
    if front:
        ax.plot([r[OBJ] for r in front], [100 * r["top1"] for r in front], "o-",
                color="tab:red", drawstyle="steps-post", label=f"Pareto front ({len(front)})")
    if best is not None:
        ax.scatter([best[OBJ]], [100 * best["top1"]], marker="*", s=180,
                   color="tab:blue", zorder=3, label=f"best.json (trial {best['number']})")
    if baseline:
        from halting.plots import draw_baseline

        draw_baseline(ax, baseline, energy_key=energy_key)
    ax.set(xlabel="energy per image (mJ)", ylabel="top-1 (%)", title=title or "stas-tune trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
