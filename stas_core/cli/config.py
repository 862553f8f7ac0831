"""``--config FILE``: option defaults from a JSON object (e.g. ``best.json`` of stas-tune).

Keys are option names; values are checked and converted as the option's own parsing would,
and become parser defaults, so flags given on the command line still win.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from ..report import read_json_object


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """``--config FILE``: a JSON object of option defaults (applied by :func:`run`)."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON object whose keys are option names (e.g. {\"alpha\": 1.5, "
                        "\"delta_p\": 1e-4, \"halting\": true}, as stas-tune writes in "
                        "best.json); its values become defaults, explicit flags still win")


def _config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Options a config file may set, by dest and by long option name (``-`` as ``_``)."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", argparse.SUPPRESS):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        names.setdefault(action.dest, action)
        for opt in action.option_strings:
            if opt.startswith("--"):
                names.setdefault(opt[2:].replace("-", "_"), action)
    return names


def _config_value(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """``value`` checked and converted the way the option's own parsing would."""
    flag = action.nargs == 0  # store_true / store_false / store_const
    if flag:
        if key != action.dest:  # the flag's name, e.g. "no_progress": true
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key!r} is a flag; give true or false, got {value!r}")
            return action.const if value else action.default
        if value is None or isinstance(value, bool) or value == action.const:
            return value
        raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key!r} takes a list, got {value!r}")
        return [_config_scalar(key, v, action, where) for v in value]
    return _config_scalar(key, value, action, where)


def _config_scalar(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    if value is None:
        return None
    if isinstance(value, (dict, list)) or isinstance(value, bool) and action.type is not None:
        raise ConfigError(f"{where}: {key!r} must be a single value, got {value!r}")
    kind = action.type
    if kind is None and isinstance(value, (int, float)):
        value = str(value)
    elif kind in (int, float) and not isinstance(value, str):
        if kind is int and not (isinstance(value, int) or float(value).is_integer()):
            raise ConfigError(f"{where}: {key!r} must be an integer, got {value!r}")
        value = kind(value)
    elif callable(kind):
        try:
            value = kind(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: bad value {value!r} for {key!r} ({exc})") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {key!r} must be one of "
                          f"{', '.join(map(str, action.choices))}; got {value!r}")
    return value


def apply_config_file(parser: argparse.ArgumentParser,
                      argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """If ``argv`` has ``--config FILE`` (and the parser offers it), read the JSON object in
    FILE and make its values the parser's defaults, so explicit flags still win.

    Keys are option names (``delta_p`` or ``delta-p``; a flag's own name such as
    ``no_progress`` takes true/false). An unreadable file, a value of the wrong type or
    an unknown key is one :class:`ConfigError`. Returns the applied defaults (None: no file).
    """
    if not any("--config" in a.option_strings for a in parser._actions):
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if known.config is None:
        return None
    path = Path(known.config)
    where = f"--config {path}"
    data = read_json_object(path, where, "option names to values")
    actions = _config_actions(parser)
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in actions:
            raise ConfigError(f"{where}: unknown option {key!r} for {parser.prog}; known: "
                              f"{', '.join(sorted(set(a.dest for a in actions.values())))}")
        action = actions[name]
        defaults[action.dest] = _config_value(name, value, action, where)
    parser.set_defaults(**defaults)
    return defaults
