"""Optuna studies over the STAS halting knobs (alpha, beta, eps, and delta_p on the direct
path): top-1 against energy per image, on direct-trained and converted models.

Library first: :mod:`tuning.space` (search space), :mod:`tuning.objectives` (what a trial
measures), :mod:`tuning.storage` (RDB storage, heartbeats, worker lock),
:mod:`tuning.study` (``run_study``), :mod:`tuning.export` (Pareto front, best.json, plot);
:mod:`tuning.cli` is ``stas-tune``. Optuna is imported only when a study runs.
"""
from .errors import StorageError, TuningError
from .space import DEFAULTS, Knob, SearchSpace, build_space, parse_range
from .study import TuneConfig, export_study, run_study

__all__ = ["TuningError", "StorageError", "Knob", "SearchSpace", "DEFAULTS", "build_space",
           "parse_range", "TuneConfig", "run_study", "export_study"]
