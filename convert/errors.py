"""Errors of the converter (all rooted in :class:`stas_core.errors.StasError`)."""
from stas_core.errors import CheckpointError, ConfigError, StasError


class ConversionError(StasError, ValueError):
    """A model or input the converter cannot handle (the message says what it supports)."""


__all__ = ["ConversionError", "CheckpointError", "ConfigError", "StasError"]
