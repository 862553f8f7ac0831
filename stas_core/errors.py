"""Exception family of the project: every user-facing error derives from :class:`StasError`.

CLIs catch ``StasError`` and print its message without a traceback; anything else is a bug.
"""
from __future__ import annotations


class StasError(Exception):
    """Base of all errors raised for a user mistake or an unusable environment."""


class ConfigError(StasError, ValueError):
    """An option has a value outside its rule (the message states rule and value)."""


class DataError(StasError):
    """A dataset is missing, unreadable, or of the wrong format."""


class CheckpointError(StasError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def check_positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an int >= 1, else raise a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_choice(name: str, value: str, choices) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value
