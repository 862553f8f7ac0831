"""The run report both ``stas-train`` (``summary.json``) and ``stas-convert``
(``report.json``) write, and the one JSON reader of the project.

Schema ``stas-run/1``, shared by both kinds:

* ``schema``, ``kind`` (``"direct"`` or ``"converted"``), ``model``, ``dataset``,
  ``timesteps`` (T);
* ``top1``, ``energy_mj`` (conventional MAC/AC ledger), ``full_energy_mj`` (full ledger):
  the model as run, at T, per image;
* ``per_t``: one row per t = 1..T, **t counted from 1**, energies **cumulative** (the model
  stopped after t): ``{"t", "top1", "energy_mj", "full_energy_mj", ...}`` (a converted run
  adds ``agreement`` and ``logit_error`` with its ANN, and ``qann_full_energy_mj``);
* ``reference``: the ANN a converted model came from (``top1``, ``energy_mj``,
  ``full_energy_mj``, ``images_per_s``), ``null`` for a direct run;
* ``halted``: rows like ``per_t`` for a converted run with ``--halting`` (each t its own
  halting window), with ``token_ratio``; absent otherwise (a direct STAS run's ``per_t``
  is itself the halted model's);
* ``images_per_s``, ``test_images``, ``baselines``, ``predictions``, ``provenance``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import ConfigError

SCHEMA = "stas-run/1"
KINDS = ("direct", "converted")
REPORT_NAMES = ("report.json", "summary.json")

__all__ = ["SCHEMA", "KINDS", "REPORT_NAMES", "read_json_object", "per_t_rows", "read_run_report"]


def read_json_object(path: Union[str, Path], where: str, what: str) -> dict:
    """The JSON object in ``path``; a missing/unreadable file, bad JSON or another JSON
    type is one ConfigError starting with ``where`` (``what``: what the object holds)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}); expected a JSON object of {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object of {what}, "
                          f"got {type(data).__name__}")
    return data


def per_t_rows(top1: Sequence[float], energy_per_t: Sequence[dict], **extra: Sequence) -> list:
    """``per_t`` rows from the top-1 after each t (index 0 is t = 1) and
    :func:`stas_core.evaluate.energy_report`'s cumulative ``per_t``; ``extra`` lists (one
    value per t) become further keys of the rows."""
    if len(top1) != len(energy_per_t) or any(len(v) != len(top1) for v in extra.values()):
        raise ValueError(f"per_t_rows needs one value per t; got {len(top1)} top-1, "
                         f"{len(energy_per_t)} energies and "
                         f"{ {k: len(v) for k, v in extra.items()} }")
    rows = []
    for i, (acc, e) in enumerate(zip(top1, energy_per_t)):
        if e["t"] != i + 1:
            raise ValueError(f"energy per t must run t = 1, 2, ...; got t={e['t']} at {i}")
        row = {"t": i + 1, "top1": float(acc), "energy_mj": float(e["conventional_mj"]),
               "full_energy_mj": float(e["full_mj"])}
        if e.get("qann_full_mj") is not None:
            row["qann_full_energy_mj"] = float(e["qann_full_mj"])
        row.update({k: float(v[i]) for k, v in extra.items()})
        rows.append(row)
    return rows


def read_run_report(path: Union[str, Path]) -> tuple[Path, dict]:
    """``(file, report)`` for a ``stas-run`` report, or a run directory holding exactly one
    of ``report.json`` / ``summary.json``. Anything else is one ConfigError saying what
    was found and what is expected."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in REPORT_NAMES if (p / n).is_file()]
        if len(found) != 1:
            raise ConfigError(f"{p} is a directory; expected exactly one of "
                              f"{' / '.join(REPORT_NAMES)} in it, found "
                              f"{' and '.join(f.name for f in found) or 'none'}")
        p = found[0]
    data = read_json_object(p, str(p), f"a run report ({SCHEMA}: written by stas-train or "
                                       f"stas-convert)")
    schema = data.get("schema")
    if schema != SCHEMA or data.get("kind") not in KINDS:
        fields = ", ".join(sorted(data)[:12]) or "none"
        got = f"schema {schema!r}" if schema is not None else f"no schema (fields: {fields})"
        raise ConfigError(f"{p}: not a {SCHEMA} run report: {got}. Expected a summary.json "
                          f"or report.json written by stas-train or stas-convert of this "
                          f"version; rerun the command (or its evaluation) to get one")
    rows = data.get("per_t")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{p}: per_t must be a non-empty list of rows {{t, top1, energy_mj, "
                          f"full_energy_mj}}, got {type(rows).__name__}")
    return p, data


def point(rows: Sequence[dict], t: int) -> Optional[dict]:
    """The row of ``t`` (1-based) in ``per_t`` / ``halted`` rows, or None."""
    return next((r for r in rows if r.get("t") == t), None)
