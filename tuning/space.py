"""The search space over the halting knobs: defaults, ``--range`` / ``--space`` parsing.

``alpha``, ``beta`` and ``eps`` are tuned on both paths (they act at inference);
``delta_p``, the ponder-loss weight, needs training and is tuned on the direct path only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from .errors import ConfigError

logger = logging.getLogger(__name__)

PATHS = ("direct", "converted")


@dataclass(frozen=True)
class Knob:
    """One tuned knob: a float range ``[low, high]``, sampled uniformly or log-uniformly."""

    name: str
    low: float
    high: float
    log: bool = False

    def check(self) -> "Knob":
        """The knob itself if its range is usable, else one :class:`ConfigError`."""
        for bound, v in (("low", self.low), ("high", self.high)):
            if not math.isfinite(v):
                raise ConfigError(f"search range of {self.name}: {bound} must be finite, got {v}")
        if self.low >= self.high:
            raise ConfigError(f"empty search range for {self.name}: low {self.low:g} >= high "
                              f"{self.high:g}; give --range {self.name}=LOW:HIGH with LOW < HIGH")
        if self.log and self.low <= 0:
            raise ConfigError(f"log-scale range of {self.name} must have low > 0, got "
                              f"{self.low:g}; give a positive low or :linear")
        rule = _RULES.get(self.name)
        if rule is not None:
            lo, hi, text = rule
            if self.low < lo or self.high > hi or (self.name == "eps" and self.high >= 1):
                raise ConfigError(f"search range of {self.name} {self.low:g}:{self.high:g} is "
                                  f"outside {text}")
        return self

    def spec(self) -> str:
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")


#: Where a knob's values are legal at all (eps: the halting threshold slack).
_RULES = {"eps": (0.0, 1.0, "[0, 1) (halting once H >= 1 - eps)"),
          "delta_p": (0.0, math.inf, "[0, inf) (a loss weight)")}

#: Default ranges (documented in the README).
DEFAULTS: dict[str, Knob] = {
    "alpha": Knob("alpha", -4.0, 4.0),
    "beta": Knob("beta", -6.0, 2.0),
    "eps": Knob("eps", 0.0, 0.3),
    "delta_p": Knob("delta_p", 1e-5, 1e-2, log=True),
}
KNOBS = tuple(DEFAULTS)
#: Narrower defaults per path. A converted ViT never learned a halting signal; its default
#: score is how settled a token's running mean is (-log of its relative change, about 0-8),
#: which only makes sense rising (alpha > 0), and only a negative beta keeps tokens from
#: halting at t = 1. The range holds the measured operating point (alpha 0.5, beta -4) and
#: the screened grid around it. For ``--halting-score mean`` give ranges: channel 0 of the
#: residual stream has std 2.6-5.3 on the Fashion-MNIST ViT, so ``alpha=-0.5:0.5`` there.
PATH_DEFAULTS: dict[str, dict[str, Knob]] = {
    "converted": {"alpha": Knob("alpha", 0.0, 2.0), "beta": Knob("beta", -8.0, -1.0)},
}


def start_point(path: str, space: "SearchSpace", halting_score: Optional[str] = None
                ) -> Optional[dict[str, float]]:
    """The first trial of a fresh study: the model kind's measured operating point
    (:attr:`convert.spiking_vit.SpikingViT.halting_defaults` on the converted path) where
    the space holds it and the score is the one it was measured with; else None."""
    if path != "converted" or halting_score not in (None, "convergence"):
        return None
    from convert.spiking_vit import SpikingViT

    d = SpikingViT.halting_defaults
    point = {name: getattr(d, name) for name in space.names}
    inside = all(k.low <= point[k.name] <= k.high for k in space.knobs)
    return point if inside else None


def knobs_for(path: str) -> tuple[str, ...]:
    """The knobs tuned on ``path`` (``delta_p`` needs training: direct only)."""
    if path not in PATHS:
        raise ConfigError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
    return KNOBS if path == "direct" else tuple(k for k in KNOBS if k != "delta_p")


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in DEFAULTS:
        raise ConfigError(f"unknown knob {name.strip()!r}; tunable knobs: {', '.join(KNOBS)}")
    return key


def _float(text: Any, what: str) -> float:
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a number, got {text!r}")
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a number, got {text!r}") from None


def parse_range(text: str) -> Knob:
    """``NAME=LOW:HIGH`` with an optional ``:log`` / ``:linear`` suffix, e.g. ``eps=0:0.3``
    or ``delta_p=1e-5:1e-2:log`` (the scale defaults to the knob's default scale)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"bad --range {text!r}; expected NAME=LOW:HIGH[:log], e.g. "
                          f"alpha=-2:2 (knobs: {', '.join(KNOBS)})")
    key = _canonical(name)
    parts = [p.strip() for p in rest.split(":")]
    log = DEFAULTS[key].log
    if len(parts) == 3 and parts[2].lower() in ("log", "linear"):
        log = parts[2].lower() == "log"
        parts = parts[:2]
    if len(parts) != 2:
        raise ConfigError(f"bad --range {text!r}; expected {key}=LOW:HIGH[:log|:linear]")
    low, high = (_float(p, f"--range {text!r}") for p in parts)
    return Knob(key, low, high, log).check()


