"""Model registry in timm's style: ``@register_model`` + ``create_model(name, **kwargs)``.

Names follow ``<family>-<blocks>-<dim>`` (``spikformer-4-384``); ``_`` and ``-`` are
interchangeable. Any ``<family>-<L>-<D>`` of a registered family may be built, registered
names only fix non-default choices such as the number of heads.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from ..errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, Callable[..., nn.Module]] = {}
_NAME = re.compile(r"^(?P<family>[a-z]+)-(?P<depth>\d+)-(?P<dim>\d+)$")


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_family(family: str):
    """Register a model class that builds ``<family>-<depth>-<dim>`` for any depth and dim."""
    def wrap(cls):
        _FAMILIES[family] = cls
        return cls
    return wrap


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a named configuration (function name ``spikformer_4_384`` -> ``spikformer-4-384``)."""
    _MODELS[_canonical(fn.__name__)] = fn
    return fn


def list_models() -> list[str]:
    """Registered configuration names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name; keyword arguments that are ``None`` are dropped (timm convention)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    key = _canonical(name)
    if key in _MODELS:
        return _MODELS[key](**kwargs)
    match = _NAME.match(key)
    if match and match["family"] in _FAMILIES:
        return _FAMILIES[match["family"]](depth=int(match["depth"]), embed_dim=int(match["dim"]),
                                          **kwargs)
    raise ConfigError(
        f"unknown model {name!r}: expected '<family>-<blocks>-<dim>' with family in "
        f"{sorted(_FAMILIES)} (e.g. spikformer-2-128); registered: {', '.join(list_models())}")
