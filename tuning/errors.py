"""Errors of the tuner (all rooted in :class:`stas_core.errors.StasError`) and the guarded
import of Optuna."""
from __future__ import annotations

from types import ModuleType

from stas_core.errors import CheckpointError, ConfigError, StasError


class TuningError(StasError):
    """A study that cannot be opened, created or continued (storage, study, checkpoint kind)."""


class StorageError(TuningError):
    """The study storage (SQLite file, PostgreSQL, ...) cannot be reached or used."""


def require_optuna() -> ModuleType:
    """``import optuna``, or a :class:`TuningError` that says how to install it."""
    try:
        import optuna
    except ImportError as exc:
        raise TuningError(f"optuna is not installed ({exc}); install it with "
                          f"pip install 'optuna>=3.4' (a dependency of stas: "
                          f"pip install -e .)") from None
    return optuna


__all__ = ["TuningError", "StorageError", "CheckpointError", "ConfigError", "StasError",
           "require_optuna"]