def _knob_from_json(name: str, value: Any, where: str) -> Knob:
    key = _canonical(name)
    log = DEFAULTS[key].log
    if isinstance(value, str):
        return parse_range(f"{key}={value}")
    if isinstance(value, list) and len(value) in (2, 3):
        if len(value) == 3:
            if value[2] not in ("log", "linear"):
                raise ConfigError(f"{where}: {key}: third item must be 'log' or 'linear'")
            log = value[2] == "log"
        low, high = (_float(v, f"{where}: {key}") for v in value[:2])
    elif isinstance(value, dict) and {"low", "high"} <= set(value) <= {"low", "high", "log"}:
        low, high = _float(value["low"], f"{where}: {key}.low"), _float(value["high"], f"{where}: {key}.high")
        log = bool(value.get("log", log))
    else:
        raise ConfigError(f"{where}: {key} must be \"LOW:HIGH\", [LOW, HIGH(, \"log\")] or "
                          f"{{\"low\": .., \"high\": .., \"log\": false}}; got {value!r}")
    return Knob(key, low, high, log).check()


def load_space_file(path: str | Path) -> dict[str, Knob]:
    """Ranges from a JSON object ``{"alpha": [-2, 2], "delta_p": [1e-5, 1e-2, "log"], ...}``."""
    from stas_core.report import read_json_object

    where = f"--space {path}"
    data = read_json_object(path, where, "knob names to ranges")
    return {k.name: k for k in (_knob_from_json(n, v, where) for n, v in data.items())}


@dataclass(frozen=True)
class SearchSpace:
    """The knobs of one study and their ranges."""

    knobs: tuple[Knob, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs)

    def suggest(self, trial) -> dict[str, float]:
        """Draw every knob from an Optuna trial."""
        return {k.name: trial.suggest_float(k.name, k.low, k.high, log=k.log) for k in self.knobs}

    def describe(self) -> dict[str, str]:
        return {k.name: k.spec() for k in self.knobs}


def build_space(path: str, ranges: Iterable[str] = (), space_file: Optional[str] = None,
                overrides: Optional[Mapping[str, Knob]] = None) -> SearchSpace:
    """The default space of ``path``, updated by ``space_file``, then ``ranges``
    (``--range`` strings), then ``overrides``. A knob ``path`` cannot tune is an error."""
    allowed = knobs_for(path)
    chosen = {name: PATH_DEFAULTS.get(path, {}).get(name, DEFAULTS[name]) for name in allowed}
    given: dict[str, Knob] = {}
    if space_file:
        given.update(load_space_file(space_file))
    for text in ranges:
        knob = parse_range(text)
        given[knob.name] = knob
    given.update(overrides or {})
    for name, knob in given.items():
        if name not in allowed:
            raise ConfigError(f"{name} cannot be tuned on --path {path}: it weights the ponder "
                              f"loss, which only matters when training (use --path direct)")
        chosen[name] = knob.check()
    return SearchSpace(tuple(chosen[n] for n in allowed))
